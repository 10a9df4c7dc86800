"""M3's Gemma-style RMSNorm (M3_SPEC §2.2: y = x / sqrt(mean(x²) + eps) · (1 + w), fp32 math; with a residual,
residual ← x + residual first and y its norm) on kernels that need no compile step.

SGLang's `GemmaRMSNorm` is the layer (weights, loader, CPU path); on CUDA it calls sgl_kernel's `gemma_rmsnorm` /
`gemma_fused_add_rmsnorm`, which hand bf16/fp16 inputs to flashinfer's norm module. flashinfer (the `flashinfer-python`
wheel, no prebuilt JIT cache) builds that module with nvcc at its first use on a host: inside the first decode-graph
capture of a fresh host (benchmarks/cold_start.py times it). sgl_kernel ships the same FlashInfer-derived kernels
precompiled (`torch.ops.sgl_kernel.gemma_rmsnorm` / `gemma_fused_add_rmsnorm`, its own fallback when flashinfer is
missing): this subclass calls those on CUDA. Other dtypes and platforms keep SGLang's paths.
"""

from __future__ import annotations

import functools

import torch
from sglang.srt.layers.layernorm import GemmaRMSNorm

_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _pdl() -> bool:
    from sgl_kernel.utils import is_arch_support_pdl  # programmatic dependent launch (sm90+), as flashinfer decides

    return is_arch_support_pdl()


class PrecompiledGemmaRMSNorm(GemmaRMSNorm):
    """`GemmaRMSNorm(hidden_size, eps)`: x [..., hidden] (or [T, hidden] with residual [T, hidden]) in its dtype;
    returns y, or (y, residual') with the fused residual add (both written in place, as SGLang's CUDA path does)."""

    def forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                     post_residual_addition: torch.Tensor | None = None):
        if x.dtype not in _HALF:
            return super().forward_cuda(x, residual, post_residual_addition)
        if residual is not None:
            if post_residual_addition is not None:
                residual = residual + post_residual_addition
            torch.ops.sgl_kernel.gemma_fused_add_rmsnorm.default(x, residual, self.weight.data,
                                                                 self.variance_epsilon, _pdl())
            return x, residual
        rows = x.contiguous().reshape(-1, x.shape[-1])
        out = torch.empty_like(rows)
        torch.ops.sgl_kernel.gemma_rmsnorm.default(out, rows, self.weight.data, self.variance_epsilon, _pdl())
        return out.reshape(x.shape)
