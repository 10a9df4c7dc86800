"""How many layers of the real-dimension MiniMax-M3 fit on a host, per GPU, in bf16 (issue 12).

Per-rank weight bytes are summed over the release's tensor list (sglang_m3.tiny_weights.text_tensor_specs, the
real config of reference/m3_config_real.json with the layer count asked), each tensor divided the way
sglang_m3/model.py shards it at tensor-parallel size tp:
  - split by tp: embed_tokens / lm_head (vocab), q_proj / o_proj (query heads), dense MLP, shared expert and
    every routed expert (FusedMoE splits the expert width, all 128 experts on every rank);
  - per KV head (max(1, kv_heads / tp) of them per rank, replicated when tp > kv_heads): k_proj, v_proj, and
    index_q_proj (a rank keeps the index heads of its KV heads);
  - replicated: norms, index_k_proj (one shared index-key head), the router gate and its bias (fp32).
KV pool per token per rank: every layer's K and V for its KV heads, plus one index key (index_dim) per sparse layer
(sglang_m3/attention/pool.py), all bf16.

SGLang sizes the KV pool as (free memory after loading) - total * (1 - mem_fraction_static), so weights + CUDA
context / NCCL / all-reduce buffers + the pool must fit in total * mem_fraction_static; the rest is left for
activations and CUDA graphs. A layer count fits when that holds with a pool large enough for the largest
workload's concurrent tokens.

    python benchmarks/full_size.py --tp 2      # layers that fit on 2 x H200
    python benchmarks/full_size.py --tp 8 --layers 60
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BF16 = 2
H200_BYTES = 143771 * 2**20  # nvidia-smi's memory.total on the lent H200s (KINDS.md)
MEM_FRACTION_STATIC = 0.85   # benchmarks/e2e.py GPU_FLAGS
RUNTIME_OVERHEAD = 4 * 2**30  # CUDA context, NCCL and custom all-reduce buffers, cuBLAS workspace (allowance)
# The largest concurrent token count of the full-size workloads: 32768+256 tokens x 8 (128K x 2 is 262,656).
WORKLOAD_TOKENS = 8 * (32768 + 256)


def real_config(layers: int, dense_layers: int = 3) -> dict:
    from sglang_m3.tiny_config import build_text_config

    return build_text_config(real_dims=True, num_hidden_layers=layers, dense_layers=dense_layers)


def _shard(name: str, cfg: dict, tp: int) -> float:
    """The fraction of tensor `name` one rank holds at tensor-parallel size tp."""
    kv = cfg["num_key_value_heads"]
    if any(s in name for s in ("k_proj", "v_proj", "index_q_proj")) and "index_k_proj" not in name:
        return max(1, kv // tp) / kv
    if name.endswith(("norm.weight", "index_k_proj.weight", "gate.weight", "e_score_correction_bias")):
        return 1.0
    return 1.0 / tp


def rank_weight_bytes(cfg: dict, tp: int) -> int:
    """Weight bytes on one rank (lm_head included): bf16 tensors, fp32 router, sharded as the module docstring says."""
    from sglang_m3.tiny_weights import text_tensor_specs

    total = 0.0
    for name, shape, kind in text_tensor_specs(cfg):
        n = 1
        for d in shape:
            n *= d
        total += n * (4 if kind == "fp32" else BF16) * _shard(name, cfg, tp)
    return int(total)


def kv_bytes_per_token(cfg: dict, tp: int) -> int:
    """KV-pool bytes per token on one rank: K and V of its KV heads in every layer + one index key per sparse layer."""
    kv_heads = max(1, cfg["num_key_value_heads"] // tp)
    sparse = sum(cfg["sparse_attention_config"]["sparse_attention_freq"])
    return (cfg["num_hidden_layers"] * 2 * kv_heads * cfg["head_dim"]
            + sparse * cfg["sparse_attention_config"]["sparse_index_dim"]) * BF16


def budget(layers: int, tp: int, dense_layers: int = 3, gpu_bytes: int = H200_BYTES,
           mem_fraction: float = MEM_FRACTION_STATIC, tokens: int = WORKLOAD_TOKENS) -> dict:
    """Per-GPU bytes (GB = 1e9) of weights, runtime allowance and the workload's KV, against the static budget."""
    cfg = real_config(layers, dense_layers)
    w, kv = rank_weight_bytes(cfg, tp), kv_bytes_per_token(cfg, tp) * tokens
    static = mem_fraction * gpu_bytes
    return {"layers": layers, "dense_layers": min(dense_layers, layers), "tp": tp,
            "weights_gb": w / 1e9, "kv_gb": kv / 1e9, "runtime_gb": RUNTIME_OVERHEAD / 1e9,
            "static_budget_gb": static / 1e9, "kv_tokens_that_fit": int((static - w - RUNTIME_OVERHEAD)
                                                                          // kv_bytes_per_token(cfg, tp)),
            "fits": w + RUNTIME_OVERHEAD + kv <= static}


def layers_that_fit(tp: int, **kw) -> int:
    """The largest layer count (the release's first 3 dense, the rest MSA + MoE; at most 60) that fits."""
    best = 0
    for layers in range(1, 61):
        if budget(layers, tp, **kw)["fits"]:
            best = layers
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--layers", type=int, help="report this layer count (default: the largest that fits)")
    ap.add_argument("--mem-fraction-static", type=float, default=MEM_FRACTION_STATIC)
    a = ap.parse_args(argv)
    layers = a.layers or layers_that_fit(a.tp, mem_fraction=a.mem_fraction_static)
    one = budget(1, a.tp, mem_fraction=a.mem_fraction_static)
    per_moe = budget(4, a.tp)["weights_gb"] - budget(3, a.tp)["weights_gb"]
    b = budget(layers, a.tp, mem_fraction=a.mem_fraction_static)
    print(f"tp {a.tp}: per GPU, one MSA+MoE layer {per_moe:.2f} GB of bf16 weights "
          f"(embeddings + lm_head + layer 0: {one['weights_gb']:.2f} GB)")
    print(f"{layers} layers ({b['dense_layers']} dense): weights {b['weights_gb']:.1f} GB + runtime "
          f"{b['runtime_gb']:.1f} GB + KV for {WORKLOAD_TOKENS} tokens {b['kv_gb']:.1f} GB "
          f"{'<=' if b['fits'] else '>'} {a.mem_fraction_static} x {H200_BYTES / 1e9:.1f} GB = "
          f"{b['static_budget_gb']:.1f} GB; pool room {b['kv_tokens_that_fit']} tokens")


if __name__ == "__main__":
    main()
