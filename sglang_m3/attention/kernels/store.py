"""Index-key cache write, in Triton. Twin: reference.store_index_k.

A row scatter: the twin's ``cache[loc] = index_k.to(cache.dtype)`` is two launches (cast + index_put)
when the dtypes differ; this kernel casts while storing, one launch, no temporary. Either way it is
bandwidth-trivial (T x Di elements) and graph safe (grid = T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common


@triton.jit
def _store_index_k_kernel(cache_ptr, stride_c, loc_ptr, src_ptr, stride_s,
                          DI: tl.constexpr, DI_PAD: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, DI_PAD)
    m = offs < DI
    slot = tl.load(loc_ptr + t).to(tl.int64)
    x = tl.load(src_ptr + t.to(tl.int64) * stride_s + offs, mask=m)
    tl.store(cache_ptr + slot * stride_c + offs, x.to(cache_ptr.dtype.element_ty), mask=m)


def store_index_k(index_k_cache: Tensor, loc: Tensor, index_k: Tensor) -> None:
    """Same contract as ``reference.store_index_k``: index_k [T, Di] or [T, 1, Di] -> cache[loc].

    Duplicate slots in ``loc`` (e.g. padded tokens all writing slot 0) get one of the rows, as with
    index_put. fp8 caches fall back to the torch path (Triton's fp8 rounding may differ from torch).
    """
    if index_k_cache.dim() != 2:
        raise ValueError(f"index_k_cache must be [num_slots, Di], got {tuple(index_k_cache.shape)}")
    if loc.dim() != 1:
        raise ValueError(f"loc must be 1-D [T], got {tuple(loc.shape)}")
    di = index_k_cache.shape[1]
    if index_k.dim() == 3:
        if index_k.shape[1] != 1:
            raise ValueError(f"index_k has {index_k.shape[1]} heads; M3 has ONE shared index-key head")
        index_k = index_k[:, 0]
    if index_k.dim() != 2 or tuple(index_k.shape) != (loc.numel(), di):
        raise ValueError(f"index_k must be [T={loc.numel()}, Di={di}] (or [T, 1, Di]), got {tuple(index_k.shape)}")
    if loc.numel() == 0:
        return
    if index_k_cache.element_size() == 1 or index_k_cache.stride(1) != 1:
        index_k_cache[loc] = index_k.to(index_k_cache.dtype)
        return
    if index_k.stride(1) != 1:
        index_k = index_k.contiguous()
    _store_index_k_kernel[(loc.numel(),)](
        index_k_cache, index_k_cache.stride(0), loc, index_k, index_k.stride(0),
        DI=di, DI_PAD=common.next_pow2(di), num_warps=1)
