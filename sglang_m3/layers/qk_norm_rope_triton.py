"""Triton kernel of `qk_norm_rope.qk_norm_rope_` (contract and formula there; twin: `qk_norm_rope_torch`).

One program per (token, head): it reads its head twice (the channel and its rotation partner, the second read from
L1), normalises both in fp32 with the group's weight, rotates and stores once. Up to four groups, each its own
column start and weight; a program finds its group from the cumulative head counts (heads ordered by group).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _qk_norm_rope_kernel(y_ptr, stride_y, pos_ptr, cs_ptr, stride_cs,
                         w0, w1, w2, w3, s0, s1, s2, s3, e1, e2, e3, eps,
                         D: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    # group of head h: heads [0, e1) → 0, [e1, e2) → 1, [e2, e3) → 2, [e3, ...) → 3
    g1, g2, g3 = h >= e1, h >= e2, h >= e3
    is0, is1, is2, is3 = h < e1, g1 & (h < e2), g2 & (h < e3), g3
    start = tl.where(g3, s3 + (h - e3) * D, tl.where(g2, s2 + (h - e2) * D, tl.where(g1, s1 + (h - e1) * D, s0 + h * D)))
    offs = tl.arange(0, D_PAD)
    m = offs < D
    half: tl.constexpr = R // 2
    partner = tl.where(offs < half, offs + half, tl.where(offs < R, offs - half, offs))
    row = y_ptr + t.to(tl.int64) * stride_y + start
    x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
    xp = tl.load(row + partner, mask=m, other=0.0).to(tl.float32)
    rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)

    # the group's weight (masked loads: only one group's are fetched)
    w = (tl.load(w0 + offs, mask=m & is0, other=0.0).to(tl.float32)
         + tl.load(w1 + offs, mask=m & is1, other=0.0).to(tl.float32)
         + tl.load(w2 + offs, mask=m & is2, other=0.0).to(tl.float32)
         + tl.load(w3 + offs, mask=m & is3, other=0.0).to(tl.float32))
    wp = (tl.load(w0 + partner, mask=m & is0, other=0.0).to(tl.float32)
          + tl.load(w1 + partner, mask=m & is1, other=0.0).to(tl.float32)
          + tl.load(w2 + partner, mask=m & is2, other=0.0).to(tl.float32)
          + tl.load(w3 + partner, mask=m & is3, other=0.0).to(tl.float32))
    xn = x * rms * (1.0 + w)
    xpn = xp * rms * (1.0 + wp)

    pos = tl.load(pos_ptr + t).to(tl.int64)
    rot = offs < R
    i = tl.where(offs < half, offs, offs - half)
    c = tl.load(cs_ptr + pos * stride_cs + i, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(cs_ptr + pos * stride_cs + half + i, mask=rot, other=0.0).to(tl.float32)
    out = xn * c + tl.where(offs < half, -xpn, xpn) * s
    tl.store(row + offs, out.to(y_ptr.dtype.element_ty), mask=m)


def launch(y: Tensor, positions: Tensor, cos_sin_cache: Tensor, groups: Sequence[tuple[int, int, Tensor]],
           d: int, rotary_dim: int, eps: float) -> None:
    """Shapes already checked by `qk_norm_rope._check`; `d` the common head dim."""
    T = y.shape[0]
    total = sum(heads for _, heads, _ in groups)
    if T == 0 or total == 0:
        return
    starts = [start for start, _, _ in groups]
    weights = [w.contiguous() for _, _, w in groups]
    ends = [sum(heads for _, heads, _ in groups[:i + 1]) for i in range(len(groups))]
    while len(weights) < 4:  # unused groups: never selected (their first head is past the last one)
        weights.append(weights[-1])
        starts.append(starts[-1])
        ends.append(ends[-1])
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    _qk_norm_rope_kernel[(T, total)](
        y, y.stride(0), positions, cos_sin_cache, cos_sin_cache.stride(0),
        weights[0], weights[1], weights[2], weights[3], starts[0], starts[1], starts[2], starts[3],
        ends[0], ends[1], ends[2], float(eps),
        D=d, D_PAD=triton.next_power_of_2(d), R=rotary_dim, num_warps=1)
