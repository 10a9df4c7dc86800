"""Which of this package's CUDA kernels a server runs as their torch twins instead: an oracle mode for locating a
numerical difference on the GPU (scripts/gpu_e2e.py's `ours_twins:...` servers), never a serving setting.

    SGLANG_M3_TORCH_TWINS=msa,moe      (comma list of PARTS, or "all"; unset or empty: the CUDA kernels everywhere)

  msa           the sparse layers' indexer, sparse attention and cache stores (attention/reference.py)
  qk_norm_rope  the per-head Gemma norms + partial RoPE (layers/qk_norm_rope.qk_norm_rope_torch)
  swiglu        the clamped SwiGLU of the dense MLP and the shared expert (layers/swiglu.swigluoai)
  moe           the routed experts (layers/moe.routed_experts_torch with its own routing, instead of SGLang's
                TopK + FusedMoE); bf16/fp32 experts without expert parallelism only

The msa and moe twins sync with the host (.tolist()), so they need --disable-cuda-graph: the attention backend
refuses decode-graph capture with them, naming this setting. Read when a layer or the attention backend is built
(once per server process). On CPU the twins are the only path.
"""

from __future__ import annotations

import os

ENV = "SGLANG_M3_TORCH_TWINS"
PARTS = ("msa", "qk_norm_rope", "swiglu", "moe")


def torch_twins(value: str | None = None) -> frozenset[str]:
    """The parts named by `value` (default: the SGLANG_M3_TORCH_TWINS environment variable).

    Raises ValueError naming the unknown part(s) and the valid ones."""
    raw = os.environ.get(ENV, "") if value is None else value
    names = {p.strip() for p in raw.split(",") if p.strip()}
    unknown = sorted(names - set(PARTS) - {"all"})
    if unknown:
        raise ValueError(f"{ENV}={raw!r}: unknown part(s) {unknown}; valid: {', '.join(PARTS)} or 'all'")
    return frozenset(PARTS) if "all" in names else frozenset(names)


# Twins that sync with the host and so cannot run inside a captured CUDA graph.
NOT_GRAPH_SAFE = ("msa", "moe")


def use_torch_twin(part: str) -> bool:
    """Whether `part` (one of PARTS) runs as its torch twin in this process. Raises ValueError on a bad setting."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    return part in torch_twins()
