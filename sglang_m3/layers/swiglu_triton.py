"""Triton kernel of `swiglu.swigluoai` (contract and formula there; M3_SPEC §2.5; the torch function is its twin).

The torch form runs as ~8 elementwise passes over [T, 2I] in fp32 (widen, two clamps, sigmoid, three products,
narrow): on one H200 at the 4-layer real-dimension model they took ~17 ms of a 32K prefill's 488 ms of GPU time and
~50 us of a 1.74 ms batch-1 decode step (benchmarks/results/2026-11-30-h200x2-s8/profile_32k.md). Here one program
per (row, column tile) reads gate and up once, computes in fp32 and writes the [T, I] result once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # columns per program (I = 3072 / TP for the shared expert, 12288 / TP for the dense MLP)


@triton.jit
def _swigluoai_kernel(x_ptr, stride_x, out_ptr, stride_o, inter, alpha, limit, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    gate = tl.load(x_ptr + t * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + inter + offs, mask=m, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    y = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    tl.store(out_ptr + t * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def swigluoai_triton(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    """`gate_up [T, 2I]` ([gate | up], last dim contiguous) -> `[T, I]` of its dtype, as `swiglu.swigluoai`.

    ValueError for a tensor that is not 2-D with an even, contiguous last dimension."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [T, 2I] with a contiguous last dim, got {tuple(gate_up.shape)} "
                         f"strides {gate_up.stride()}")
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        _swigluoai_kernel[(T, triton.cdiv(inter, BLOCK))](gate_up, gate_up.stride(0), out, out.stride(0), inter,
                                                          float(alpha), float(limit), BLOCK=BLOCK, num_warps=4)
    return out
