"""M3's MoE block (M3_SPEC §2.7): sigmoid router with a selection-only bias, top-k renormalised and scaled
routed experts, plus one unscaled shared expert.

On CUDA the routed experts run through SGLang's `FusedMoE` (Triton runner) with the clamped SwiGLU expressed
as `activation="silu", gemm1_alpha, gemm1_clamp_limit, gate_up_interleaved=False`. SGLang's CPU MoE fallback
cannot run that activation or layout, so on CPU the same weights go through `routed_experts_torch`, which
is also the oracle for the fused path.
"""

import torch
from torch import nn
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.moe.topk import TopK
from sglang.srt.utils import add_prefix, is_cuda

from sglang_m3.layers.swiglu import SwiGLUOAIMLP, swigluoai
from sglang_m3.torch_twins import ENV as TWINS_ENV
from sglang_m3.torch_twins import use_torch_twin


def route(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits → (weights [T, k] fp32 summing to 1, expert ids [T, k]).

    The correction bias only decides *which* experts win; the weights are the unbiased sigmoid scores,
    renormalised over the winners.
    """
    scores = torch.sigmoid(router_logits.float())
    _, ids = torch.topk(scores + correction_bias.float(), top_k, dim=-1)
    weights = scores.gather(-1, ids)
    return weights / (weights.sum(-1, keepdim=True) + 1e-20), ids


def routed_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                         ids: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Σ_j weights_j · Expert_{ids_j}(x) with stacked `w13 [E, 2I, H]` ([gate; up]) and `w2 [E, H, I]`.

    Loops over the experts that were actually chosen, so its cost follows the tokens, not E.
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        token, slot = (ids == expert).nonzero(as_tuple=True)
        h = swigluoai(x[token] @ w13[expert].t(), alpha, limit)
        out.index_add_(0, token, (h @ w2[expert].t()).float() * weights[token, slot, None])
    return out.to(x.dtype)


class M3MoE(nn.Module):
    def __init__(self, view, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
        self.top_k, self.routed_scaling_factor = view.top_k, view.routed_scaling_factor
        self.alpha, self.limit = view.swiglu_alpha, view.swiglu_limit
        # The checkpoint keeps router and bias in fp32; routing decisions are sensitive to bf16 rounding. Never
        # quantized (the MXFP8 release keeps them fp32 too).
        self.gate = ReplicatedLinear(view.hidden_size, view.num_experts, bias=False, params_dtype=torch.float32,
                                     prefix=add_prefix("gate", prefix))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(view.num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        # Sigmoid + selection-only bias is SGLang's biased *grouped* top-k with one group; the ungrouped
        # path ignores scoring_func and would route with a softmax.
        self.topk = TopK(top_k=view.top_k, layer_id=layer_id, use_grouped_topk=True, num_expert_group=1,
                         topk_group=1, renormalize=True, scoring_func="sigmoid",
                         correction_bias=self.e_score_correction_bias)
        self.experts = FusedMoE(
            num_experts=view.num_experts, hidden_size=view.hidden_size,
            intermediate_size=view.moe_intermediate_size, layer_id=layer_id, top_k=view.top_k,
            reduce_results=False, quant_config=quant_config, prefix=add_prefix("experts", prefix), activation="silu",
            gemm1_alpha=view.swiglu_alpha, gemm1_clamp_limit=view.swiglu_limit, gate_up_interleaved=False,
            # applied where the Triton runner sums the top-k experts' outputs (moe_sum_reduce): no extra pass
            routed_scaling_factor=view.routed_scaling_factor)
        # Shared expert and routed experts are summed before one all-reduce.
        self.shared_experts = SwiGLUOAIMLP(view.hidden_size, view.shared_intermediate_size, self.alpha, self.limit,
                                           prefix=add_prefix("shared_experts", prefix), reduce_results=False,
                                           quant_config=quant_config)
        fused = is_cuda() and not use_torch_twin("moe")
        if not fused and is_cuda() and (quant_config is not None or self.experts.num_local_experts != view.num_experts):
            raise ValueError(f"{TWINS_ENV} names moe: the torch experts read unquantized weights of every expert; "
                             "this server quantizes its experts or splits them over expert-parallel ranks")
        self.routed_experts = self.routed_experts_fused if fused else self.routed_experts_torch

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gate(x.float())
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shared expert first: the fused MoE kernel writes its result into `x`'s buffer (inplace).
        shared = self.shared_experts(x)
        routed = self.routed_experts(x, self.router_logits(x))  # already scaled by routed_scaling_factor
        return _all_reduce(routed + shared)

    def routed_experts_fused(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """SGLang's biased grouped top-k + Triton fused experts, times routed_scaling_factor; overwrites `x`."""
        return self.experts(x, self.topk(x, logits))

    def routed_experts_torch(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if getattr(self.experts, "use_intel_amx_backend", False):
            # SGLang repacks expert weights for AMX after loading when the real CPU sgl_kernel is present;
            # the torch experts read the plain [E, 2I, H] / [E, H, I] layout.
            raise RuntimeError("sglang-m3's CPU MoE needs unpacked expert weights, but SGLang packed them for "
                               "Intel AMX: run with this package's cpu_shim/ first on PYTHONPATH "
                               "(scripts/env.sh does), not the CPU build of sgl_kernel")
        weights, ids = route(logits, self.e_score_correction_bias, self.top_k)
        return routed_experts_torch(x, self.experts.w13_weight, self.experts.w2_weight, weights, ids,
                                    self.alpha, self.limit) * self.routed_scaling_factor


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    from sglang.srt.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x) if get_tensor_model_parallel_world_size() > 1 else x
