#!/usr/bin/env python
"""Kernel-level benchmark of one MSA sparse layer (issue 4): ours vs SGLang 0.5.17's in-tree MiniMax-M3 kernels.

Decode: one sparse layer's attention work for one decode step of ``bs`` requests of ``context`` tokens each (the
new token included) -- store of the new token's K, V and index key, indexer top-k, block-sparse attention -- at
real per-rank shapes (TP1: 64 q / 4 KV / 4 index heads; a TP8 rank: 8 / 1 / 1), head dim = index dim = 128,
block 128, top-16, bf16. Both sides read the *same* tensors: one paged K/V cache, one index-key cache, one
req_to_token table, slots and pool rows randomly permuted.

  ours     ``sglang_m3.attention.kernels`` as ``M3SparseAttnBackend`` drives them under decode CUDA graphs:
           MSAWorkspace + warmup(...) + freeze(), fixed-address top-k/output buffers, prepare_meta(...) once per
           forward, then per layer: the K/V write of SGLang's MHATokenToKVPool (its ``store_cache`` JIT kernel),
           store_index_k, index_block_topk(out=...), sparse_attention(out=...). prepare_meta serves all 57 sparse
           layers of a forward, so it is captured in a graph of its own and reported apart (``ours_meta_us``).
  in-tree  what ``MiniMaxSparseAttnBackend.forward_decode`` (srt/layers/attention/minimax_sparse_backend.py) runs
           on Hopper under decode graphs: the fused K/V/index-key store (``store_kv_index`` JIT, the path
           ``MiniMaxSparseKVPool.set_fused_kv_index_buffer`` takes for bf16; its separate stores if the JIT
           cannot be built), then ``minimax_sparse_decode`` with the backend's arguments (score "max",
           disable_index_value, no sink, page_size 1, use_msa False: fmha_sm100 is SM100-only and the backend
           keeps it off under decode graphs anyway, minimax_sparse_backend.py:157-159). Inside: score kernel,
           block top-k (radix-select JIT by default; the Triton two-stage top-k if the JIT cannot be built or
           with ``--intree-topk triton``), GQA-shared sparse decode + merge.
           Its per-forward metadata is host-side only: during capture ``init_forward_metadata_out_graph`` sets
           ``max_seqlen = model context length`` (minimax_sparse_backend.py:206-207), a Python int baked into the
           graph. Mirrored: ``max_seqlen`` = ``--context-len`` (default: the largest context benchmarked, i.e. a
           server started with that --context-length; req_to_token has that width for both sides). At M3's
           default 1M context the score buffer would have 8192 block columns and the radix top-k is gated off
           (> 4096, kernels/ops/attention/minimax_sparse/decode/flash_with_topk_idx.py:861-865).
           Its Triton kernels are autotuned. SGLang's graph runner tunes them in the pre-capture warmup on dummy
           batches with seq_lens = 1 (decode_cuda_graph_runner.py:846, fill value from
           minimax_sparse_backend.py:263); here, more favourably to the peer, every case clears the autotune
           caches and tunes on its own real inputs before capture.

Timing: each side's per-layer step is captured in one torch.cuda.CUDAGraph; median of ``--iters`` per-replay
CUDA-event times. L2 is flushed (memset of 2x its size) before each replay -- in a real forward 56 other sparse
layers' caches pass through L2 between two calls of a layer -- unless ``--no-l2-flush``.
HBM floor: ``decode_bytes_needed`` / the bandwidth of a large device-to-device copy on the same GPU
(``dst.copy_(src)`` of ``--copy-gib`` GiB, bandwidth = 2 * bytes / time). Reported per case: µs, achieved
bytes/s (bytes needed / time), time / floor time, ours' speed-up, and a cross-check: max |ours - in-tree| of the
output and the number of (token, head) rows whose block selections differ.
Prefill (``--prefill``): one prompt of L tokens through one sparse layer, eager, extend form (ours:
extend_seq_lens / extend_start_loc; in-tree: ``minimax_sparse_prefill`` with the cu_seqlens / prefix_lens its
``forward_extend`` builds per layer). Median of ``--prefill-iters`` runs; ms and tokens/s.

``--smoke``: CPU, Triton interpreter (TRITON_INTERPRET=1, set below before triton is imported), tiny shapes, no
timing. Checks that ours, the in-tree kernels and our torch reference (``sglang_m3.attention.reference``) agree
-- output and block selection -- on identical inputs: decode batches with mixed lengths (1 token, dense regime
<= topk * block tokens, sparse regime) and a packed prefill with a cached prefix. fp16, not bf16: the
interpreter's tl.dot multiplies bf16 operands as raw uint16 bit patterns (triton/runtime/interpreter.py,
create_dot), which garbles the in-tree kernels (ours upcast under the interpreter). The interpreter cannot
autotune, so the in-tree autotuners are pinned to one small-tile config each (``INTERPRETER_TILES``), and the
CUDA-only JIT kernels are replaced by the in-tree's own fallbacks (separate stores, Triton two-stage top-k).

Usage:
  python benchmarks/kernel_decode.py                               # full matrix on one GPU -> $OUT or ./bench_out
  python benchmarks/kernel_decode.py --heads tp8 --bs 1,32 --ctx 32768 --prefill ''
  python benchmarks/kernel_decode.py --smoke --out /tmp/smoke      # CPU cross-check, ~2.5 min on one core
The largest case (TP1, bs 128 x 128K) holds 36 GiB of caches; cases that do not fit are skipped with the reason.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    os.environ["SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX"] = "0"  # CUDA-only JIT kernel

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's sglang_m3, whatever the venv has registered

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from sglang_m3.attention import kernels, reference  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Per-rank shapes of one M3 sparse layer. Index heads == KV heads (M3: one selection per KV group)."""

    name: str
    hq: int
    hkv: int
    d: int = 128
    di: int = 128
    block: int = 128
    topk: int = 16
    init_blocks: int = 0
    local_blocks: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def sm_scale(self) -> float:
        return self.d ** -0.5


