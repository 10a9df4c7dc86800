"""Gemma RMSNorm (M3_SPEC §2.2) applied per head.

Every norm in M3 is Gemma style, `x̂·(1+w)` with the checkpoint storing the offset `w`. SGLang's
`GemmaRMSNorm` implements exactly that (and its fused residual form), so the residual-stream norms use it
directly; q/k/index norms share one `[head_dim]` weight across heads, which is the same op on a
`[tokens·heads, head_dim]` view.
"""

import torch
from sglang.srt.layers.layernorm import GemmaRMSNorm


class PerHeadGemmaRMSNorm(GemmaRMSNorm):
    """`qk_norm_type: per_head`: one `[head_dim]` weight normalises every head's vector independently."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__(head_dim, eps=eps)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, self.head_dim)).reshape(shape)
