"""Tensors of the tiny MiniMax-M3 checkpoints: the release's names, shapes and dtypes (M3_SPEC §4.1), random values
chosen to make the tiny model numerically interesting, and the MXFP8 form of the same values (M3_SPEC §4.3).
Used by `sglang_m3.tiny`.
"""

from __future__ import annotations

import math
import zlib

from sglang_m3.tiny_tokenizer import BYTE_TOKENS, PRINTABLE_BYTES


def text_tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name without ``language_model.``, shape, kind) for every text tensor of the release, in file order.

    kind is "fp32" for the router (gate weight and e_score_correction_bias, stored fp32 in the release)
    and "model" for everything stored in the checkpoint dtype. The count is
    3 + L·(2 + 6) + D·3 + S·(4 + 2 + 3·E + 3), D dense layers, S = L − D sparse layers, E experts.
    """
    H, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sp = cfg["sparse_attention_config"]
    n_idx, idx_dim = sp["sparse_num_index_heads"], sp["sparse_index_dim"]
    E, I, I_sh, I_dense = (cfg["num_local_experts"], cfg["intermediate_size"],
                           cfg["shared_intermediate_size"], cfg["dense_intermediate_size"])
    V = cfg["vocab_size"]

    specs = [("model.embed_tokens.weight", (V, H), "model")]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        sparse_attn = bool(sp["sparse_attention_freq"][l])
        moe = bool(cfg["moe_layer_freq"][l])
        specs += [
            (p + "input_layernorm.weight", (H,), "model"),
            (p + "post_attention_layernorm.weight", (H,), "model"),
            (p + "self_attn.q_proj.weight", (nq * hd, H), "model"),
            (p + "self_attn.k_proj.weight", (nkv * hd, H), "model"),
            (p + "self_attn.v_proj.weight", (nkv * hd, H), "model"),
            (p + "self_attn.o_proj.weight", (H, nq * hd), "model"),
            (p + "self_attn.q_norm.weight", (hd,), "model"),
            (p + "self_attn.k_norm.weight", (hd,), "model"),
        ]
        if sparse_attn:
            specs += [
                (p + "self_attn.index_q_proj.weight", (n_idx * idx_dim, H), "model"),
                (p + "self_attn.index_k_proj.weight", (idx_dim, H), "model"),  # one shared index-key head
                (p + "self_attn.index_q_norm.weight", (idx_dim,), "model"),
                (p + "self_attn.index_k_norm.weight", (idx_dim,), "model"),
            ]
        if moe:
            m = p + "block_sparse_moe."
            specs += [(m + "gate.weight", (E, H), "fp32"), (m + "e_score_correction_bias", (E,), "fp32")]
            for e in range(E):
                specs += [
                    (m + f"experts.{e}.w1.weight", (I, H), "model"),  # gate
                    (m + f"experts.{e}.w3.weight", (I, H), "model"),  # up
                    (m + f"experts.{e}.w2.weight", (H, I), "model"),  # down
                ]
            specs += [
                (m + "shared_experts.gate_proj.weight", (I_sh, H), "model"),
                (m + "shared_experts.up_proj.weight", (I_sh, H), "model"),
                (m + "shared_experts.down_proj.weight", (H, I_sh), "model"),
            ]
        else:
            specs += [
                (p + "mlp.gate_proj.weight", (I_dense, H), "model"),
                (p + "mlp.up_proj.weight", (I_dense, H), "model"),
                (p + "mlp.down_proj.weight", (H, I_dense), "model"),
            ]
    specs += [("model.norm.weight", (H,), "model"), ("lm_head.weight", (V, H), "model")]
    return specs


def vision_tensor_specs(vl_cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Released names of the vision tower, projector and patch-merge MLP (all of them, tiny sizes)."""
    vc = vl_cfg["vision_config"]
    vh, vi = vc["hidden_size"], vc["intermediate_size"]
    ps, tp = vc["patch_size"], vc["img_token_compression_config"]["temporal_patch_size"]
    merge = vc["img_token_compression_config"]["spatial_merge_size"]
    ph, th = vl_cfg["projector_hidden_size"], vl_cfg["text_config"]["hidden_size"]
    v = "vision_tower.vision_model."
    # patch_embedding is fp32 in the release (a Conv3d without bias); the rest follow the checkpoint dtype
    specs = [(v + "embeddings.patch_embedding.weight", (vh, vc["num_channels"], tp, ps, ps), "fp32")]
    specs += [(v + "pre_layrnorm.weight", (vh,), "ln_w"), (v + "pre_layrnorm.bias", (vh,), "bias")]
    for i in range(vc["num_hidden_layers"]):
        p = v + f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(p + f"self_attn.{proj}.weight", (vh, vh), "model"), (p + f"self_attn.{proj}.bias", (vh,), "bias")]
        for ln in ("layer_norm1", "layer_norm2"):
            specs += [(p + f"{ln}.weight", (vh,), "ln_w"), (p + f"{ln}.bias", (vh,), "bias")]
        specs += [
            (p + "mlp.fc1.weight", (vi, vh), "model"), (p + "mlp.fc1.bias", (vi,), "bias"),
            (p + "mlp.fc2.weight", (vh, vi), "model"), (p + "mlp.fc2.bias", (vh,), "bias"),
        ]
    specs += [
        ("multi_modal_projector.linear_1.weight", (ph, vh), "model"), ("multi_modal_projector.linear_1.bias", (ph,), "bias"),
        ("multi_modal_projector.linear_2.weight", (th, ph), "model"), ("multi_modal_projector.linear_2.bias", (th,), "bias"),
        ("patch_merge_mlp.linear_1.weight", (ph, th * merge * merge), "model"), ("patch_merge_mlp.linear_1.bias", (ph,), "bias"),
        ("patch_merge_mlp.linear_2.weight", (th, ph), "model"), ("patch_merge_mlp.linear_2.bias", (th,), "bias"),
    ]
    return specs