HEADS = {"tp1": Geometry("tp1", 64, 4), "tp8": Geometry("tp8", 8, 1)}
# --smoke: tiny stand-ins with the same head structure (several index heads per index-key head / a single one).
SMOKE_HEADS = {"tp1": Geometry("tp1-tiny", 4, 2, 32, 32, 16, 2, dtype=torch.float16),
               "tp8": Geometry("tp8-tiny", 4, 1, 32, 32, 16, 2, dtype=torch.float16)}
SMOKE_BS, SMOKE_CTX = (1, 3), (40, 100)
# Per-request lengths of a smoke decode batch (the first bs of them): the context, then the dense/sparse boundary
# (topk * block = 32 tokens: 32 is dense, 33 the first sparse length), a block boundary (17) and a lone token.
SMOKE_DECODE_LENS = {40: (40, 32, 1), 100: (100, 33, 17)}
SMOKE_PREFILL = ((60, 20), (40, 40))  # (seq_len, new tokens) per request: one with a cached prefix, one fresh
SMOKE_ATOL = 5e-3  # fp16 outputs of |x| <~ 2; the in-tree rounds split-K partials to fp16 before merging


def decode_bytes_needed(bs: int, context: int, geo: Geometry) -> int:
    """HBM bytes one decode step of one sparse layer must move at least, over the batch.

    Per request with ``context`` visible tokens (the new one included):
      * the index key of every visible token: context * Di * elt (one shared index-key head; 256 B at bf16),
      * K and V of the selected tokens: min(context, topk * block) tokens per KV head, each KV head
        selecting its own blocks: 2 * Hkv * min(context, topk * block) * D * elt,
      * the new token's writes: its K and V (Hkv heads each) and its index key.
    Not counted (so this is a lower bound): queries, outputs, req_to_token reads (4 B per visible token,
    1.6% of the index-key bytes at bf16), scratch traffic.
    """
    elt = torch.finfo(geo.dtype).bits // 8
    selected = min(context, geo.topk * geo.block)
    per_request = (context * geo.di + 2 * geo.hkv * selected * geo.d + 2 * geo.hkv * geo.d + geo.di) * elt
    return bs * per_request


# ----------------------------------------------------------------------------------------------------------------
# inputs: one paged cache + metadata shared by both implementations
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """SGLang layout. Request i owns seq_lens[i] tokens, the last ext_lens[i] of them new (written by the step)."""

    seq_lens_list: list
    ext_lens_list: list
    context_len: int  # req_to_token width (the server's --context-length)
    req_to_token: torch.Tensor  # int32 [rows, context_len]
    req_pool_indices: torch.Tensor  # int64 [bs]
    seq_lens: torch.Tensor  # int64 [bs]
    extend_seq_lens: torch.Tensor  # int32 [bs]
    extend_start_loc: torch.Tensor  # int32 [bs]
    out_cache_loc: torch.Tensor  # int64 [T] slots of the new tokens
    k_cache: torch.Tensor  # [slots, Hkv, D]
    v_cache: torch.Tensor  # [slots, Hkv, D]
    index_k_cache: torch.Tensor  # [slots, Di] (the in-tree kernels take the [slots, 1, Di] view)
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] new tokens' K / V / index key
    v: torch.Tensor
    index_q: torch.Tensor  # [T, Hkv, Di]
    index_k: torch.Tensor  # [T, Di]

    @property
    def bs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.q.shape[0]


def cache_bytes(geo: Geometry, total_tokens: int) -> int:
    elt = torch.finfo(geo.dtype).bits // 8
    return (total_tokens + 1) * (2 * geo.hkv * geo.d + geo.di) * elt


def make_batch(geo: Geometry, seq_lens, ext_lens, *, context_len: int, device, seed: int) -> Batch:
    """Random caches (every slot filled), slots a random permutation of 1..N (slot 0 is SGLang's padding slot),
    pool rows a random permutation. The new tokens' slots hold stale values until the step writes them."""
    assert max(seq_lens) <= context_len
    g = torch.Generator(device=device).manual_seed(seed)
    bs, n_tok, T = len(seq_lens), sum(seq_lens), sum(ext_lens)

    def randn(*shape):
        return torch.empty(shape, dtype=geo.dtype, device=device).normal_(generator=g)

    slots = torch.randperm(n_tok, generator=g, device=device).add_(1).to(torch.int32)
    rows = torch.randperm(bs + 2, generator=g, device=device)[:bs]
    r2t = torch.zeros(bs + 2, context_len, dtype=torch.int32, device=device)
    new_locs, off = [], 0
    for row, n, e in zip(rows.tolist(), seq_lens, ext_lens):
        r2t[row, :n] = slots[off: off + n]
        new_locs.append(slots[off + n - e: off + n])
        off += n
    ext = torch.tensor(ext_lens, dtype=torch.int32, device=device)
    return Batch(
        list(seq_lens), list(ext_lens), context_len, r2t, rows.to(torch.int64),
        torch.tensor(seq_lens, dtype=torch.int64, device=device), ext, torch.cumsum(ext, 0, dtype=torch.int32) - ext,
        torch.cat(new_locs).to(torch.int64),
        randn(n_tok + 1, geo.hkv, geo.d), randn(n_tok + 1, geo.hkv, geo.d), randn(n_tok + 1, geo.di),
        randn(T, geo.hq, geo.d), randn(T, geo.hkv, geo.d), randn(T, geo.hkv, geo.d),
        randn(T, geo.hkv, geo.di), randn(T, geo.di))


