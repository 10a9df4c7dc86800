"""Write small MiniMax-M3 checkpoints in the *released* layout (tests, README demo, benchmarks).

    python -m sglang_m3.tiny OUT_DIR                      # VL-packaged tiny model, like the release
    python -m sglang_m3.tiny OUT_DIR --flat               # text-only packaging (model_type minimax_m3)
    python -m sglang_m3.tiny OUT_DIR --config-only --real-dims --layers 4 --dense-layers 1
                                                          # real widths, no weights (--load-format dummy)

Why a writer instead of a stored fixture: the loaders, the sparse attention and the chat plumbing must be
exercised against exactly what MiniMax ships (M3_SPEC.md §1 config, §4.1 tensor names/dtypes, §5 chat
format), at sizes that run on a laptop CPU in seconds. Everything is derived from one config dict, so a
test can ask for 1 KV head, 2 layers or a smaller block size and still get a coherent checkpoint.

What the output directory holds:
- ``config.json``: VL packaging (default) = top-level ``minimax_m3_vl`` config with a tiny ``vision_config``
  and the text fields under ``text_config``; flat packaging = the text config itself.
- ``model.safetensors`` (unless config-only): text tensors under ``language_model.`` (VL) or bare (flat),
  names and dtypes of §4.1 (router gate and ``e_score_correction_bias`` fp32, the rest ``dtype``), plus a
  complete tiny vision tower/projector in the VL packaging, so text-only loaders must skip it.
- ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``:
  a byte-level tokenizer (one token per byte) carrying M3's special strings, and a chat template that
  follows §5. Token ids are small (256..), so ``bos_token_id``/``eos_token_id`` in the configs are the
  tiny tokenizer's ids, not 200034/200020.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import zlib
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

# The released text_config (reference/m3_config_real.json), minus the per-layer lists, which are
# rebuilt for the requested layer count. Key order follows the release so a diff against it is readable.
REAL_TEXT_CONFIG: dict = {
    "hidden_size": 6144,
    "intermediate_size": 3072,
    "num_hidden_layers": 60,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 200064,
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-06,
    "use_gemma_norm": True,
    "attention_output_gate": False,
    "rope_theta": 5000000,
    "rotary_dim": 64,
    "partial_rotary_factor": 0.5,
    "hidden_act": "swigluoai",
    "use_qk_norm": True,
    "tie_word_embeddings": False,
    "dense_intermediate_size": 12288,
    "shared_intermediate_size": 3072,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "scoring_func": "sigmoid",
    "use_routing_bias": True,
    "moe_layer_freq": None,  # filled per layer count
    "qk_norm_type": "per_head",
    "num_mtp_modules": 7,
    "num_nextn_predict_layers": 1,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "routed_scaling_factor": 2.0,
    "sparse_attention_config": {
        "use_sparse_attention": True,
        "sparse_index_dim": 128,
        "sparse_num_index_heads": 4,
        "sparse_topk_blocks": 16,
        "sparse_block_size": 128,
        "sparse_disable_index_value": None,  # filled per layer count
        "sparse_score_type": "max",
        "sparse_init_block": 0,
        "sparse_local_block": 1,
        "sparse_attention_freq": None,  # filled per layer count
    },
    "architectures": ["MiniMaxM3SparseForCausalLM"],
}
REAL_DENSE_LAYERS = 3  # layers 0..2 of the release are dense attention + dense MLP

# Tiny defaults. Sizes keep every ratio that matters for kernels/layouts: GQA group > 1, partial rotary
# (half the head), index heads == KV heads, the real 128-token block, and top-k of only 2 blocks so that
# prompts longer than 256 tokens are genuinely sparse (with the real top-16, sparsity starts at 2048).
TINY_TEXT_OVERRIDES: dict = {
    "hidden_size": 128,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 512,
    "max_position_embeddings": 8192,
    "rotary_dim": 16,
    "dense_intermediate_size": 192,
    "shared_intermediate_size": 64,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "sparse_index_dim": 32,
    "sparse_topk_blocks": 2,
}
TINY_DENSE_LAYERS = 1

# Keys that live inside text_config["sparse_attention_config"]; overrides may name them at top level.
_SPARSE_KEYS = set(REAL_TEXT_CONFIG["sparse_attention_config"])
# Short aliases accepted as overrides (CLI flag names).
_ALIASES = {
    "layers": "num_hidden_layers",
    "num_layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "kv_heads": "num_key_value_heads",
    "num_experts": "num_local_experts",
    "experts_per_tok": "num_experts_per_tok",
    "topk_blocks": "sparse_topk_blocks",
    "block_size": "sparse_block_size",
    "index_dim": "sparse_index_dim",
    "index_heads": "sparse_num_index_heads",
    "init_blocks": "sparse_init_block",
    "local_blocks": "sparse_local_block",
}

# Tiny vision tower: a complete (1-layer, 16-wide) CLIP-style tower + projector in the released names, so
# the VL packaging has every kind of non-text tensor the release has. Real: hidden 1280, 32 layers.
TINY_VISION_CONFIG: dict = {
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "intermediate_size": 32,
    "patch_size": 14,
    "image_size": 28,
    "projection_dim": 32,
    "position_embedding_type": "rope",
    "rope_mode": "3d",
    "rope_theta": 10000.0,
    "attention_dropout": 0.0,
    "hidden_act": "gelu",
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_channels": 3,
    "vocab_size": 32000,
    "img_token_compression_config": {
        "image_token_compression_method": "patch_merge",
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_segment_max_frames": 4,
}


# The release's vision_config (used with real_dims so a dummy-weight VL model has the real tower shape).
REAL_VISION_CONFIG: dict = {
    **TINY_VISION_CONFIG,
    "hidden_size": 1280,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "intermediate_size": 5120,
    "image_size": 2016,
    "projection_dim": 6144,
}
_REAL_PINPOINTS = str([(h, w) for h in range(336, 2017, 336) for w in range(336, 2017, 336)])


def build_text_config(*, real_dims: bool = False, dense_layers: int | None = None, **overrides) -> dict:
    """The text_config dict (release key order) for the requested sizes.

    ``dense_layers`` leading layers are dense attention + dense MLP (release: 3, tiny default: 1); the rest
    are MSA + MoE, and ``moe_layer_freq``, ``sparse_attention_freq`` and ``sparse_disable_index_value`` are
    the same 0/1 list, as in the release. Overrides use config key names (sparse keys may be given flat) or
    the short aliases of ``_ALIASES``; ``None`` values are ignored so CLI defaults pass straight through.
    """
    cfg = copy.deepcopy(REAL_TEXT_CONFIG)
    sparse = cfg["sparse_attention_config"]
    base = {} if real_dims else dict(TINY_TEXT_OVERRIDES)
    explicit = {}
    for key, value in overrides.items():
        if value is None:
            continue
        key = _ALIASES.get(key, key)
        if key not in cfg and key not in _SPARSE_KEYS:
            raise TypeError(f"unknown text config override {key!r}")
        explicit[key] = value
    merged = {**base, **explicit}

    # Sizes that the release ties together follow their anchor unless given explicitly.
    if "num_key_value_heads" in explicit and "sparse_num_index_heads" not in explicit:
        merged["sparse_num_index_heads"] = explicit["num_key_value_heads"]  # one index head per KV group
    elif "sparse_num_index_heads" not in merged:
        merged["sparse_num_index_heads"] = merged.get("num_key_value_heads", cfg["num_key_value_heads"])
    if "head_dim" in explicit and "sparse_index_dim" not in explicit:
        merged["sparse_index_dim"] = explicit["head_dim"]  # the release has index dim == head dim
    if ("head_dim" in explicit or "partial_rotary_factor" in explicit) and "rotary_dim" not in explicit:
        head_dim = merged.get("head_dim", cfg["head_dim"])
        merged["rotary_dim"] = int(head_dim * merged.get("partial_rotary_factor", cfg["partial_rotary_factor"]))
    if "intermediate_size" in explicit and "shared_intermediate_size" not in explicit:
        # engines size the shared expert as intermediate_size * n_shared_experts (spec §7.5): keep them equal
        merged["shared_intermediate_size"] = explicit["intermediate_size"] * cfg["n_shared_experts"]

    for key, value in merged.items():
        (sparse if key in _SPARSE_KEYS else cfg)[key] = value

    # HF derives the rotated width from partial_rotary_factor, SGLang/MLX read rotary_dim: keep both honest.
    cfg["partial_rotary_factor"] = cfg["rotary_dim"] / cfg["head_dim"]

    n_layers = cfg["num_hidden_layers"]
    if dense_layers is None:
        dense_layers = REAL_DENSE_LAYERS if real_dims else TINY_DENSE_LAYERS
    dense_layers = min(dense_layers, n_layers)
    freq = [0] * dense_layers + [1] * (n_layers - dense_layers)
    cfg["moe_layer_freq"] = list(freq)
    sparse["sparse_attention_freq"] = list(freq)
    sparse["sparse_disable_index_value"] = list(freq)  # every sparse layer is score-only (no index_v/o)
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    sp = cfg["sparse_attention_config"]
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0, "GQA needs heads % kv_heads == 0"
    assert cfg["rotary_dim"] % 2 == 0 and cfg["rotary_dim"] <= cfg["head_dim"]
    assert cfg["rotary_dim"] <= sp["sparse_index_dim"], "the indexer uses the same partial rope"
    assert sp["sparse_num_index_heads"] % cfg["num_key_value_heads"] == 0
    assert sp["sparse_init_block"] + sp["sparse_local_block"] <= sp["sparse_topk_blocks"], "forced blocks must fit"
    assert 1 <= cfg["num_experts_per_tok"] <= cfg["num_local_experts"]


def build_vl_config(text_config: dict, *, image_token_id: int, video_token_id: int, dtype: str,
                    real_dims: bool = False) -> dict:
    """Top-level VL config: the release's keys and order, tiny (or real) vision tower, our placeholder ids."""
    vision = copy.deepcopy(REAL_VISION_CONFIG if real_dims else TINY_VISION_CONFIG)
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        # The release also has "auto_map": {"AutoConfig": "configuration_minimax_m3_vl.MiniMaxM3VLConfig"}.
        # It is left out on purpose: that remote-code file is not shipped here, and with
        # trust_remote_code=True (SGLang's usual flag) transformers would try to import it and fail.
        "model_type": "minimax_m3_vl",
        "text_config": text_config,
        "vision_config": vision,
        "img_token_compression_config": copy.deepcopy(vision["img_token_compression_config"]),
        "image_grid_pinpoints": _REAL_PINPOINTS if real_dims else "[(28, 28)]",
        "image_seq_length": 576 if real_dims else 4,
        "image_token_index": image_token_id,
        "video_token_index": video_token_id,
        "multimodal_projector_bias": True,
        "num_reward_heads": 0,
        "process_image_mode": "dynamic_res",
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "torch_dtype": dtype,
        "transformers_version": "4.52.4",
        "projector_hidden_size": vision["projection_dim"],
        "bos_token_id": text_config["bos_token_id"],
        "eos_token_id": text_config["eos_token_id"],
    }


