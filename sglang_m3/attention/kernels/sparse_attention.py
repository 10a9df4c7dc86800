"""Block-sparse attention over the selected key blocks, in Triton. Twin: reference.sparse_attention.

Every query token attends to at most topk x block_size keys of its own KV group, so extend is
treated exactly like decode: one program per (token, KV head[, split]) and no causal tiling over
query tokens. Design:
  * all query heads of the KV group (16 at TP1, 8 on a TP8 rank) are the M dimension of the tile,
    padded to >= 16 for tl.dot: each K/V block gathered from the paged cache is read once for the
    whole group (GQA) -- K/V traffic is the cost of this kernel;
  * key tile = one selected block (block_size keys), gathered through req_to_token; -1 entries,
    ids beyond the token's visible blocks and duplicate ids are masked (branch-free, so the loop
    body stays a straight line the compiler can software-pipeline); the token-level causal mask
    j <= pos only bites inside the token's own block;
  * online softmax in fp32 (exp2 with log2(e) folded into the scale); P is rounded to the V dtype
    for the P @ V tensor-core dot, as in FlashAttention;
  * splits: a small decode batch (T x Hkv programs << #SMs) would leave most SMs idle, so the
    block list is cut into n_splits slices, each producing an unnormalised partial (m, l, acc)
    that a second tiny kernel merges (one program per (token, query head), every split loaded at
    once). Large batches and extend use n_splits = 1 and write the output directly.

Graph safety: grid = (T, Hkv, n_splits), n_splits a function of (T, Hkv, topk) only; positions
and rows come from MSAMeta on the device.

Measured on one H200 (graph replay, bf16, D = 128, block 128, top-16): decode bs 256, 64 q / 4 kv
heads 0.27 ms = 4.0 TB/s of K+V; 8 q / 1 kv heads 81 us (3.3 TB/s); bs 1 (128K context) 14-17 us.
Extend, 8192 tokens after a 32K prefix: 4.1 ms (64/4 heads), 1.05 ms (8/1) -- every token re-reads
its 2048 keys; a query-tiled variant over the union of neighbouring tokens' blocks would cut that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import MSAMeta, MSAWorkspace

_LOG2E = 1.4426950408889634


# Batch-size-dependent integers are not specialised on (one compiled variant serves every captured batch size).
@triton.jit(do_not_specialize=["n_splits", "per_split"])
def _sparse_attn_kernel(
    q_ptr, stride_qt, stride_qh,                 # q [T, Hq, D]
    k_ptr, stride_ks, stride_kh,                 # k_cache [slots, Hkv, D]
    v_ptr, stride_vs, stride_vh,                 # v_cache [slots, Hkv, DV]
    r2t_ptr, stride_r2t,                         # req_to_token
    tok_row_ptr, tok_pos_ptr,                    # MSAMeta
    sel_ptr, stride_st, stride_sh,               # block_topk [T, Hkv, TOPK]
    out_ptr, stride_ot, stride_oh,               # out [T, Hq, DV] (n_splits == 1)
    pacc_ptr, pml_ptr,                           # partials: acc [T, Hq, S, DV], (m, l) [T, Hq, S, 2]
    n_splits, per_split, qk_scale, v_scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BN: tl.constexpr,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, DOT_F32: tl.constexpr, KV_WIDEN: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(tok_row_ptr + t)
    if row < 0:  # token owned by no request
        return
    pos = tl.load(tok_pos_ptr + t)
    nb = pos // BLOCK_SIZE + 1  # visible blocks

    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < GROUP
    qh = h * GROUP + offs_g
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, DV_PAD)
    dv_ok = offs_dv < DV
    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G, D]

    # Which list entries to use, decided once for the whole list (not per iteration): an id is used
    # iff 0 <= id < nb and no earlier entry holds the same id (duplicates count once). The verdicts
    # are packed into a 64-bit mask so the block loop only does a scalar bit test.
    sel_row = sel_ptr + t.to(tl.int64) * stride_st + h * stride_sh
    kcol = tl.arange(0, K_PAD)
    ids = tl.load(sel_row + kcol, mask=kcol < TOPK, other=-1)
    earlier = (ids[:, None] == ids[None, :]) & (kcol[None, :] < kcol[:, None])
    first = tl.max(earlier.to(tl.int32), axis=1) == 0
    use_vec = first & (ids >= 0) & (ids < nb)
    use_bits = tl.sum(tl.where(use_vec, tl.full([K_PAD], 1, tl.int64) << kcol.to(tl.int64), 0), axis=0)
    r2t_row = r2t_ptr + row.to(tl.int64) * stride_r2t
    k_head = k_ptr + h * stride_kh
    v_head = v_ptr + h * stride_vh
    offs_n = tl.arange(0, BN)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, TOPK)
    for i in range(lo, hi):
        b = tl.load(sel_row + i)
        use = ((use_bits >> i) & 1) != 0
        j = b * BLOCK_SIZE + offs_n
        kv = (offs_n < BLOCK_SIZE) & (j <= pos) & use
        slot = tl.load(r2t_row + j, mask=kv, other=0).to(tl.int64)
        k = tl.load(k_head + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=kv[:, None] & d_ok[None, :], other=0.0)  # [BN, D]
        if KV_WIDEN:  # e.g. an fp8 cache: widen to q's dtype (exact); k_scale is folded into qk_scale
            k = k.to(q.dtype)
        if DOT_F32:  # (inlined, not a helper: the interpreter pays ~ms per nested jit call)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # [G, BN], log2 domain
        s = tl.where(kv[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: avoid inf - inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + slot[:, None] * stride_vs + offs_dv[None, :],
                    mask=kv[:, None] & dv_ok[None, :], other=0.0)  # [BN, DV]
        if KV_WIDEN:  # so P is rounded to q's dtype below, never to fp8
            v = v.to(q.dtype)
        if DOT_F32:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc * v_scale  # fp8 V dequantized once per output, not per key (the merge is linear in acc)

    if n_splits == 1:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no usable key -> 0, like the twin
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + qh[:, None] * stride_oh + offs_dv[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])
    else:
        prow = ((t * (tl.num_programs(1) * GROUP) + qh) * n_splits + split).to(tl.int64)
        tl.store(pacc_ptr + prow[:, None] * DV + offs_dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(pml_ptr + prow * 2, m_i, mask=g_ok)
        tl.store(pml_ptr + prow * 2 + 1, l_i, mask=g_ok)


@triton.jit(do_not_specialize=["n_splits"])
def _sparse_attn_merge_kernel(
    tok_row_ptr, out_ptr, stride_ot, stride_oh, pacc_ptr, pml_ptr, n_splits,
    DV: tl.constexpr, DV_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    # One program per (token, query head): log-sum-exp merge of its split partials, all splits loaded at once
    # ([S_PAD, DV] tile) -- a loop over the splits would wait for one load round-trip per split, which is most
    # of this kernel's time at small batch (bs 1: 16 splits).
    # Tried and removed (9b53dff): no second launch -- the split finishing last for a (token, KV head), told by an
    # atomic ticket counter in the workspace, merged the partials. Outputs within bf16 rounding (max abs <= 4.9e-4),
    # but on one H200 (attention stage alone, us, launched vs fused; benchmarks/results/2026-11-30-h200-s6/
    # kernel_decode.md) slower where it was meant to help: bs 1, TP1 13.0 vs 15.5 (32K), 12.9 vs 15.4 (128K), TP8
    # 11.6 vs 13.3 (32K); TP8 bs 8 14.3 vs 16.2 (32K); TP1 bs >= 8 and TP8 bs >= 32 gained 0-3 us (TP1 bs 8 x
    # 32K 25.6 vs 24.6, bs 32 x 32K 53.4 vs 50.2; bs 128 about equal). Not used: the saved launch is cheap inside a
    # CUDA graph, while the fused tail (barrier, atomic, then one program per KV head reading every split of its
    # query heads) is serial -- a likely cause, not profiled.
    t = tl.program_id(0)
    qh = tl.program_id(1)
    if tl.load(tok_row_ptr + t) < 0:
        return
    s = tl.arange(0, S_PAD)
    s_ok = s < n_splits
    prow = ((t * tl.num_programs(1) + qh) * n_splits + s).to(tl.int64)  # [S]
    m_s = tl.load(pml_ptr + prow * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(pml_ptr + prow * 2 + 1, mask=s_ok, other=0.0)
    offs_dv = tl.arange(0, DV_PAD)
    dv_ok = offs_dv < DV
    a_s = tl.load(pacc_ptr + prow[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    m = tl.max(m_s, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # no usable key in any split: avoid inf - inf
    w = tl.exp2(m_s - m_use)  # [S]; 0 for empty splits
    l = tl.sum(w * l_s, axis=0)
    o = tl.sum(w[:, None] * a_s, axis=0) / tl.where(l > 0.0, l, 1.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + qh * stride_oh + offs_dv, o.to(out_ptr.dtype.element_ty),
             mask=dv_ok)


def attention_num_splits(num_tokens: int, kv_heads: int, topk: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, blocks per split): split the block list only when T x Hkv programs cannot fill
    the SMs; every split gets the same number of list entries."""
    target = common.ATTN_PROGRAMS_PER_SM * common.num_sms(device)
    want = max(1, min(topk, triton.cdiv(target, max(1, num_tokens * kv_heads))))
    per = triton.cdiv(topk, want)
    return triton.cdiv(topk, per), per