# ----------------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------------


def sglang_kv_store():
    """The K/V write of SGLang's MHATokenToKVPool.set_kv_buffer (our pool's base class): its ``store_cache`` JIT
    kernel on CUDA when it builds, else index_put (what _set_kv_buffer_impl falls back to)."""
    if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        from sglang.kernels.ops.kvcache.kvcache import can_use_store_cache, store_cache

        def store(b: Batch):
            row = b.k_cache.shape[1] * b.k_cache.shape[2]
            if can_use_store_cache(row * b.k_cache.element_size()):
                store_cache(b.k.view(-1, row), b.v.view(-1, row), b.k_cache.view(-1, row), b.v_cache.view(-1, row),
                            b.out_cache_loc)
            else:
                b.k_cache[b.out_cache_loc], b.v_cache[b.out_cache_loc] = b.k, b.v
        return store

    def store_cpu(b: Batch):
        b.k_cache[b.out_cache_loc], b.v_cache[b.out_cache_loc] = b.k, b.v
    return store_cpu


class OursDecode:
    """Our decode path as M3SparseAttnBackend runs it under a captured decode graph (see kernels/__init__.py)."""

    def __init__(self, geo: Geometry, b: Batch, kv_store):
        self.geo, self.b, self.kv_store = geo, b, kv_store
        dev = b.q.device
        # init_cuda_graph_state: compile every variant and size the scratch before capture, then freeze.
        self.ws = kernels.MSAWorkspace(dev)
        kernels.warmup(self.ws, batch_sizes=[b.bs], num_q_heads=geo.hq, num_kv_heads=geo.hkv, head_dim=geo.d,
                       head_dim_v=geo.d, index_dim=geo.di, block_size=geo.block, topk_blocks=geo.topk,
                       init_blocks=geo.init_blocks, local_blocks=geo.local_blocks, dtype=geo.dtype, device=dev,
                       context_len=b.context_len)
        self.ws.freeze()
        self.block_topk = torch.full((b.bs, geo.hkv, geo.topk), -1, dtype=torch.int32, device=dev)
        self.out = torch.empty(b.bs, geo.hq, geo.d, dtype=geo.dtype, device=dev)
        self.meta = None

    def prepare(self):
        """init_forward_metadata_in_graph: once per forward, shared by every sparse layer."""
        b = self.b
        self.meta = kernels.prepare_meta(b.req_pool_indices, b.seq_lens, None, None, b.num_tokens,
                                         index_heads=self.geo.hkv, workspace=self.ws)

    def store(self):
        self.kv_store(self.b)
        kernels.store_index_k(self.b.index_k_cache, self.b.out_cache_loc, self.b.index_k)

    def indexer(self):
        geo, b = self.geo, self.b
        kernels.index_block_topk(b.index_q, b.index_k_cache, b.req_to_token, b.req_pool_indices, b.seq_lens,
                                 None, None, block_size=geo.block, topk_blocks=geo.topk,
                                 init_blocks=geo.init_blocks, local_blocks=geo.local_blocks,
                                 out=self.block_topk, meta=self.meta, workspace=self.ws)

    def attention(self):
        geo, b = self.geo, self.b
        kernels.sparse_attention(b.q, b.k_cache, b.v_cache, b.req_to_token, b.req_pool_indices, b.seq_lens,
                                 None, None, self.block_topk, block_size=geo.block, sm_scale=geo.sm_scale,
                                 out=self.out, meta=self.meta, workspace=self.ws)

    def stages(self) -> dict:
        return {"store": self.store, "indexer": self.indexer, "attention": self.attention}

    def layer(self) -> torch.Tensor:
        """_forward_sparse of one layer."""
        self.store()
        self.indexer()
        self.attention()
        return self.out


class OursPrefill:
    """Our eager extend path (M3SparseAttnBackend.forward_extend): scratch from the caching allocator."""

    def __init__(self, geo: Geometry, b: Batch, kv_store):
        self.geo, self.b, self.kv_store = geo, b, kv_store
        self.meta = kernels.prepare_meta(b.req_pool_indices, b.seq_lens, b.extend_seq_lens, b.extend_start_loc,
                                         b.num_tokens, index_heads=geo.hkv)  # per forward
        self.block_topk = None

    def layer(self) -> torch.Tensor:
        geo, b = self.geo, self.b
        self.kv_store(b)
        kernels.store_index_k(b.index_k_cache, b.out_cache_loc, b.index_k)
        self.block_topk = kernels.index_block_topk(
            b.index_q, b.index_k_cache, b.req_to_token, b.req_pool_indices, b.seq_lens, b.extend_seq_lens,
            b.extend_start_loc, block_size=geo.block, topk_blocks=geo.topk, init_blocks=geo.init_blocks,
            local_blocks=geo.local_blocks, meta=self.meta)
        return kernels.sparse_attention(
            b.q, b.k_cache, b.v_cache, b.req_to_token, b.req_pool_indices, b.seq_lens, b.extend_seq_lens,
            b.extend_start_loc, self.block_topk, block_size=geo.block, sm_scale=geo.sm_scale, meta=self.meta)