FLAT_CONFIG_MODULE = "configuration_minimax_m3"
FLAT_CONFIG_SOURCE = '''"""Config class for a flat text-only MiniMax-M3 export (model_type minimax_m3); fields as in config.json."""
from transformers import PretrainedConfig


class MiniMaxM3Config(PretrainedConfig):
    model_type = "minimax_m3"
'''


def build_flat_config(text_config: dict, *, dtype: str) -> dict:
    """Text-only packaging, as in reference/m3_text_config.json (model_type first, dtype and ids last)."""
    cfg = {"model_type": "minimax_m3", **copy.deepcopy(text_config)}
    cfg["architectures"] = ["MiniMaxM3SparseForCausalLM"]
    # No library registers `minimax_m3`: sglang-m3 does so itself, but SGLang's in-tree M3 (the peer we compare
    # against, plugin switched off) needs the config class from the checkpoint (--trust-remote-code).
    cfg["auto_map"] = {"AutoConfig": f"{FLAT_CONFIG_MODULE}.MiniMaxM3Config"}
    cfg["torch_dtype"] = dtype
    # keep bos/eos at the end like the reference file
    cfg["bos_token_id"] = cfg.pop("bos_token_id")
    cfg["eos_token_id"] = cfg.pop("eos_token_id")
    return cfg


