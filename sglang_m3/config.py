"""Typed view of a MiniMax-M3 checkpoint config, and the checks that refuse what we cannot serve.

The released checkpoint is VL-packaged (`minimax_m3_vl` with a nested `text_config`); text-only exports are
flat (`model_type: minimax_m3`). Both end up as one `M3TextView` so the model never looks at packaging.
Every unsupported value fails at start-up with the field's name: serving a model whose config we silently
misread would produce plausible garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

# Names under which the released checkpoints declare themselves (config.json `architectures[0]`).
VL_ARCH = "MiniMaxM3SparseForConditionalGeneration"
TEXT_ARCH = "MiniMaxM3SparseForCausalLM"
M3_ARCHS = (VL_ARCH, TEXT_ARCH)


class MiniMaxM3Config(PretrainedConfig):
    """Config class for the flat text-only packaging (`model_type: minimax_m3`).

    Neither SGLang 0.5.17 nor transformers 5.12.1 registers this model_type; the plugin registers this class
    with `AutoConfig`. Fields are kept as in config.json; interpretation lives in `M3TextView`.
    """

    model_type = "minimax_m3"

    def __init__(self, **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class M3ConfigError(ValueError):
    """A config value this implementation does not support (the message names the field)."""


def is_m3_architecture(architectures) -> bool:
    """True when a config's `architectures` list (or None) names a MiniMax-M3 class first (M3_ARCHS)."""
    return bool(architectures) and architectures[0] in M3_ARCHS


def text_config_of(hf_config) -> PretrainedConfig:
    """The text backbone's config: `text_config` of the VL packaging, else the config itself."""
    return getattr(hf_config, "text_config", None) or hf_config


def apply_overrides(hf_config, overrides: dict) -> None:
    """`--json-model-override-args` on an M3 config, in place: nested objects merge recursively, so
    `{"text_config": {"sparse_attention_config": {"sparse_topk_blocks": 8}}}` changes that one field and keeps the
    rest (SGLang 0.5.17's get_config replaces a dict-valued field — all of `text_config` on the VL packaging, all of
    `sparse_attention_config` on a flat one). On the VL packaging a text field given at the top level (read from
    `text_config` only, so it would be silently ignored) raises M3ConfigError naming it."""
    text = getattr(hf_config, "text_config", None)
    for key, value in overrides.items():
        if text is not None and key != "text_config" and not hasattr(hf_config, key) and _get(text, key) is not None:
            raise M3ConfigError(f"--json-model-override-args: {key!r} is a text_config field of the VL-packaged "
                                f"MiniMax-M3 config; give it as {{\"text_config\": {{\"{key}\": ...}}}}")
        _merge(hf_config, key, value)


def _merge(cfg, key: str, value: Any) -> None:
    current = _get(cfg, key)
    if isinstance(value, dict) and (isinstance(current, (dict, PretrainedConfig))):
        for k, v in value.items():
            _merge(current, k, v)
    elif isinstance(cfg, dict):
        cfg[key] = value
    else:
        setattr(cfg, key, value)


