"""Triton kernels of MiniMax Sparse Attention (MSA); torch twins in ``sglang_m3.attention.reference``.

Kernels (same signatures and semantics as their twins, plus optional keyword arguments):
  store_index_k(index_k_cache, loc, index_k)
  store_kv_index(k_cache, v_cache, index_k_cache, loc, k, v, index_k, *, k_scale=1.0, v_scale=1.0)
  store_kv(k_cache, v_cache, loc, k, v)                         (a dense layer's K/V rows, via M3KVPool)
  index_block_topk(index_q, index_k_cache, req_to_token, req_pool_indices, seq_lens,
                   extend_seq_lens, extend_start_loc, *, block_size, topk_blocks, init_blocks=0,
                   local_blocks=1, out=None, meta=None, workspace=None, num_splits=None,
                   two_pass=None) -> int32 [T, H, topk]
  sparse_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                   extend_seq_lens, extend_start_loc, block_topk, *, block_size, sm_scale,
                   out=None, k_scale=1.0, v_scale=1.0, meta=None, workspace=None, num_splits=None)
                   -> [T, Hq, Dv]   (fp8 K/V caches are widened to q's dtype and scaled on load)
Helpers:
  prepare_meta(req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, num_tokens, *,
               index_heads, workspace=None) -> MSAMeta   (once per forward, shared by all layers)
  MSAWorkspace(device)  grow-only named scratch buffers; warmup(...) sizes it and compiles.
  use_triton(tensor)    True on CUDA tensors, or anywhere under TRITON_INTERPRET=1.
  get_impl(tensor)      this module on such tensors, else ``reference`` (the CPU path).

Decode under a CUDA graph (extend_seq_lens = extend_start_loc = None means "decode": token i is
request i at position seq_lens[i] - 1):
  init_cuda_graph_state(max_bs):
      ws = MSAWorkspace(device)
      warmup(ws, batch_sizes=<every captured bs>, ...model shapes...,   # compiles every variant and
             context_len=req_to_token.shape[1])                         # sizes every buffer
      ws.freeze()
      topk_buf = torch.empty(max_bs, H_index, topk, dtype=int32)        # and the attention out buffer
  init_forward_metadata_in_graph(fb):   (captured; replays recompute it from the new seq_lens)
      meta = prepare_meta(fb.req_pool_indices, fb.seq_lens, None, None, bs, index_heads=H_index, workspace=ws)
  each sparse layer (captured):
      store_kv_index(...); index_block_topk(..., None, None, ..., out=topk_buf[:bs], meta=meta, workspace=ws)
      sparse_attention(..., None, None, topk_buf[:bs], ..., out=out_buf[:bs], meta=meta, workspace=ws)
Grids depend only on (bs, head counts, topk, block size); lengths, rows and slots are read on the
device, so replays with new lengths / slots / pool rows need nothing but the usual input copies.
No autotuning: configs are fixed by shape. Eager (extend) calls can pass workspace=None (scratch is
then taken from the torch caching allocator) or a second, unfrozen workspace -- never the frozen one
grown, since captured graphs hold its addresses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import MSAMeta, MSAWorkspace, interpret_mode, prepare_meta
from .indexer import index_block_topk
from .sparse_attention import sparse_attention
from .store import store_index_k, store_kv, store_kv_index

__all__ = ["store_index_k", "store_kv", "store_kv_index", "index_block_topk", "sparse_attention", "prepare_meta",
           "MSAMeta", "MSAWorkspace", "warmup", "use_triton", "get_impl"]


def use_triton(t: Tensor) -> bool:
    return t.is_cuda or interpret_mode()


def get_impl(t: Tensor):
    """Namespace with store_index_k / store_kv_index / index_block_topk / sparse_attention for tensors like ``t``."""
    import sys

    if use_triton(t):
        return sys.modules[__name__]
    from sglang_m3.attention import reference

    return reference


def warmup(workspace: MSAWorkspace, *, batch_sizes, num_q_heads: int, num_kv_heads: int,
           head_dim: int, head_dim_v: int, index_dim: int, block_size: int, topk_blocks: int,
           init_blocks: int = 0, local_blocks: int = 1, dtype: torch.dtype = torch.bfloat16,
           device: torch.device | str = "cuda", context_len: int | None = None,
           kv_dtype: torch.dtype | None = None) -> None:
    """Run the decode path once per batch size on dummy data (eager, before any capture).

    Compiles every kernel variant the captures will launch (the variants depend on shapes only)
    and grows ``workspace`` to the largest size any of those batch sizes needs. Touches no real
    cache. Pass every batch size that will be captured: split counts and the indexer variant (hence
    scratch sizes) depend on the batch size. ``context_len`` must be the width of the real
    req_to_token (``req_to_token_pool.req_to_token.shape[1]``): the two-pass indexer's block-score
    scratch has one entry per block of a row. The dummy requests themselves hold only
    min(context_len, 2 * topk * block_size + 1) tokens (enough to take the sparse code paths), which
    keeps the dummy caches small. Index heads == KV heads (M3: selection per KV group).
    ``dtype`` is the model dtype (q, index q/k); ``kv_dtype`` the K/V cache dtype (default ``dtype``;
    float8_e4m3fn for an fp8 KV cache, a separate kernel variant).
    """
    index_heads = num_kv_heads
    device = torch.device(device)
    n = min(context_len or 1 << 62, 2 * topk_blocks * block_size + 1)
    slots = n + 1
    r2t = torch.zeros(1, max(n, context_len or 0), dtype=torch.int32, device=device)
    r2t[0, :n] = torch.arange(n, dtype=torch.int32, device=device)
    ik_cache = torch.zeros(slots, index_dim, dtype=dtype, device=device)
    k_cache = torch.zeros(slots, num_kv_heads, head_dim, dtype=kv_dtype or dtype, device=device)
    v_cache = torch.zeros(slots, num_kv_heads, head_dim_v, dtype=kv_dtype or dtype, device=device)
    for bs in sorted(set(int(b) for b in batch_sizes)):
        rpi = torch.zeros(bs, dtype=torch.int64, device=device)
        seq = torch.full((bs,), n, dtype=torch.int64, device=device)
        meta = prepare_meta(rpi, seq, None, None, bs, index_heads=index_heads, workspace=workspace)
        iq = torch.zeros(bs, index_heads, index_dim, dtype=dtype, device=device)
        q = torch.zeros(bs, num_q_heads, head_dim, dtype=dtype, device=device)
        kn = torch.zeros(bs, num_kv_heads, head_dim, dtype=dtype, device=device)
        vn = torch.zeros(bs, num_kv_heads, head_dim_v, dtype=dtype, device=device)
        loc = torch.zeros(bs, dtype=torch.int64, device=device)  # (the padding slot)
        store_kv_index(k_cache, v_cache, ik_cache, loc, kn, vn, iq[:, 0])
        # the dense layers' K/V rows (M3KVPool), same shapes; an fp8 pool hands them over as uint8 bit patterns
        if k_cache.element_size() == 1:
            as_bits = [t.view(torch.uint8) for t in (k_cache, v_cache)]
            store_kv(*as_bits, loc, kn.to(k_cache.dtype).view(torch.uint8), vn.to(v_cache.dtype).view(torch.uint8))
        else:
            store_kv(k_cache, v_cache, loc, kn, vn)
        sel = index_block_topk(iq, ik_cache, r2t, rpi, seq, None, None, block_size=block_size,
                               topk_blocks=topk_blocks, init_blocks=init_blocks, local_blocks=local_blocks,
                               meta=meta, workspace=workspace)
        sparse_attention(q, k_cache, v_cache, r2t, rpi, seq, None, None, sel,
                         block_size=block_size, sm_scale=head_dim ** -0.5, meta=meta, workspace=workspace)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