# --------------------------------------------------------------------------------------------------
# Tensors (spec §4.1)
# --------------------------------------------------------------------------------------------------

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


def build_state_dict(cfg: dict, *, seed: int, dtype: str, vl_cfg: dict | None, n_tokens: int,
                     unused_token_ids: list[int]) -> dict:
    """All tensors, named as in the release (with the ``language_model.`` prefix iff ``vl_cfg``)."""
    import torch

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


# --------------------------------------------------------------------------------------------------
# Tokenizer (byte level, one token per byte, plus M3's special strings) — spec §5
# --------------------------------------------------------------------------------------------------

BOS = "]~!b["        # BOD, conversation start (release id 200034)
ROLE = "]~b]"        # role prefix (200019)
EOS = "[e~["         # end of message = EOS (200020)
THINK_OPEN, THINK_CLOSE = "<mm:think>", "</mm:think>"   # 200059 / 200060
NS = "]<]minimax[>["  # tool-call namespace token
IMAGE, VIDEO = "]<]image[>[", "]<]video[>["            # 200025 / 200026
# brackets around expanded image placeholders (transformers' MiniMaxM3VLProcessor inserts them)
IMAGE_START, IMAGE_END = "]<]start of image[>[", "]<]end of image[>["

# (content, special). "special" tokens are dropped by skip_special_tokens=True. The think tags and the
# namespace token must stay visible in decoded text: SGLang's minimax-m3 reasoning and tool-call parsers
# look for them there. The release's relative id order is kept (]~b] 200019 < [e~[ 200020 < image 200025 <
# video 200026 < ]~!b[ 200034 < <think> 200050 < <mm:think> 200059); the bracket and NS ids are not known.
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    (ROLE, True),
    (EOS, True),
    (IMAGE, True),
    (VIDEO, True),
    (IMAGE_START, True),
    (IMAGE_END, True),
    (BOS, True),
    ("<think>", False),
    ("</think>", False),
    (THINK_OPEN, False),
    (THINK_CLOSE, False),
    (NS, False),
]
BYTE_TOKENS = 256
PRINTABLE_BYTES = frozenset([ord("\n")] + list(range(32, 127)))  # the bytes the tiny model emits


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map, which the tokenizers ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_ids() -> dict[str, int]:
    """Id of every special string (byte b has id b)."""
    return {content: BYTE_TOKENS + i for i, (content, _) in enumerate(SPECIAL_TOKENS)}