def reference_msa(geo: Geometry, b: Batch):
    """Our torch twins (the executable spec) on the same inputs, after the step's writes: (out, block_topk)."""
    meta = dict(req_to_token=b.req_to_token, req_pool_indices=b.req_pool_indices, seq_lens=b.seq_lens,
                extend_seq_lens=b.extend_seq_lens, extend_start_loc=b.extend_start_loc)
    sel = reference.index_block_topk(b.index_q, b.index_k_cache, **meta, block_size=geo.block,
                                     topk_blocks=geo.topk, init_blocks=geo.init_blocks,
                                     local_blocks=geo.local_blocks)
    out = reference.sparse_attention(b.q, b.k_cache, b.v_cache, **meta, block_topk=sel, block_size=geo.block,
                                     sm_scale=geo.sm_scale)
    return out, sel


# ----------------------------------------------------------------------------------------------------------------
# the in-tree peer (imported only when used)
# ----------------------------------------------------------------------------------------------------------------

INTREE_KERNEL_MODULES = (
    "sglang.kernels.ops.attention.minimax_sparse.decode.flash_with_topk_idx",
    "sglang.kernels.ops.attention.minimax_sparse.decode.topk_sparse",
    "sglang.kernels.ops.attention.minimax_sparse.prefill.flash_with_topk_idx",
    "sglang.kernels.ops.attention.minimax_sparse.prefill.topk_sparse",
)
INTREE_INDEXERS = ("flash_decode_with_topk_idx", "flash_prefill_with_topk_index")
RADIX_ENV = "SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX"
# --smoke tile sizes for the in-tree autotuned kernels (constraints: decode BLOCK_SIZE_N >= block, prefill
# BLOCK_SIZE_K >= block, top-k BLOCK_SIZE_K > next_pow2(topk)); kernels not listed keep their first config.
INTERPRETER_TILES = {
    "_decode_score_kernel": {"BLOCK_SIZE_N": 32},
    "_topk_index_partial_kernel": {"BLOCK_SIZE_K": 4},
    "_flash_attn_fwd_with_block_score_kernel": {"BLOCK_SIZE_Q": 16, "BLOCK_SIZE_K": 32},
    "_topk_index_kernel": {"BLOCK_SIZE_K": 4},
}