def _init_std(name: str, shape: tuple[int, ...], cfg: dict) -> tuple[float, float]:
    """(mean, std) of the random normal for one text tensor.

    Chosen so the tiny model is numerically interesting rather than "correctly initialised":
    - every projection keeps activations at unit scale (std 1/sqrt(fan_in)), so attention scores,
      index scores and router logits are O(1) and their orderings are decided by the data;
    - gate/up projections run at std 2.5/sqrt(fan_in), so a fraction of the SwiGLU-OAI inputs exceeds the
      ±7 clamp (the clamp is exercised, spec §2.5);
    - router logits O(1) and a correction bias of std 0.1 (~ the spread of the sigmoid scores), so expert
      choice varies per token and the bias changes some selections (it is selection-only, §2.7);
    - norm weights are small random offsets around 0 (Gemma form, w+1), q/k norms a bit sharper;
    - lm_head at std 3/sqrt(H): logits spread ~3, so greedy/sampled text is not flat noise.
    """
    fan_in = shape[-1] if len(shape) > 1 else 1
    H = cfg["hidden_size"]
    if name.endswith("norm.weight"):
        return (0.2, 0.1) if ("q_norm" in name or "k_norm" in name) else (0.0, 0.1)
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.1
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, 3.0 / math.sqrt(H)
    if name.endswith(("w1.weight", "w3.weight", "gate_proj.weight", "up_proj.weight")):
        return 0.0, 2.5 / math.sqrt(fan_in)
    if name.endswith(("w2.weight", "down_proj.weight")):
        return 0.0, 0.15 / math.sqrt(fan_in)  # the activations are large (gate/up std 2.5): MLP out rms ~0.7
    if name.endswith("o_proj.weight"):
        return 0.0, 0.7 / math.sqrt(fan_in)
    return 0.0, 1.0 / math.sqrt(fan_in)  # q/k/v, index_q/k, router gate