def build_tokenizer():
    """A ``tokenizers.Tokenizer``: id b = byte b (no merges), then the special strings in SPECIAL_TOKENS order.
    No post-processor: BOS comes from the chat template, never added implicitly."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges the split is irrelevant, and no space handling sneaks in.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for content, special in SPECIAL_TOKENS:  # one at a time so ids follow the list order
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    ids = token_ids()
    for content, _ in SPECIAL_TOKENS:
        assert tok.token_to_id(content) == ids[content], content
    return tok


def tokenizer_config(chat_template: str, model_max_length: int) -> dict:
    ids = token_ids()
    return {
        "added_tokens_decoder": {
            str(ids[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": special}
            for content, special in SPECIAL_TOKENS
        },
        "bos_token": BOS,
        "eos_token": EOS,
        # the remaining special (skipped-on-decode) strings, so all_special_ids lists them too
        "extra_special_tokens": [c for c, special in SPECIAL_TOKENS if special and c not in (BOS, EOS)],
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        # Understood by transformers 4.x and 5.x (5.x maps it to its TokenizersBackend).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
    }


# --------------------------------------------------------------------------------------------------
# Chat template — spec §5 (a reconstruction; the verbatim release template was not available)
# --------------------------------------------------------------------------------------------------
#
# Layout:
#   ]~!b[]~b]system\n{identity}\n\n<thinking_instructions>\n...Current thinking mode: X\n</thinking_instructions>[e~[\n
#   ]~b]developer\n{system message or default}{tools section}[e~[\n
#   ]~b]user\n...[e~[\n
#   ]~b]ai\n{<mm:think>R</mm:think> | </mm:think>}{answer}{NS tool-call block}[e~[\n
#   ]~b]tool\n<response>...</response>\n<response>...</response>[e~[\n     (consecutive results grouped)
#   ]~b]ai\n{<mm:think> | </mm:think> | nothing}                            (thinking_mode enabled/disabled/adaptive)
# Decisions where §5 is open:
# - past reasoning: kept (<mm:think>R</mm:think>) for assistant turns after the last user message (the
#   current tool-use loop), replaced by the bare closer for earlier turns and for turns without reasoning;
# - reasoning comes from `reasoning_content` (SGLang/OpenAI) or `reasoning`, or from an inline
#   "<mm:think>R</mm:think>answer" content;
# - tool-call arguments may be a dict (rendered as NS-tagged children, lists as <item>s) or a JSON string
#   (rendered verbatim);
# - the instructions avoid the literal think tags, so they only ever appear where a turn puts them.
# Whitespace: transformers compiles templates with trim_blocks/lstrip_blocks; every emitted character is
# written as a '...' literal so the output does not depend on those settings.
CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{- content -}}
{%- else -%}
{%- for part in content -%}
{%- if part is string -%}{{- part -}}
{%- elif part.type == 'text' -%}{{- part.text -}}
{%- elif part.type in ['image', 'image_url'] -%}{{- ']<]image[>[' -}}
{%- elif part.type in ['video', 'video_url'] -%}{{- ']<]video[>[' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro render_value(v) -%}
{%- if v is mapping -%}
{%- for key, item in v.items() -%}
{{- ']<]minimax[>[<' ~ key ~ '>' ~ render_value(item) ~ ']<]minimax[>[</' ~ key ~ '>' -}}
{%- endfor -%}
{%- elif v is string -%}{{- v -}}
{%- elif v is boolean -%}{{- 'true' if v else 'false' -}}
{%- elif v is none -%}{{- 'null' -}}
{%- elif v is sequence -%}
{%- for item in v -%}{{- ']<]minimax[>[<item>' ~ render_value(item) ~ ']<]minimax[>[</item>' -}}{%- endfor -%}
{%- else -%}{{- v | string -}}
{%- endif -%}
{%- endmacro -%}
{%- set NS = ']<]minimax[>[' -%}
{%- set mode = thinking_mode if (thinking_mode is defined and thinking_mode is not none) else 'adaptive' -%}
{%- if mode not in ['enabled', 'disabled', 'adaptive'] -%}
{{- raise_exception('thinking_mode must be one of enabled, disabled, adaptive (got ' ~ mode ~ ')') -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- if messages and messages[0].role in ['system', 'developer'] -%}
{%- set developer = render_content(messages[0].content) -%}
{%- set offset = 1 -%}
{%- else -%}
{%- set developer = 'You are a helpful assistant.' -%}
{%- set offset = 0 -%}
{%- endif -%}
{{- ']~!b[]~b]system\n' -}}
{{- 'You are MiniMax-M3, an AI assistant developed by MiniMax.\n\n' -}}
{{- '<thinking_instructions>\n' -}}
{{- 'You can reason privately in a thinking block before you answer; the answer follows the block.\n' -}}
{{- '- enabled: always reason before answering.\n' -}}
{{- '- disabled: do not reason; answer directly.\n' -}}
{{- '- adaptive: reason only when the request needs it.\n' -}}
{{- 'Current thinking mode: ' ~ mode ~ '\n' -}}
{{- '</thinking_instructions>[e~[\n' -}}
{{- ']~b]developer\n' ~ developer -}}
{%- if tools -%}
{{- '\n\n# Tools\nYou may call one or more of these tools to help with the request:\n<tools>' -}}
{%- for tool in tools -%}
{{- '<tool>' ~ ((tool.function if tool.function is defined else tool) | tojson) ~ '</tool>' -}}
{%- endfor -%}
{{- '</tools>\n\nTo call tools, reply with one block in exactly this format:\n' -}}
{{- NS ~ '<tool_call>\n' ~ NS ~ '<invoke name="tool_name">' ~ NS ~ '<argument_name>value' ~ NS ~ '</argument_name>' ~ NS ~ '</invoke>\n' ~ NS ~ '</tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- for m in messages[offset:] -%}
{%- set idx = loop.index0 + offset -%}
{%- if m.role == 'user' -%}
{{- ']~b]user\n' ~ render_content(m.content) ~ '[e~[\n' -}}
{%- elif m.role in ['system', 'developer'] -%}
{{- ']~b]developer\n' ~ render_content(m.content) ~ '[e~[\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set content = render_content(m.content) -%}
{%- if m.reasoning_content is string -%}
{%- set reasoning = m.reasoning_content -%}
{%- elif m.reasoning is string -%}
{%- set reasoning = m.reasoning -%}
{%- else -%}
{%- set reasoning = '' -%}
{%- endif -%}
{%- if '</mm:think>' in content -%}
{%- set reasoning = content.split('</mm:think>')[0].replace('<mm:think>', '') -%}
{%- set content = content.split('</mm:think>')[-1] -%}
{%- endif -%}
{{- ']~b]ai\n' -}}
{%- if reasoning and idx > ns.last_user -%}
{{- '<mm:think>' ~ reasoning ~ '</mm:think>' -}}
{%- else -%}
{{- '</mm:think>' -}}
{%- endif -%}
{{- content -}}
{%- if m.tool_calls -%}
{%- if content -%}{{- '\n' -}}{%- endif -%}
{{- NS ~ '<tool_call>\n' -}}
{%- for call in m.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{{- NS ~ '<invoke name="' ~ fn.name ~ '">' ~ render_value(fn.arguments) ~ NS ~ '</invoke>\n' -}}
{%- endfor -%}
{{- NS ~ '</tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- ']~b]tool\n' -}}{%- else -%}{{- '\n' -}}{%- endif -%}
{{- '<response>' ~ render_content(m.content) ~ '</response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '[e~[\n' -}}{%- endif -%}
{%- else -%}
{{- raise_exception('unsupported role ' ~ m.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- ']~b]ai\n' -}}
{%- if mode == 'enabled' -%}{{- '<mm:think>' -}}{%- elif mode == 'disabled' -%}{{- '</mm:think>' -}}{%- endif -%}
{%- endif -%}
""".strip()


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------