def _get(cfg, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _per_layer(value, num_layers: int, field: str) -> list[int]:
    """`moe_layer_freq`-style fields: a per-layer 0/1 list (a single 0/1 means every layer)."""
    if _is_flag(value):
        return [int(value)] * num_layers
    if not isinstance(value, (list, tuple)):
        raise M3ConfigError(f"unsupported MiniMax-M3 config: {field}={value!r} (must be 0/1 or a list of 0/1 per "
                            "layer)")
    if len(value) != num_layers:
        raise M3ConfigError(f"config field {field!r} has {len(value)} entries, expected num_hidden_layers={num_layers}")
    for layer, v in enumerate(value):
        if not _is_flag(v):
            raise M3ConfigError(f"unsupported MiniMax-M3 config: {field}[{layer}]={v!r} (must be 0 or 1)")
    return [int(v) for v in value]


def _is_flag(value) -> bool:
    """0/1 (or false/true, or 0.0/1.0 as _int_field takes integral floats), the values of a per-layer switch."""
    return isinstance(value, (bool, int, float)) and value in (0, 1)


_REQUIRED = object()


def _int_field(cfg, name: str, default: Any = _REQUIRED, *, minimum: int | None = None, where: str = "") -> int:
    """An integer config field, checked: a missing field (or null) takes `default` or, without one, is an error
    naming it; a string, a bool, a fractional number or a value below `minimum` is an error naming the field and
    the value (`int()` on them raised a bare ValueError/TypeError, or silently truncated 2.5 to 2)."""
    field = where + name
    value = _get(cfg, name)
    if value is None:
        if default is _REQUIRED:
            raise M3ConfigError(f"unsupported MiniMax-M3 config: {field} is missing (required)")
        return default
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise M3ConfigError(f"unsupported MiniMax-M3 config: {field}={value!r} (must be an integer, "
                            f"got {type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise M3ConfigError(f"unsupported MiniMax-M3 config: {field}={value!r} (must be >= {minimum})")
    return value


def _float_field(cfg, name: str, default: float) -> float:
    """A positive finite real config field (a missing field or null takes `default`); a string, a bool, NaN, an
    infinity or a value <= 0 is an error naming the field and the value (`float()` raised a bare ValueError on a
    string, and eps, theta, scales and clamps of 0, < 0 or NaN would have served garbage)."""
    value = _get(cfg, name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise M3ConfigError(f"unsupported MiniMax-M3 config: {name}={value!r} (must be a number, "
                            f"got {type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise M3ConfigError(f"unsupported MiniMax-M3 config: {name}={value!r} (must be a finite number > 0)")
    return float(value)


@dataclass(frozen=True)
class SparseAttentionConfig:
    """`sparse_attention_config` of M3_SPEC §1.1: geometry of MSA and the lightning indexer."""

    num_index_heads: int
    index_dim: int
    block_size: int
    topk_blocks: int
    init_blocks: int
    local_blocks: int

    @property
    def dense_limit(self) -> int:
        """Sequences up to this many tokens select every block: MSA is then exactly dense attention."""
        return self.topk_blocks * self.block_size


@dataclass(frozen=True)
class M3TextView:
    """The fields of the text backbone the model reads, validated."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    vocab_size: int
    dense_intermediate_size: int
    moe_intermediate_size: int
    shared_intermediate_size: int
    num_experts: int
    top_k: int
    routed_scaling_factor: float
    swiglu_alpha: float
    swiglu_limit: float
    moe_layers: tuple[int, ...]
    sparse_layers: tuple[int, ...]
    sparse: SparseAttentionConfig

    def is_sparse(self, layer_id: int) -> bool:
        return layer_id in self.sparse_layers

    def is_moe(self, layer_id: int) -> bool:
        return layer_id in self.moe_layers


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise M3ConfigError(f"unsupported MiniMax-M3 config: {field}={value!r} ({why})")


# quant_method of the checkpoints served (quant.py says how); online --quantization fp8 needs no config entry.
SUPPORTED_QUANT_METHODS = ("mxfp8",)


def _check_quantization_config(quant) -> None:
    """A checkpoint's quantization_config: MXFP8 as the release declares it (M3_SPEC §4.3), or absent."""
    if quant is None:
        return
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    method = quant.get("quant_method")
    _require(method in SUPPORTED_QUANT_METHODS, "quantization_config.quant_method", method,
             f"served: {', '.join(SUPPORTED_QUANT_METHODS)} (or no quantization_config: bf16, optionally with "
             "--quantization fp8)")
    scheme = quant.get("activation_scheme", "dynamic")
    _require(scheme == "dynamic", "quantization_config.activation_scheme", scheme, "MXFP8 activations are dynamic")
    block = quant.get("weight_block_size")
    _require(block is None or list(block) == [1, 32], "quantization_config.weight_block_size", block,
             "MXFP8 has one scale per 1x32")
    for field in ("moe_quant_algo", "moe_quant_format"):  # M3.1-style NVFP4 experts
        _require(quant.get(field) is None, f"quantization_config.{field}", quant.get(field),
                 "experts in another format than the rest are not served")


def m3_text_view(hf_config) -> M3TextView:
    """Read and validate the text config (either packaging). Raises M3ConfigError naming the field."""
    cfg = text_config_of(hf_config)
    n_layers = _int_field(cfg, "num_hidden_layers", minimum=1)
    hidden = _int_field(cfg, "hidden_size", minimum=1)
    heads = _int_field(cfg, "num_attention_heads", minimum=1)
    kv_heads = _int_field(cfg, "num_key_value_heads", minimum=1)
    head_dim = _int_field(cfg, "head_dim", hidden // heads, minimum=1)
    rotary_dim = _int_field(cfg, "rotary_dim", None)
    if rotary_dim is None:
        factor = _get(cfg, "partial_rotary_factor", 1.0)
        _require(isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor <= 1,
                 "partial_rotary_factor", factor, "must be a number in (0, 1] when rotary_dim is absent")
        rotary_dim = int(head_dim * float(factor))

    # Values whose alternatives exist in some M3-family code but are not part of the released model.
    _require(not _get(cfg, "attention_output_gate", False), "attention_output_gate", True, "no output gate is implemented")
    _require(_get(cfg, "use_gemma_norm", True), "use_gemma_norm", False, "only Gemma-style RMSNorm (x*(1+w)) is implemented")
    _require(_get(cfg, "use_qk_norm", True), "use_qk_norm", False, "QK norm is always applied in M3")
    qk_norm = _get(cfg, "qk_norm_type", "per_head")
    _require(qk_norm == "per_head", "qk_norm_type", qk_norm, "only 'per_head' is implemented")
    act = _get(cfg, "hidden_act", "swigluoai")
    _require(act == "swigluoai", "hidden_act", act, "only the clamped SwiGLU 'swigluoai' is implemented")
    beta = _float_field(cfg, "swiglu_beta", 1.0)
    _require(beta == 1.0, "swiglu_beta", beta, "FusedMoE fixes the up-projection offset at 1.0")
    scoring = _get(cfg, "scoring_func", "sigmoid")
    _require(scoring == "sigmoid", "scoring_func", scoring, "only sigmoid routing is implemented")
    _require(_get(cfg, "rope_scaling") is None, "rope_scaling", _get(cfg, "rope_scaling"), "M3 uses plain RoPE")
    _require(_get(cfg, "use_routing_bias", True), "use_routing_bias", False, "the router's correction bias is required")
    n_shared = _int_field(cfg, "n_shared_experts", 1)
    _require(n_shared == 1, "n_shared_experts", n_shared, "exactly one shared expert is implemented")
    for holder in (hf_config, cfg):  # top level (the release's place) or inside text_config
        _check_quantization_config(_get(holder, "quantization_config"))
    _require(not _get(cfg, "tie_word_embeddings", False), "tie_word_embeddings", True, "M3 has a separate lm_head")
    _require(rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim, "rotary_dim", rotary_dim,
             f"must be even, positive and <= head_dim={head_dim}")
    _require(heads % kv_heads == 0, "num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")

    moe_layers = _per_layer(_get(cfg, "moe_layer_freq", 1), n_layers, "moe_layer_freq")
    num_experts = _int_field(cfg, "num_local_experts", _REQUIRED if any(moe_layers) else 1, minimum=1)
    top_k = _int_field(cfg, "num_experts_per_tok", _REQUIRED if any(moe_layers) else 1, minimum=1)
    _require(top_k <= num_experts, "num_experts_per_tok", top_k, f"must be <= num_local_experts={num_experts}")
    sac = _get(cfg, "sparse_attention_config")
    if sac is None:
        sac = {}
    _require(isinstance(sac, (dict, PretrainedConfig)), "sparse_attention_config", sac, "must be an object")
    use_sparse = _get(sac, "use_sparse_attention", False)
    _require(_is_flag(use_sparse), "sparse_attention_config.use_sparse_attention", use_sparse, "must be true or false")
    sparse_freq = _per_layer(_get(sac, "sparse_attention_freq", 1 if use_sparse else 0), n_layers, "sparse_attention_config.sparse_attention_freq")
    if not use_sparse:
        sparse_freq = [0] * n_layers
    no_index_value = _per_layer(_get(sac, "sparse_disable_index_value", 1), n_layers, "sparse_attention_config.sparse_disable_index_value")
    for layer, (is_sparse, disabled) in enumerate(zip(sparse_freq, no_index_value)):
        _require(not is_sparse or disabled, f"sparse_attention_config.sparse_disable_index_value[{layer}]", disabled,
                 "the index value/output branch is not implemented (M3 disables it on every sparse layer)")

    score_type = _get(sac, "sparse_score_type", "max")
    _require(score_type == "max", "sparse_attention_config.sparse_score_type", score_type, "only 'max' block scoring is implemented")
    # The MSA geometry has no safe default when a layer is sparse (SGLang's in-tree M3 needs these keys too):
    # a missing one would silently serve the release's value (top-16 of 128) for another model.
    required = any(sparse_freq)
    where = "sparse_attention_config."
    for tokens_key, blocks_key in (("sparse_init_tokens", "sparse_init_block"), ("sparse_local_tokens", "sparse_local_block")):
        # SGLang's in-tree backend derives the block count from a token count when the *_block key is absent;
        # we read only the *_block keys, so the token form would otherwise be ignored without a word.
        _require(_get(sac, tokens_key) is None or _get(sac, blocks_key) is not None, f"sparse_attention_config.{tokens_key}",
                 _get(sac, tokens_key), f"not supported: give {where + blocks_key} (a number of blocks) instead")
    block_size = _int_field(sac, "sparse_block_size", _REQUIRED if required else 128, minimum=1, where=where)
    topk = _int_field(sac, "sparse_topk_blocks", _REQUIRED if required else 16, minimum=1, where=where)
    init_blocks = _int_field(sac, "sparse_init_block", 0, minimum=0, where=where)
    local_blocks = _int_field(sac, "sparse_local_block", 1, where=where)
    index_dim = _int_field(sac, "sparse_index_dim", _REQUIRED if required else head_dim, minimum=1, where=where)
    _require(local_blocks >= 1, "sparse_attention_config.sparse_local_block", local_blocks, "the query's own block must be forced (>= 1)")
    _require(init_blocks + local_blocks <= topk, "sparse_attention_config.sparse_init_block + sparse_local_block",
             init_blocks + local_blocks, f"forced blocks must fit in sparse_topk_blocks={topk}")
    index_heads = _int_field(sac, "sparse_num_index_heads", kv_heads, where=where)
    if any(sparse_freq):
        _require(index_heads == kv_heads, "sparse_attention_config.sparse_num_index_heads", index_heads,
                 f"one index head per KV head is implemented (num_key_value_heads={kv_heads})")
        _require(index_dim >= rotary_dim, "sparse_attention_config.sparse_index_dim", index_dim,
                 f"the index heads take the same partial RoPE: must be >= rotary_dim={rotary_dim}")

    intermediate = _int_field(cfg, "intermediate_size", minimum=1)
    return M3TextView(
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=_float_field(cfg, "rope_theta", 5e6),
        max_position_embeddings=_int_field(cfg, "max_position_embeddings", 1 << 20, minimum=1),
        rms_norm_eps=_float_field(cfg, "rms_norm_eps", 1e-6),
        vocab_size=_int_field(cfg, "vocab_size", minimum=1),
        dense_intermediate_size=_int_field(cfg, "dense_intermediate_size", intermediate, minimum=1),
        moe_intermediate_size=intermediate,
        shared_intermediate_size=_int_field(cfg, "shared_intermediate_size", intermediate, minimum=1),
        num_experts=num_experts,
        top_k=top_k,
        routed_scaling_factor=_float_field(cfg, "routed_scaling_factor", 1.0),
        swiglu_alpha=_float_field(cfg, "swiglu_alpha", 1.702),
        swiglu_limit=_float_field(cfg, "swiglu_limit", 7.0),
        moe_layers=tuple(i for i, m in enumerate(moe_layers) if m),
        sparse_layers=tuple(i for i, s in enumerate(sparse_freq) if s),
        sparse=SparseAttentionConfig(
            num_index_heads=index_heads,
            index_dim=index_dim,
            block_size=block_size,
            topk_blocks=topk,
            init_blocks=init_blocks,
            local_blocks=local_blocks,
        ),
    )
