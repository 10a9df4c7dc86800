"""The clamped SwiGLU of M3 ("swigluoai", M3_SPEC §2.5) and the dense MLP built on it."""

import torch
from torch import nn
from sglang.srt.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from sglang.srt.utils import add_prefix

from sglang_m3.torch_twins import use_torch_twin


def swigluoai(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """`[.., 2I]` laid out [gate | up] (not interleaved) → `[.., I]`.

    Upper clamp only on the gate, symmetric clamp on up, `+1` on up (beta=1). Computed in fp32: the checkpoint
    was trained with fp32 elementwise math in fused kernels and bf16 rounding here costs accuracy for nothing.
    """
    gate, up = gate_up.float().chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (gate * torch.sigmoid(alpha * gate) * (up + 1.0)).to(gate_up.dtype)


class SwiGLUOAIMLP(nn.Module):
    """`down(swigluoai(gate(x), up(x)))`: the dense MLP of layers 0–2 and the shared expert (§2.6)."""

    def __init__(self, hidden_size: int, intermediate_size: int, alpha: float, limit: float,
                 prefix: str = "", reduce_results: bool = True, quant_config=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, quant_config=quant_config,
            prefix=add_prefix("gate_up_proj", prefix))
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, reduce_results=reduce_results, quant_config=quant_config,
            prefix=add_prefix("down_proj", prefix))
        self.alpha, self.limit = alpha, limit
        self.fused = not use_torch_twin("swiglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        if gate_up.is_cuda and self.fused:  # one fused pass (swiglu_triton); the torch form: its twin, the CPU path
            from sglang_m3.layers.swiglu_triton import swigluoai_triton

            act = swigluoai_triton(gate_up, self.alpha, self.limit)
        else:
            act = swigluoai(gate_up, self.alpha, self.limit)
        out, _ = self.down_proj(act)
        return out