class InTree:
    """Adapter around SGLang 0.5.17's MiniMax-M3 sparse ops: calls them with the arguments its backend passes."""

    def __init__(self, device: torch.device, topk_mode: str = "auto"):
        from sglang.srt.layers.attention.minimax_sparse_ops import minimax_sparse

        self.ops = minimax_sparse  # minimax_sparse_decode / minimax_sparse_prefill, what the backend calls
        self.kv_store = sglang_kv_store()
        self.autotuners = list(_autotuners(INTREE_KERNEL_MODULES))
        self.fused_store = None
        self.paths = {}
        if device.type == "cuda":
            from sglang.srt.environ import envs

            if envs.SGLANG_OPT_USE_MINIMAX_FUSED_KV_INDEX_STORE.get():  # the pool's gate
                self.fused_store = _probe(self._load_fused_store, "fused store_kv_index JIT", self.paths, "store")
            radix = topk_mode != "triton" and _probe(lambda: self._probe_radix(device), "radix-select JIT",
                                                     self.paths, "topk")
            if topk_mode == "radix" and not radix:
                raise RuntimeError(f"--intree-topk radix: the JIT kernel is unavailable ({self.paths['topk']})")
            os.environ[RADIX_ENV] = "1" if radix else "0"
            if not radix and "topk" not in self.paths:
                self.paths["topk"] = "Triton two-stage top-k (--intree-topk triton)"
        else:
            os.environ[RADIX_ENV] = "0"
            self.paths = {"store": "separate stores (CPU: no JIT)", "topk": "Triton two-stage top-k (CPU: no JIT)"}
        if self.fused_store is None and "store" not in self.paths:
            self.paths["store"] = "separate stores"

    @staticmethod
    def _load_fused_store():
        from sglang.kernels.ops.kvcache.minimax_store_kv_index import store_kv_index

        dev = torch.device("cuda")
        x = torch.zeros(1, 128, dtype=torch.bfloat16, device=dev)
        cache = torch.zeros(2, 128, dtype=torch.bfloat16, device=dev)
        store_kv_index(x, x, cache, cache.clone(), x, cache.clone(), None, None,
                       torch.ones(1, dtype=torch.int64, device=dev), num_kv_heads=1, head_bytes=256)
        torch.cuda.synchronize()
        return store_kv_index

    @staticmethod
    def _probe_radix(device):
        from sglang.kernels.ops.attention.minimax_decode_topk import minimax_decode_topk

        minimax_decode_topk(torch.zeros(1, 1, 64, device=device), torch.full((1,), 4096, device=device), 128, 16)
        torch.cuda.synchronize()
        return True

    def reset_autotune(self):
        for at in self.autotuners:
            at.cache.clear()

    def pin_autotune_for_interpreter(self):
        """The interpreter cannot benchmark: one config per kernel. Tile sizes only change the work split, not
        the result; small tiles keep the interpreted bitonic sorts cheap and make the block loops iterate
        (block 16, blocks <= 7 in the smoke shapes), which exercises their cross-iteration merges."""
        for at in self.autotuners:
            first = at.configs[0]
            kw = INTERPRETER_TILES.get(at.base_fn.__name__, first.kwargs)
            at.configs = [triton.Config(kw, num_warps=first.num_warps, num_stages=first.num_stages)]

    def store(self, b: Batch):
        """MiniMaxSparseKVPool.set_fused_kv_index_buffer (index value disabled)."""
        if self.fused_store is not None:
            self.fused_store(b.k.flatten(1), b.v.flatten(1), b.k_cache.flatten(1), b.v_cache.flatten(1),
                             b.index_k, b.index_k_cache, None, None, b.out_cache_loc,
                             num_kv_heads=b.k_cache.shape[1], head_bytes=b.k_cache.shape[2] * b.k_cache.element_size())
        else:  # its fallback: set_kv_buffer + set_index_k_buffer
            self.kv_store(b)
            b.index_k_cache[b.out_cache_loc] = b.index_k

    def decode_layer(self, geo: Geometry, b: Batch, max_seqlen: int) -> torch.Tensor:
        """MiniMaxSparseAttnBackend.forward_decode of one sparse layer."""
        self.store(b)
        _, out = self.ops.minimax_sparse_decode(
            b.q, None, b.k_cache, b.v_cache, b.index_q, None, _as_index_heads(b.index_k_cache), None,
            b.req_to_token, b.req_pool_indices, b.seq_lens, max_seqlen, 1, geo.block, geo.topk, geo.init_blocks,
            geo.local_blocks, score_type="max", disable_index_value=True, dense_main_attn_fn=None, page_size=1,
            use_msa=False, msa_kv_indices=None, msa_plan=None)
        return out

    def prefill_layer(self, geo: Geometry, b: Batch) -> torch.Tensor:
        """MiniMaxSparseAttnBackend.forward_extend of one sparse layer (Hopper: use_msa False). Its per-layer
        metadata: Q-side cu_seqlens, int32 seq / prefix lengths, host-side max lengths."""
        self.store(b)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32, device=b.q.device),
                        b.extend_seq_lens.cumsum(0).to(torch.int32)])
        seq = b.seq_lens.to(torch.int32)
        _, out = self.ops.minimax_sparse_prefill(
            b.q, b.k_cache, b.v_cache, None, b.index_q, _as_index_heads(b.index_k_cache), None, None,
            b.req_to_token, b.req_pool_indices, cu, seq, seq - b.extend_seq_lens, max(b.ext_lens_list),
            max(b.seq_lens_list), 1, geo.block, geo.topk, geo.init_blocks, geo.local_blocks, score_type="max",
            disable_index_value=True, use_msa=False, seqlens_cpu=list(b.ext_lens_list))
        return out

    def with_selection(self, layer_call):
        """Run one ``decode_layer`` / ``prefill_layer`` call and also return the block selection its attention
        used, as [T, H, topk]: the op's indexer (step 1 of minimax_sparse_{decode,prefill}) is wrapped in the
        op's module namespace for the duration of the call; the wrapper only records its ``topk_idx`` output."""
        seen = []
        originals = {name: getattr(self.ops, name) for name in INTREE_INDEXERS}

        def spy(fn):
            def wrapper(*a, **k):
                res = fn(*a, **k)
                seen.append(res[1])  # (idx_o, topk_idx[, real_seq_lens]); topk_idx is [H, T, topk]
                return res
            return wrapper

        for name, fn in originals.items():
            setattr(self.ops, name, spy(fn))
        try:
            out = layer_call()
        finally:
            for name, fn in originals.items():
                setattr(self.ops, name, fn)
        (sel,) = seen
        return out, sel.permute(1, 0, 2)


def _as_index_heads(index_k_cache: torch.Tensor) -> torch.Tensor:
    """The in-tree index-key cache is a one-head KV buffer [slots, 1, Di]; ours is [slots, Di] -- same memory."""
    return index_k_cache.view(index_k_cache.shape[0], 1, index_k_cache.shape[1])


def _autotuners(module_names):
    from triton.runtime.autotuner import Autotuner

    seen = set()
    for name in module_names:
        for obj in vars(importlib.import_module(name)).values():
            while not isinstance(obj, Autotuner) and hasattr(obj, "fn"):  # Heuristics -> Autotuner -> JIT
                obj = obj.fn
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                yield obj


def _probe(fn, label, paths, key):
    try:
        out = fn()
        paths[key] = label
        return out
    except Exception as e:  # noqa: BLE001 -- any build/load failure means "use the fallback"
        paths[key] = f"fallback ({label} unavailable: {type(e).__name__}: {str(e)[:200]})"
        return None


