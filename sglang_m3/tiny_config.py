"""Config dicts of the tiny (and real-width) MiniMax-M3 checkpoints: the release's config.json layout (M3_SPEC §1),
rebuilt for any layer count / width, in the VL or the flat text-only packaging; plus the MXFP8 release's
quantization_config (M3_SPEC §4.3). Used by `sglang_m3.tiny`.
"""

from __future__ import annotations

import copy

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


def mxfp8_quantization_config(text_config: dict, extra_ignored: tuple[str, ...] = (), prefix: str = "") -> dict:
    """The MXFP8 release's `quantization_config` for this text config (M3_SPEC §4.3).

    As in MiniMaxAI/MiniMax-M3-MXFP8's config.json (read from a public model-inspection report that reproduces the
    release's config.json and tensor list, 31 shards, 413.27 GB, found through a GitHub code index whose entry did
    not name its repository; the scale format "U8 E8M0 per [1, 32], `weight_scale_inv`" is confirmed by
    github.com/ml-explore/mlx-lm/pull/1398): quant_method mxfp8, activation_scheme dynamic, weight_block_size
    [1, 32], ignored_layers = lm_head, model.embed_tokens, vision_tower, multi_modal_projector, patch_merge_mlp and
    each MoE layer's router, named with the packaging's prefix (`prefix`: "language_model." for the VL packaging,
    "" for the flat one): `language_model.model.layers.N.block_sparse_moe.gate` in the release. `extra_ignored`
    adds module names (e.g. "self_attn.index_q_proj") whose weights then stay unquantized, as a checkpoint would
    declare them.
    """
    moe_layers = [layer for layer, moe in enumerate(text_config["moe_layer_freq"]) if moe]
    return {
        "quant_method": "mxfp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [1, 32],
        "ignored_layers": ["lm_head", "model.embed_tokens", "vision_tower", "multi_modal_projector", "patch_merge_mlp",
                           *[f"{prefix}model.layers.{layer}.block_sparse_moe.gate" for layer in moe_layers],
                           *extra_ignored],
    }