def write_tokenizer(out_dir: Path, *, model_max_length: int) -> None:
    build_tokenizer().save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(CHAT_TEMPLATE, model_max_length), indent=2, ensure_ascii=False) + "\n")
    # transformers >= 4.43 also reads (and 5.x writes) the template as its own file; the two are identical.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_tiny_checkpoint(out_dir, *, flat: bool = False, config_only: bool = False, real_dims: bool = False,
                          dtype: str = "bfloat16", seed: int = 0, dense_layers: int | None = None,
                          **overrides) -> Path:
    """Write a MiniMax-M3 checkpoint directory and return its path.

    flat: text-only packaging (``model_type: minimax_m3``, tensors without ``language_model.``, no vision).
    config_only: config + tokenizer only (for ``--load-format dummy``); real_dims: the release's widths.
    dtype: "bfloat16" | "float16" | "float32" for everything but the router (always fp32).
    dense_layers: number of leading dense layers (default 1 tiny, 3 real).
    overrides: text-config fields (e.g. num_hidden_layers=2, num_key_value_heads=1, sparse_topk_blocks=4,
    sparse_block_size=64) or their aliases (layers, num_kv_heads, topk_blocks, block_size, ...).
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ids = token_ids()
    n_tokens = BYTE_TOKENS + len(SPECIAL_TOKENS)
    text_cfg = build_text_config(real_dims=real_dims, dense_layers=dense_layers, **overrides)
    if text_cfg["vocab_size"] < n_tokens:
        raise ValueError(f"vocab_size {text_cfg['vocab_size']} < tokenizer size {n_tokens}")
    text_cfg["bos_token_id"] = ids[BOS]
    text_cfg["eos_token_id"] = ids[EOS]

    if flat:
        config, vl = build_flat_config(text_cfg, dtype=dtype), None
    else:
        config = build_vl_config(text_cfg, image_token_id=ids[IMAGE], video_token_id=ids[VIDEO], dtype=dtype,
                                 real_dims=real_dims)
        vl = config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if flat:
        (out / f"{FLAT_CONFIG_MODULE}.py").write_text(FLAT_CONFIG_SOURCE)
    (out / "generation_config.json").write_text(json.dumps({
        # sampling defaults as inferred for the release (reference/m3_generation_config_inferred.json)
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
        "do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 40,
    }, indent=2) + "\n")
    write_tokenizer(out, model_max_length=text_cfg["max_position_embeddings"])

    weights = out / "model.safetensors"
    if config_only:
        if weights.exists():
            weights.unlink()  # a stale weight file would contradict the new config
        return out

    from safetensors.torch import save_file

    unused = [ids[s] for s in (BOS, ROLE, IMAGE, VIDEO, IMAGE_START, IMAGE_END)]
    tensors = build_state_dict(text_cfg, seed=seed, dtype=dtype, vl_cfg=vl, n_tokens=n_tokens,
                               unused_token_ids=unused)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m sglang_m3.tiny", description=__doc__.split("\nWhy")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--flat", action="store_true", help="text-only packaging (model_type minimax_m3)")
    ap.add_argument("--config-only", action="store_true", help="config + tokenizer, no weights")
    ap.add_argument("--real-dims", action="store_true", help="the release's widths (use with --config-only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="num_hidden_layers (tiny 4, real 60)")
    ap.add_argument("--dense-layers", type=int, help="leading dense layers (tiny 1, real 3)")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--heads", type=int, help="num_attention_heads")
    ap.add_argument("--num-kv-heads", type=int, help="num_key_value_heads (= index heads unless --index-heads)")
    ap.add_argument("--index-heads", type=int, help="sparse_num_index_heads")
    ap.add_argument("--head-dim", type=int, help="head_dim (rotary_dim and index dim follow)")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--num-experts", type=int)
    ap.add_argument("--experts-per-tok", type=int)
    ap.add_argument("--intermediate-size", type=int, help="routed (and shared) expert width")
    ap.add_argument("--dense-intermediate-size", type=int)
    ap.add_argument("--topk-blocks", type=int, help="sparse_topk_blocks (tiny 2, real 16)")
    ap.add_argument("--block-size", type=int, help="sparse_block_size (128)")
    ap.add_argument("--max-position-embeddings", type=int)
    a = ap.parse_args(argv)
    out = write_tiny_checkpoint(
        a.out_dir, flat=a.flat, config_only=a.config_only, real_dims=a.real_dims, dtype=a.dtype, seed=a.seed,
        dense_layers=a.dense_layers, num_hidden_layers=a.layers, hidden_size=a.hidden_size,
        num_attention_heads=a.heads, num_key_value_heads=a.num_kv_heads, sparse_num_index_heads=a.index_heads,
        head_dim=a.head_dim, vocab_size=a.vocab_size, num_local_experts=a.num_experts,
        num_experts_per_tok=a.experts_per_tok, intermediate_size=a.intermediate_size,
        dense_intermediate_size=a.dense_intermediate_size, sparse_topk_blocks=a.topk_blocks,
        sparse_block_size=a.block_size, max_position_embeddings=a.max_position_embeddings,
    )
    cfg = json.loads((out / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    what = "config only" if a.config_only else f"{(out / 'model.safetensors').stat().st_size / 2**20:.1f} MiB weights"
    print(f"wrote {out} ({cfg['model_type']}, {tc['num_hidden_layers']} layers, hidden {tc['hidden_size']}, {what})")
    return out


if __name__ == "__main__":
    main()
