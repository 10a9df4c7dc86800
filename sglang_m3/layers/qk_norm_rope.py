"""Per-head Gemma RMSNorm + partial NeoX RoPE of the projected queries and keys, in place, in one launch
(M3_SPEC §2.2, §2.4, §3.1): for every token and every head of each group (q, k, index q, index k),

    z ← z · rsqrt(mean(z²) + eps) · (1 + w)                  (fp32; w: the group's [D] norm weight, Gemma offset)
    z[i], z[i+R/2] ← z[i]·cos − z[i+R/2]·sin, z[i+R/2]·cos + z[i]·sin     for i < R/2 (R = rotary_dim)
    z[R:] unchanged                                           (cos/sin: the rotary embedding's cache row at pos)

rounded once to the tensor's dtype. The groups are column ranges of one projection output row (the fused
[q | k | v | index_q | index_k] of a sparse layer; v is not touched). This replaces four norm launches and two
RoPE launches per sparse layer (two and one on dense layers) and the copies that made the split views contiguous.

`qk_norm_rope_` runs the Triton kernel on CUDA tensors and `qk_norm_rope_torch` (its twin: CPU path and test
oracle) elsewhere. The cos/sin values are SGLang's own `RotaryEmbedding.cos_sin_cache` rows ([max_pos, R]:
cos | sin, fp32 on CUDA), so the rotation uses exactly the numbers SGLang's RoPE kernels use.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Group = tuple[int, int, Tensor]  # (first column, number of heads, norm weight [D])


def _check(y: Tensor, positions: Tensor, cos_sin_cache: Tensor, groups: Sequence[Group], rotary_dim: int) -> int:
    """The common head dim D of `groups`; raises ValueError on inconsistent shapes."""
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"y must be [T, N] with unit column stride, got {tuple(y.shape)} strides {y.stride()}")
    if positions.dim() != 1 or positions.numel() != y.shape[0]:
        raise ValueError(f"positions must be [T={y.shape[0]}], got {tuple(positions.shape)}")
    if not 1 <= len(groups) <= 4:
        raise ValueError(f"1 to 4 groups, got {len(groups)}")
    dims = {w.numel() for _, _, w in groups}
    if len(dims) != 1:
        raise ValueError(f"groups of one call share the head dim, got {sorted(dims)}")
    d = dims.pop()
    if rotary_dim % 2 or not 0 < rotary_dim <= d or cos_sin_cache.shape[-1] != rotary_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even, ≤ head dim {d} and the cache's width "
                         f"{cos_sin_cache.shape[-1]}")
    for start, heads, _ in groups:
        if start < 0 or start + heads * d > y.shape[1]:
            raise ValueError(f"group of {heads} heads × {d} at column {start} exceeds the row width {y.shape[1]}")
    return d


def qk_norm_rope_torch(y: Tensor, positions: Tensor, cos_sin_cache: Tensor, groups: Sequence[Group],
                       rotary_dim: int, eps: float) -> None:
    """Twin of the Triton kernel (same contract as `qk_norm_rope_`), fp32 math, one rounding to y's dtype."""
    d = _check(y, positions, cos_sin_cache, groups, rotary_dim)
    T, half = y.shape[0], rotary_dim // 2
    cos, sin = cos_sin_cache.index_select(0, positions.long()).float().chunk(2, dim=-1)  # [T, R/2] each
    cos, sin = cos[:, None], sin[:, None]
    for start, heads, w in groups:
        cols = slice(start, start + heads * d)
        z = y[:, cols].float().view(T, heads, d)
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())
        a, b = z[..., :half], z[..., half:rotary_dim]
        z = torch.cat([a * cos - b * sin, b * cos + a * sin, z[..., rotary_dim:]], dim=-1)
        y[:, cols] = z.reshape(T, heads * d).to(y.dtype)


def qk_norm_rope_(y: Tensor, positions: Tensor, cos_sin_cache: Tensor, groups: Sequence[Group],
                  rotary_dim: int, eps: float) -> None:
    """Normalise and rotate, in place, the heads of `groups` in `y` [T, N] (any float dtype; rows may be strided).

    positions [T] (int32/int64, each < cos_sin_cache rows: not checked on CUDA, as in SGLang's RoPE kernels);
    cos_sin_cache [max_pos, rotary_dim] (cos | sin); groups: 1-4 of (first column, heads, norm weight [D]), all
    with one head dim D (≥ rotary_dim). Raises ValueError on inconsistent shapes. Graph safe (grid = T × heads).
    """
    if not y.is_cuda:
        qk_norm_rope_torch(y, positions, cos_sin_cache, groups, rotary_dim, eps)
        return
    from sglang_m3.layers import qk_norm_rope_triton

    qk_norm_rope_triton.launch(y, positions, cos_sin_cache, groups, _check(y, positions, cos_sin_cache, groups,
                                                                           rotary_dim), rotary_dim, eps)
