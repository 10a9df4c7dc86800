"""A tiny random EAGLE3 draft for a tiny MiniMax-M3 checkpoint (tests of speculative decoding).

    python -m sglang_m3.tiny_eagle3 DRAFT_DIR --target TINY_M3_DIR

Layout: that of the EAGLE3 drafts SGLang 0.5.17 loads as `LlamaForCausalLMEagle3` (models/llama_eagle3.py):
a Llama config (`architectures: ["LlamaForCausalLMEagle3"]`, one decoder layer) with `eagle_config
.eagle_aux_hidden_state_layer_ids` (the target layers whose output is captured; SGLang captures the stream entering
layer id + 1), `target_hidden_size` and `draft_vocab_size` (= the target's vocabulary: no hot-token map, so no
`d2t`/`t2d`). Tensors: `fc.weight [H, n_aux * H_target]`, `midlayer.*` (its q/k/v projections read
`[embedding ; fc output]`, 2H wide; `hidden_norm` normalises the fc output), `norm.weight`, `lm_head.weight
[V, H]`. No embedding: the draft takes the target's (`set_embed`). Weights are random, so drafts are mostly
rejected: the draft exercises the machinery (capture, draft, verify, accept), not the speed-up.
Why a writer and not a download: tests must not depend on a hub, and the hidden/vocab sizes must match the
tiny target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DRAFT_HEAD_DIM = 64


def draft_config(target: dict, *, aux_layer_ids: list[int] | None = None) -> dict:
    """The draft's config.json for a target text config (`hidden_size`, `vocab_size`, `num_hidden_layers`, ...)."""
    hidden, layers = target["hidden_size"], target["num_hidden_layers"]
    if aux_layer_ids is None:  # SGLang's default capture (2, L/2, L-3) expressed as draft ids (id + 1 = layer)
        aux_layer_ids = [1, layers // 2 - 1, layers - 4]
        if len(set(aux_layer_ids)) < 3 or aux_layer_ids[-1] < 0:  # too few layers: three distinct ones
            aux_layer_ids = list(range(min(3, layers)))
    if not all(0 <= i < layers for i in aux_layer_ids) or len(set(aux_layer_ids)) != len(aux_layer_ids):
        raise ValueError(f"aux layer ids {aux_layer_ids} must be distinct layers of the {layers}-layer target")
    heads = max(1, hidden // DRAFT_HEAD_DIM)
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "target_hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": target["max_position_embeddings"],
        "vocab_size": target["vocab_size"],
        "draft_vocab_size": target["vocab_size"],
        "tie_word_embeddings": False,
        "bos_token_id": target.get("bos_token_id"),
        "eos_token_id": target.get("eos_token_id"),
        "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux_layer_ids, "use_aux_hidden_state": True},
    }


def draft_tensors(cfg: dict, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random draft weights (std 0.02 linears, unit norms) named as EAGLE3 checkpoints name them."""
    g = torch.Generator().manual_seed(seed)
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, inter = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    n_aux = len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    shapes = {
        "fc.weight": (h, n_aux * cfg["target_hidden_size"]),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "lm_head.weight": (cfg["draft_vocab_size"], h),
    }
    out = {name: (torch.randn(shape, generator=g) * 0.02).to(dtype) for name, shape in shapes.items()}
    for name in ("midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                 "midlayer.post_attention_layernorm.weight", "norm.weight"):
        out[name] = torch.ones(h, dtype=dtype)  # plain (non-Gemma) Llama RMSNorm: weight 1 = identity scale
    return out


def write_tiny_eagle3(out_dir, target_dir, *, seed: int = 0, aux_layer_ids: list[int] | None = None) -> Path:
    """Write a draft matching the M3 checkpoint at target_dir (flat or VL packaging) and return its path.

    Raises FileNotFoundError if target_dir has no config.json.
    """
    from safetensors.torch import save_file

    cfg_path = Path(target_dir) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json in target {target_dir}")
    target = json.loads(cfg_path.read_text())
    target = target.get("text_config", target)
    cfg = draft_config(target, aux_layer_ids=aux_layer_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = draft_tensors(cfg, seed=seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m sglang_m3.tiny_eagle3", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--target", required=True, help="the tiny M3 checkpoint directory the draft serves")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-layers", type=lambda s: [int(x) for x in s.split(",")],
                    help="comma-separated eagle_aux_hidden_state_layer_ids (default: 1, L/2-1, L-4)")
    a = ap.parse_args(argv)
    out = write_tiny_eagle3(a.out_dir, a.target, seed=a.seed, aux_layer_ids=a.aux_layers)
    cfg = json.loads((out / "config.json").read_text())
    print(f"wrote {out} (EAGLE3 draft: hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}, aux layers "
          f"{cfg['eagle_config']['eagle_aux_hidden_state_layer_ids']})")
    return out


if __name__ == "__main__":
    main()