def sparse_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                     req_pool_indices: Tensor, seq_lens: Tensor, extend_seq_lens: Tensor | None,
                     extend_start_loc: Tensor | None, block_topk: Tensor, *, block_size: int,
                     sm_scale: float, out: Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                     meta: MSAMeta | None = None, workspace: MSAWorkspace | None = None,
                     num_splits: int | None = None) -> Tensor:
    """Triton twin of ``reference.sparse_attention`` (same arguments, result and ``out`` semantics).

    Extra keyword arguments as for ``index_block_topk`` (meta, workspace, num_splits). Returns
    [T, Hq, Dv] in q.dtype; accumulation is fp32, P is rounded to the V dtype for the P @ V dot.
    Caches of another dtype than q -- fp8 (float8_e4m3fn, --kv-cache-dtype fp8_e4m3) -- are widened to
    q.dtype on load (exact) and dequantized with the per-tensor k_scale / v_scale (host floats, so fixed
    in a captured graph): the dots run in q.dtype and P is rounded to q.dtype, never to fp8.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 3 or v_cache.dim() != 3:
        raise ValueError(f"k_cache/v_cache must be [num_slots, Hkv, D], got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    T, hq, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[2]
    if k_cache.shape[2] != d:
        raise ValueError(f"head dim mismatch: q has D={d}, k_cache has D={k_cache.shape[2]}")
    if v_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)} in slots/heads")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"k_scale ({k_scale}) and v_scale ({v_scale}) must be > 0")
    if block_topk.dim() != 3 or block_topk.shape[:2] != (T, hkv):
        raise ValueError(f"block_topk must be [T={T}, Hkv={hkv}, topk], got {tuple(block_topk.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if out is None:
        out = torch.zeros((T, hq, dv), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (T, hq, dv):
        raise ValueError(f"out must have shape {(T, hq, dv)}, got {tuple(out.shape)}")
    topk = block_topk.shape[2]
    if topk > 64:
        raise ValueError(f"block_topk lists of width {topk} > 64 are not supported by the Triton kernel")
    if T == 0 or topk == 0 or req_pool_indices.numel() == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_topk.stride(2) != 1:
        block_topk = block_topk.contiguous()
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or out.stride(2) != 1 or req_to_token.stride(1) != 1:
        raise ValueError("k_cache, v_cache, out and req_to_token need a contiguous last dimension")
    if meta is None:
        meta = common.prepare_meta(req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, T,
                                   index_heads=hkv, workspace=workspace)
    common.check_meta(meta, T)

    dev = q.device
    group = hq // hkv
    if num_splits is None:
        n_splits, per = attention_num_splits(T, hkv, topk, dev)
    else:
        per = triton.cdiv(topk, max(1, min(num_splits, topk)))
        n_splits = triton.cdiv(topk, per)
    if n_splits > 1:
        pacc = common.scratch(workspace, "attn.acc", (T, hq, n_splits, dv), torch.float32, dev)
        pml = common.scratch(workspace, "attn.ml", (T, hq, n_splits, 2), torch.float32, dev)
    else:
        pacc = pml = out
    g_pad = max(16, common.next_pow2(group))
    dv_pad = max(16, common.next_pow2(dv))
    _sparse_attn_kernel[(T, hkv, n_splits)](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1),
        v_cache, v_cache.stride(0), v_cache.stride(1),
        req_to_token, req_to_token.stride(0),
        meta.tok_row, meta.tok_pos,
        block_topk, block_topk.stride(0), block_topk.stride(1),
        out, out.stride(0), out.stride(1), pacc, pml,
        n_splits, per, float(sm_scale) * float(k_scale) * _LOG2E, float(v_scale),
        GROUP=group, G_PAD=g_pad, D=d, D_PAD=max(16, common.next_pow2(d)), DV=dv, DV_PAD=dv_pad,
        BLOCK_SIZE=block_size, BN=max(16, common.next_pow2(block_size)),
        TOPK=topk, K_PAD=max(2, common.next_pow2(topk)), DOT_F32=common.dot_in_fp32(q.dtype),
        KV_WIDEN=k_cache.dtype != q.dtype or v_cache.dtype != q.dtype,
        num_warps=4 if g_pad <= 16 else 8, num_stages=common.ATTN_NUM_STAGES)
    if n_splits > 1:
        _sparse_attn_merge_kernel[(T, hq)](
            meta.tok_row, out, out.stride(0), out.stride(1), pacc, pml, n_splits,
            DV=dv, DV_PAD=dv_pad, S_PAD=max(2, common.next_pow2(topk)), num_warps=2)
    return out


__all__ = ["sparse_attention", "attention_num_splits"]