# ----------------------------------------------------------------------------------------------------------------
# timing (CUDA)
# ----------------------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device, iters: int, flush_l2: bool):
        self.iters = iters
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        self.flush_buf = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device) if flush_l2 else None

    def _median_us(self, run, iters) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3

    def graph_us(self, graph: torch.cuda.CUDAGraph) -> float:
        for _ in range(3):
            graph.replay()
        return self._median_us(graph.replay, self.iters)

    def eager_us(self, fn, iters: int) -> float:
        return self._median_us(fn, iters)


def capture(fn) -> torch.cuda.CUDAGraph:
    """Warm up eagerly on a side stream (JIT compile, autotune), then capture one call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def copy_bandwidth(device, gib: float, iters: int = 10) -> float:
    """Bytes/s of a large device-to-device copy: 2 * bytes (read + write) / median time."""
    n = int(gib * 2 ** 30)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def fits(nbytes: int, device) -> tuple[bool, str]:
    free, _ = torch.cuda.mem_get_info(device)
    need = int(nbytes * 1.05) + (2 << 30)  # caches + scratch, graphs and allocator slack
    return need <= free, f"needs ~{need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free"


def sel_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    """(token, head) rows whose selected-block lists differ (both ascending, -1 padded)."""
    return int((a.to(torch.int32) != b.to(torch.int32)).any(dim=-1).sum())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark
# ----------------------------------------------------------------------------------------------------------------


def bench_decode(geo, bs, ctx, args, timer, intree, bandwidth, device):
    row = dict(heads=geo.name, hq=geo.hq, hkv=geo.hkv, bs=bs, context=ctx)
    nbytes = decode_bytes_needed(bs, ctx, geo)
    row.update(bytes_needed=nbytes, floor_us=nbytes / bandwidth * 1e6)
    ok, why = fits(cache_bytes(geo, bs * ctx), device)
    if not ok:
        row["skipped"] = why
        return row
    b = make_batch(geo, [ctx] * bs, [1] * bs, context_len=args.context_len, device=device, seed=args.seed)

    ours = OursDecode(geo, b, sglang_kv_store())
    ours.prepare()
    g_meta = capture(ours.prepare)
    g_ours = capture(ours.layer)
    row["ours_us"] = timer.graph_us(g_ours)
    row["ours_meta_us"] = timer.graph_us(g_meta)
    # Where our step's time goes: each stage captured and timed alone (same L2 flush), so the stage sum also
    # shows what the boundaries between them cost.
    for stage, fn in ours.stages().items():
        g = capture(fn)
        row[f"ours_{stage}_us"] = timer.graph_us(g)
        del g
    out_ours, sel_ours = ours.out.clone(), ours.block_topk.clone()
    del g_ours, g_meta

    if intree is not None:
        intree.reset_autotune()  # tune on this case's inputs (see the module docstring)
        g_in = capture(lambda: intree.decode_layer(geo, b, args.context_len))
        row["intree_us"] = timer.graph_us(g_in)
        del g_in
        out_in, sel_in = intree.with_selection(lambda: intree.decode_layer(geo, b, args.context_len))
        row["max_abs_ours_vs_intree"] = max_abs(out_ours, out_in)
        row["sel_mismatch_rows"] = sel_mismatch(sel_ours, sel_in)
    _rates(row, nbytes)
    del ours, b
    torch.cuda.empty_cache()
    return row


def _rates(row, nbytes):
    for side in ("ours", "intree"):
        if f"{side}_us" in row:
            t = row[f"{side}_us"]
            row[f"{side}_bytes_per_s"] = nbytes / (t * 1e-6)
            row[f"{side}_over_floor"] = t / row["floor_us"]
    if "intree_us" in row:
        row["speedup"] = row["intree_us"] / row["ours_us"]


def bench_prefill(geo, L, args, timer, intree, device):
    row = dict(heads=geo.name, hq=geo.hq, hkv=geo.hkv, prompt=L)
    ok, why = fits(cache_bytes(geo, L) + 4 * geo.hkv * L * (L // geo.block + 1), device)  # + in-tree score buffer
    if not ok:
        row["skipped"] = why
        return row
    b = make_batch(geo, [L], [L], context_len=max(args.context_len, L), device=device, seed=args.seed)
    ours = OursPrefill(geo, b, sglang_kv_store())
    out_ours = ours.layer()
    sel_ours = ours.block_topk
    torch.cuda.synchronize()
    row["ours_ms"] = timer.eager_us(ours.layer, args.prefill_iters) / 1e3
    if intree is not None:
        intree.reset_autotune()
        out_in, sel_in = intree.with_selection(lambda: intree.prefill_layer(geo, b))  # compiles + autotunes
        row["max_abs_ours_vs_intree"] = max_abs(out_ours, out_in)
        row["sel_mismatch_rows"] = sel_mismatch(sel_ours, sel_in)
        del out_in, sel_in
        torch.cuda.synchronize()
        row["intree_ms"] = timer.eager_us(lambda: intree.prefill_layer(geo, b), args.prefill_iters) / 1e3
        row["speedup"] = row["intree_ms"] / row["ours_ms"]
    for side in ("ours", "intree"):
        if f"{side}_ms" in row:
            row[f"{side}_tokens_per_s"] = L / (row[f"{side}_ms"] * 1e-3)
    del ours, b, out_ours, sel_ours
    torch.cuda.empty_cache()
    return row


def run_gpu(args, geos):
    device = torch.device("cuda", torch.cuda.current_device())
    intree = None if args.skip_intree else InTree(device, args.intree_topk)
    bandwidth = copy_bandwidth(device, args.copy_gib)
    print(f"device-to-device copy: {bandwidth / 1e12:.3f} TB/s ({args.copy_gib} GiB)", flush=True)
    timer = Timer(device, args.iters, not args.no_l2_flush)
    res = dict(copy_bandwidth_bytes_per_s=bandwidth, intree_paths=intree.paths if intree else None,
               decode=[], prefill=[])
    for geo in geos:
        for bs in args.bs:
            for ctx in args.ctx:
                row = bench_decode(geo, bs, ctx, args, timer, intree, bandwidth, device)
                res["decode"].append(row)
                print(_row_line(row), flush=True)
        for L in args.prefill:
            row = bench_prefill(geo, L, args, timer, intree, device)
            res["prefill"].append(row)
            print(_row_line(row), flush=True)
    return res


def _row_line(row) -> str:
    return "  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ----------------------------------------------------------------------------------------------------------------
# --smoke: CPU cross-check under the Triton interpreter
# ----------------------------------------------------------------------------------------------------------------


def _check(kind, geo, b, out_ours, sel_ours, out_in, sel_in):
    out_ref, sel_ref = reference_msa(geo, b)
    row = dict(kind=kind, heads=geo.name, seq_lens=b.seq_lens_list, new_tokens=b.ext_lens_list,
               sel_mismatch_ours_vs_intree=sel_mismatch(sel_ours, sel_in),
               sel_mismatch_ours_vs_ref=sel_mismatch(sel_ours, sel_ref),
               sel_mismatch_intree_vs_ref=sel_mismatch(sel_in, sel_ref),
               max_abs_ours_vs_intree=max_abs(out_ours, out_in),
               max_abs_ours_vs_ref=max_abs(out_ours, out_ref),
               max_abs_intree_vs_ref=max_abs(out_in, out_ref))
    row["ok"] = (all(v == 0 for k, v in row.items() if k.startswith("sel_mismatch"))
                 and all(v <= SMOKE_ATOL for k, v in row.items() if k.startswith("max_abs")))
    print(_row_line(row), flush=True)
    return row


def run_smoke(args, geos):
    import warnings

    # The in-tree kernels compute exp2(-inf - -inf) on fully masked lanes (then discard them); numpy warns.
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
    device = torch.device("cpu")
    intree = InTree(device)
    intree.pin_autotune_for_interpreter()
    rows = []
    for geo in geos:
        for bs in SMOKE_BS:
            for ctx in SMOKE_CTX:
                lens = list(SMOKE_DECODE_LENS[ctx][:bs])
                b = make_batch(geo, lens, [1] * bs, context_len=args.context_len, device=device, seed=args.seed + bs)
                ours = OursDecode(geo, b, sglang_kv_store())
                ours.prepare()
                out_ours = ours.layer().clone()
                out_in, sel_in = intree.with_selection(lambda: intree.decode_layer(geo, b, args.context_len))
                rows.append(_check("decode", geo, b, out_ours, ours.block_topk, out_in, sel_in))
        lens, ext = zip(*SMOKE_PREFILL)
        b = make_batch(geo, lens, ext, context_len=args.context_len, device=device, seed=args.seed)
        ours = OursPrefill(geo, b, sglang_kv_store())
        out_ours = ours.layer()
        out_in, sel_in = intree.with_selection(lambda: intree.prefill_layer(geo, b))
        rows.append(_check("prefill", geo, b, out_ours, ours.block_topk, out_in, sel_in))
    return dict(intree_paths=intree.paths, atol=SMOKE_ATOL, cases=rows, ok=all(r["ok"] for r in rows),
                max_abs_ours_vs_intree=max(r["max_abs_ours_vs_intree"] for r in rows),
                max_abs_ours_vs_ref=max(r["max_abs_ours_vs_ref"] for r in rows),
                max_abs_intree_vs_ref=max(r["max_abs_intree_vs_ref"] for r in rows),
                sel_mismatch_ours_vs_intree=sum(r["sel_mismatch_ours_vs_intree"] for r in rows))


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def markdown(res) -> str:
    env = res["env"]
    lines = [f"# MSA sparse-layer kernel benchmark ({'smoke' if res['smoke'] else 'GPU'})", "",
             f"device: {env['device']} · torch {env['torch']} · triton {env['triton']} · sglang {env['sglang']}", ""]
    if res["smoke"]:
        s = res["smoke_result"]
        lines += [f"in-tree paths: {s['intree_paths']}", "",
                  f"**{'PASS' if s['ok'] else 'FAIL'}** (atol {s['atol']}): max |ours − in-tree| "
                  f"{s['max_abs_ours_vs_intree']:.3e}, max |ours − reference| {s['max_abs_ours_vs_ref']:.3e}, "
                  f"max |in-tree − reference| {s['max_abs_intree_vs_ref']:.3e}; selection rows differing "
                  f"ours vs in-tree: {s['sel_mismatch_ours_vs_intree']}", "",
                  "| kind | heads | seq_lens | new | sel ≠ (ours/in-tree, ours/ref, in-tree/ref) "
                  "| max abs ours−in-tree | ours−ref | in-tree−ref |", "|---|---|---|---|---|---|---|---|"]
        for r in s["cases"]:
            lines.append(f"| {r['kind']} | {r['heads']} | {r['seq_lens']} | {r['new_tokens']} | "
                         f"{r['sel_mismatch_ours_vs_intree']}, {r['sel_mismatch_ours_vs_ref']}, "
                         f"{r['sel_mismatch_intree_vs_ref']} | {r['max_abs_ours_vs_intree']:.2e} | "
                         f"{r['max_abs_ours_vs_ref']:.2e} | {r['max_abs_intree_vs_ref']:.2e} |")
        return "\n".join(lines) + "\n"
    g = res["gpu"]
    lines += [f"device-to-device copy bandwidth: {g['copy_bandwidth_bytes_per_s'] / 1e12:.3f} TB/s · "
              f"in-tree paths: {g['intree_paths']} · L2 flushed between replays: {not res['args']['no_l2_flush']}",
              "", "## Decode (one sparse layer, CUDA-graph replay, median µs)", "",
              "| heads | bs | context | ours µs | in-tree µs | MB needed | floor µs | ours/floor | in-tree/floor "
              "| ours TB/s | in-tree TB/s | speed-up | max abs Δ | sel ≠ |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in g["decode"]:
        if "skipped" in r:
            lines.append(f"| {r['heads']} | {r['bs']} | {r['context']} | skipped: {r['skipped']} |")
            continue
        tb = lambda k: None if r.get(k) is None else r[k] / 1e12  # noqa: E731
        lines.append(
            f"| {r['heads']} | {r['bs']} | {r['context']} | {r['ours_us']:.1f} | {_f(r.get('intree_us'), '.1f')} | "
            f"{r['bytes_needed'] / 1e6:.1f} | {r['floor_us']:.1f} | {r['ours_over_floor']:.2f} | "
            f"{_f(r.get('intree_over_floor'), '.2f')} | {tb('ours_bytes_per_s'):.2f} | "
            f"{_f(tb('intree_bytes_per_s'), '.2f')} | {_f(r.get('speedup'), '.2f')} | "
            f"{_f(r.get('max_abs_ours_vs_intree'), '.1e')} | {r.get('sel_mismatch_rows', '—')} |")
    if g["prefill"]:
        lines += ["", "## Prefill (one prompt, one sparse layer, eager, median)", "",
                  "| heads | prompt | ours ms | in-tree ms | ours tok/s | in-tree tok/s | speed-up | max abs Δ | sel ≠ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in g["prefill"]:
            if "skipped" in r:
                lines.append(f"| {r['heads']} | {r['prompt']} | skipped: {r['skipped']} |")
                continue
            lines.append(
                f"| {r['heads']} | {r['prompt']} | {r['ours_ms']:.2f} | {_f(r.get('intree_ms'), '.2f')} | "
                f"{r['ours_tokens_per_s']:.3g} | {_f(r.get('intree_tokens_per_s'), '.3g')} | "
                f"{_f(r.get('speedup'), '.2f')} | {_f(r.get('max_abs_ours_vs_intree'), '.1e')} | "
                f"{r.get('sel_mismatch_rows', '—')} |")
    lines += ["", "Floor = bytes needed (index keys of every visible token + K/V of min(context, topk·block) "
              "tokens per KV head + the new token's K/V/index-key writes) / copy bandwidth. "
              "`ours_meta_us` (per-forward metadata, shared by all sparse layers) and `ours_{store,indexer,attention}_us` "
              "(each stage captured alone) are in the JSON."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="tp1,tp8", help="comma list of: " + ", ".join(HEADS))
    p.add_argument("--bs", type=ints, default=[1, 8, 32, 128])
    p.add_argument("--ctx", type=ints, default=[4096, 32768, 131072])
    p.add_argument("--prefill", type=ints, default=[32768, 131072], help="prompt lengths ('' for none)")
    p.add_argument("--skip-intree", action="store_true")
    p.add_argument("--iters", type=int, default=100, help="graph replays per decode case")
    p.add_argument("--prefill-iters", type=int, default=5)
    p.add_argument("--context-len", type=int, default=None,
                   help="server --context-length: req_to_token width and the in-tree's captured max_seqlen "
                        "(default: the largest --ctx)")
    p.add_argument("--intree-topk", choices=("auto", "radix", "triton"), default="auto")
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--no-l2-flush", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU interpreter cross-check on tiny shapes (no timing)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = p.parse_args(argv)
    names = [h for h in args.heads.split(",") if h]
    geos = [(SMOKE_HEADS if args.smoke else HEADS)[h] for h in names]
    if args.context_len is None:
        args.context_len = max(SMOKE_CTX) if args.smoke else max(args.ctx)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke for the CPU cross-check")

    import sglang

    t0 = time.perf_counter()
    env = dict(device="cpu (TRITON_INTERPRET=1)" if args.smoke else torch.cuda.get_device_name(),
               torch=torch.__version__, triton=triton.__version__, sglang=sglang.__version__)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | sglang {env['sglang']}",
          flush=True)
    res = dict(env=env, smoke=args.smoke, args={k: v for k, v in vars(args).items()}, geometries=[
        {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(g).items()} for g in geos])
    if args.smoke:
        torch.manual_seed(args.seed)
        res["smoke_result"] = run_smoke(args, geos)
    else:
        res["gpu"] = run_gpu(args, geos)
    res["elapsed_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_decode_smoke" if args.smoke else "kernel_decode"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and .md ({res['elapsed_s']:.0f} s)")
    if args.smoke and not res["smoke_result"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
