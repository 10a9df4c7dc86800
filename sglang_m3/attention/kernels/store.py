"""Cache writes of the new tokens, in Triton. Twins: reference.store_index_k, reference.store_kv_index,
reference.store_kv.

store_kv_index: K, V and the index key of each new token in ONE launch (a sparse layer's store; the pool's
set_kv_buffer and a separate index-key store were two launches, ~1-2 us each at small batch under a graph,
where the bytes moved are trivial: T x (Hkv x (D + Dv) + Di) elements). fp8 e4m3 K/V are divided by their
scales and rounded exactly as MHATokenToKVPool.set_kv_buffer does (torch's rounding, bit for bit).
store_index_k: the index key alone (a row scatter that casts while storing, one launch, no temporary).
store_kv: a dense layer's K/V rows (M3KVPool._store_kv_layer; SGLang's pool would use its JIT store_cache, whose
first use compiles with nvcc inside a cold decode-graph capture: benchmarks/cold_start.py).
All are graph safe (grid = T).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from sglang_m3.attention import reference

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


@triton.jit
def _e4m3fn_bits(x):
    """fp32 -> float8_e4m3fn bit pattern (int32 in [0, 255]) exactly as torch converts (c10's
    fp8e4m3fn_from_fp32_value): round to nearest even, |x| past 464 (and inf) -> NaN 0x7F, sign kept.
    Integer arithmetic, so the GPU and the interpreter agree with torch bit for bit (the hardware
    cvt saturates to 448 instead, and the interpreter's fp8 cast differs on subnormals)."""
    bits = x.to(tl.int32, bitcast=True)
    sign = tl.where(bits < 0, 0x80, 0)
    f = bits & 0x7FFFFFFF
    # below 2^-6 (e4m3 subnormals): adding 2^14 rounds |x| to a multiple of 2^-9 in the fp32 adder
    sub = (tl.abs(x) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    # normal: rebias the exponent (127 -> 7) and round the 20 dropped mantissa bits to nearest even
    nrm = (f - (120 << 23) + 0x7FFFF + ((f >> 20) & 1)) >> 20
    res = tl.where(f < (121 << 23), sub, nrm)
    res = tl.where(f >= (1087 << 20), 0x7F, res)  # 1087 << 20: the bits of 480.0f
    return res | sign


@triton.jit
def _to_cache(x, inv_scale, cache_ptr, FP8: tl.constexpr):
    # fp8: as MHATokenToKVPool.set_kv_buffer, divide by the scale in the source dtype (torch's div by a host
    # scalar multiplies by its fp32 reciprocal, then rounds; a scale of 1 changes nothing), then cast.
    if FP8:
        xf = x.to(tl.float32) * inv_scale
        if x.dtype == tl.bfloat16:  # nearest-even by hand: the interpreter's bf16 cast truncates
            bits = xf.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            xf = tl.where(xf != xf, xf, bits.to(tl.float32, bitcast=True))
        else:
            xf = xf.to(x.dtype).to(tl.float32)
        return _e4m3fn_bits(xf).to(tl.uint8)
    else:
        return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_index_kernel(
    k_cache_ptr, skc_s, skc_h, v_cache_ptr, svc_s, svc_h, ik_cache_ptr, sic_s,
    loc_ptr, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, ik_ptr, si_t, k_inv, v_inv,
    HKV: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, DI: tl.constexpr, DI_PAD: tl.constexpr,
    FP8: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    # One program per new token: its K and V rows (all KV heads) and its index key (sparse layers), one launch.
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    t64 = t.to(tl.int64)
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    m = (h < HKV) & (d < D)
    x = tl.load(k_ptr + t64 * sk_t + h * sk_h + d, mask=m)
    tl.store(k_cache_ptr + slot * skc_s + h * skc_h + d, _to_cache(x, k_inv, k_cache_ptr, FP8), mask=m)
    dv = tl.arange(0, DV_PAD)[None, :]
    m = (h < HKV) & (dv < DV)
    x = tl.load(v_ptr + t64 * sv_t + h * sv_h + dv, mask=m)
    tl.store(v_cache_ptr + slot * svc_s + h * svc_h + dv, _to_cache(x, v_inv, v_cache_ptr, FP8), mask=m)
    if HAS_INDEX:
        di = tl.arange(0, DI_PAD)
        m = di < DI
        x = tl.load(ik_ptr + t64 * si_t + di, mask=m)
        tl.store(ik_cache_ptr + slot * sic_s + di, x.to(ik_cache_ptr.dtype.element_ty), mask=m)


def store_kv_index(k_cache: Tensor, v_cache: Tensor, index_k_cache: Tensor, loc: Tensor, k: Tensor, v: Tensor,
                   index_k: Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Same contract as ``reference.store_kv_index``: K, V and the index key of T new tokens into their slots,
    one launch (grid = T, graph safe). k_cache/v_cache [slots, Hkv, D/Dv] at the model dtype or
    float8_e4m3fn (then K / k_scale, V / v_scale are rounded as the pool rounds them, bit for bit);
    index_k_cache [slots, Di] (model dtype). Duplicate slots get one of the rows (as index_put).
    """
    reference.check_store_kv_index(k_cache, v_cache, index_k_cache, loc, k, v, index_k, k_scale, v_scale)
    if index_k.dim() == 3:
        index_k = index_k[:, 0]
    if loc.numel() == 0:
        return
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:  # written as the pool stores them: uint8 bit patterns
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _launch(k_cache, v_cache, loc, k, v, (index_k_cache, index_k),
            float(np.float32(1.0) / np.float32(k_scale)), float(np.float32(1.0) / np.float32(v_scale)), fp8)


def store_kv(k_cache: Tensor, v_cache: Tensor, loc: Tensor, k: Tensor, v: Tensor) -> None:
    """Same contract as ``reference.store_kv``: a dense layer's K/V rows, already in the cache dtype, into their
    slots; one launch (grid = T, graph safe), the sparse layers' store without the index key."""
    reference.check_store_kv(k_cache, v_cache, loc, k, v)
    if loc.numel() == 0:
        return
    _launch(k_cache, v_cache, loc, k, v)


def _launch(k_cache: Tensor, v_cache: Tensor, loc: Tensor, k: Tensor, v: Tensor,
            index: tuple[Tensor, Tensor] | None = None, k_inv: float = 1.0, v_inv: float = 1.0, fp8: bool = False):
    """One _store_kv_index_kernel launch over T = loc.numel() > 0 tokens; ``index`` = (index_k_cache, index_k [T,
    Di]) for a sparse layer, None for a dense one. Makes the inner dimensions the kernel walks contiguous."""
    if loc.stride(0) != 1:  # the kernel reads slot t at loc_ptr + t
        loc = loc.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    ik_cache, ik = index if index is not None else (k_cache, k)  # (dead arguments without the index lane)
    if index is not None and ik.stride(1) != 1:
        ik = ik.contiguous()
    di = ik_cache.shape[1] if index is not None else 1
    hkv, d, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[2]
    _store_kv_index_kernel[(loc.numel(),)](
        k_cache, k_cache.stride(0), k_cache.stride(1), v_cache, v_cache.stride(0), v_cache.stride(1),
        ik_cache, ik_cache.stride(0), loc, k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), ik, ik.stride(0),
        k_inv, v_inv, HKV=hkv, H_PAD=common.next_pow2(hkv), D=d, D_PAD=common.next_pow2(d), DV=dv,
        DV_PAD=common.next_pow2(dv), DI=di, DI_PAD=common.next_pow2(di), FP8=fp8, HAS_INDEX=index is not None,
        num_warps=4)