def _random_tensor(name: str, shape, mean: float, std: float, seed: int, dtype):
    """N(mean, std) that depends only on (seed, name): a 2-layer and a 4-layer checkpoint written with the
    same seed share their common tensors, and adding experts does not reshuffle the others."""
    import torch

    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean).to(dtype)


def is_ignored(name: str, ignored_layers: list[str]) -> bool:
    """Whether tensor `name`'s module is listed in a quantization_config's ignored_layers: the entry is the module,
    one of its parents, or a dotted run inside its path (the matching SGLang applies to module names)."""
    module = "." + name.rpartition(".")[0] + "."
    return any(("." + entry.strip(".") + ".") in module for entry in ignored_layers)


def is_quantized(name: str, shape: tuple[int, ...], kind: str, ignored_layers: list[str]) -> bool:
    """MXFP8 release: every 2-D weight stored in the checkpoint dtype, unless its module is ignored (M3_SPEC §4.3)."""
    return kind == "model" and len(shape) == 2 and name.endswith(".weight") and not is_ignored(name, ignored_layers)


def build_state_dict(cfg: dict, *, seed: int, dtype: str, vl_cfg: dict | None, n_tokens: int,
                     unused_token_ids: list[int], quantization_config: dict | None = None) -> dict:
    """All tensors, named as in the release (with the ``language_model.`` prefix iff ``vl_cfg``).

    With an MXFP8 `quantization_config` (tiny_config.mxfp8_quantization_config), each quantized text weight is the
    MXFP8 form of the same fp32 values the unquantized checkpoint rounds to `dtype`: float8_e4m3fn `weight`
    [N, K] plus uint8 `weight_scale_inv` [N, K/32] (sglang_m3.mxfp8.mxfp8_quantize).
    """
    import torch

    from sglang_m3.mxfp8 import mxfp8_quantize

    ignored = (quantization_config or {}).get("ignored_layers", [])

    model_dtype = getattr(torch, dtype)
    prefix = "language_model." if vl_cfg is not None else ""
    out = {}
    for name, shape, kind in text_tensor_specs(cfg):
        mean, std = _init_std(name, shape, cfg)
        t = _random_tensor(name, shape, mean, std, seed, torch.float32)
        if name == "lm_head.weight":
            # Ids the model should not emit get a zero row: padding ids beyond the tokenizer (vocab_size is
            # larger than the byte tokenizer), bytes other than printable ASCII and newline (a random model
            # would otherwise produce invalid UTF-8, which makes streamed text and string comparisons murky),
            # and the structural specials (BOD, role prefix, image/video placeholders). Their logit is 0 while
            # the others spread ~N(0, 3): greedy output (and top-k sampled output) is printable text. EOS, the
            # think tags and the tool-call namespace token keep real rows, so generation stops by itself now
            # and then and the reasoning/tool parsers see their tokens.
            t[n_tokens:] = 0
            t[unused_token_ids] = 0
            t[[b for b in range(BYTE_TOKENS) if b not in PRINTABLE_BYTES]] = 0
        if quantization_config is not None and is_quantized(name, shape, kind, ignored):
            out[prefix + name], out[prefix + name + "_scale_inv"] = mxfp8_quantize(t)
        else:
            out[prefix + name] = t.to(torch.float32 if kind == "fp32" else model_dtype)
    if vl_cfg is not None:
        for name, shape, kind in vision_tensor_specs(vl_cfg):
            if kind == "ln_w":
                t = torch.ones(shape)
            elif kind == "bias":
                t = _random_tensor(name, shape, 0.0, 0.02, seed, torch.float32)
            else:
                t = _random_tensor(name, shape, 0.0, 1.0 / math.sqrt(math.prod(shape[1:])), seed, torch.float32)
            out[name] = t.to(torch.float32 if kind == "fp32" else model_dtype)
    return out
