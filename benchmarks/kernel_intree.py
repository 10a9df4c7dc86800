"""The in-tree peer of the MSA kernel benchmark: an adapter that calls SGLang 0.5.17's MiniMax-M3 sparse ops with the
arguments its backend passes (imported only when used; see kernel_decode.py's docstring for what it mirrors)."""

from __future__ import annotations

import importlib
import os

import torch
import triton

from kernel_inputs import Batch, Geometry
from kernel_ours import sglang_kv_store

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
        """MiniMaxSparseAttnBackend.forward_decode of one sparse layer. ``page_size`` is the pool's
        (minimax_sparse_backend.py:139,540); the op reads it only for the dense-main-attention decode
        (flash_with_topk_idx.py:974-984), which is off here as on a Hopper server: its gate
        SGLANG_OPT_USE_MINIMAX_DENSE_SPARSE_DECODE defaults to off (environ.py:1228) and the path serves trtllm_mha
        only (fa3, Hopper's M3 default: NotImplementedError, minimax_sparse_backend.py:448). So a larger page runs
        the same kernels on the paged slot layout of ``make_batch``; use_msa stays off (fmha_sm100 is SM100-only,
        msa.py:78)."""
        self.store(b)
        _, out = self.ops.minimax_sparse_decode(
            b.q, None, b.k_cache, b.v_cache, b.index_q, None, _as_index_heads(b.index_k_cache), None,
            b.req_to_token, b.req_pool_indices, b.seq_lens, max_seqlen, 1, geo.block, geo.topk, geo.init_blocks,
            geo.local_blocks, score_type="max", disable_index_value=True, dense_main_attn_fn=None,
            page_size=b.page_size, use_msa=False, msa_kv_indices=None, msa_plan=None)
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
