"""Every refusal of sglang_m3/config.py: an unsupported value raises M3ConfigError naming the field.

Fast unit tests (no server): m3_text_view on the tiny release-shaped config with one field changed, in each
packaging (plain dict, flat MiniMaxM3Config, VL config with the text under text_config). The unchanged config is
the control (it is accepted in every packaging). `test_every_check_has_a_case` reads the `_require(...)` calls of
config.py and fails when a check has no case here, so a new refusal cannot go untested. Likewise `test_every_bound_refuses_the_value_just_outside_it`
reads every bounded `_int_field` / `_float_field` call and sets each field just outside its bound. The quantization_config
checks are tested with the quantization code (tests/test_quant.py).
"""

from __future__ import annotations

import ast
import copy
import inspect

import pytest

from sglang_m3 import config as config_module
from sglang_m3.config import M3ConfigError, MiniMaxM3Config, m3_text_view
from sglang_m3.tiny import build_text_config


def _flat(cfg: dict):
    return MiniMaxM3Config(**copy.deepcopy(cfg))


def _vl(cfg: dict):
    from transformers import PretrainedConfig

    top = PretrainedConfig(architectures=["MiniMaxM3SparseForConditionalGeneration"])
    top.text_config = MiniMaxM3Config(**copy.deepcopy(cfg))
    return top


PACKAGINGS = {"dict": copy.deepcopy, "flat": _flat, "vl": _vl}
N_LAYERS = build_text_config()["num_hidden_layers"]  # 4: layer 0 dense, 1-3 sparse


def top(key, value):
    return lambda c: c.__setitem__(key, value)


def sparse(key, value):
    return lambda c: c["sparse_attention_config"].__setitem__(key, value)


def both(*fs):
    return lambda c: [f(c) for f in fs]


# case: (edit, field named by the check in config.py, extra text the message must contain)
CASES = {
    "attention_output_gate": (top("attention_output_gate", True), "attention_output_gate", "True"),
    "use_gemma_norm": (top("use_gemma_norm", False), "use_gemma_norm", "False"),
    "use_qk_norm": (top("use_qk_norm", False), "use_qk_norm", "False"),
    "qk_norm_type": (top("qk_norm_type", "per_layer"), "qk_norm_type", "per_layer"),
    "hidden_act": (top("hidden_act", "silu"), "hidden_act", "silu"),
    "swiglu_beta": (top("swiglu_beta", 0.5), "swiglu_beta", "0.5"),
    "scoring_func": (top("scoring_func", "softmax"), "scoring_func", "softmax"),
    "rope_scaling": (top("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), "rope_scaling", "yarn"),  # see POST
    "use_routing_bias": (top("use_routing_bias", False), "use_routing_bias", "False"),
    "n_shared_experts": (top("n_shared_experts", 2), "n_shared_experts", "2"),
    "quantization_config": (top("quantization_config", {"quant_method": "awq", "bits": 4}), "quantization_config",
                            "awq"),
    "tie_word_embeddings": (top("tie_word_embeddings", True), "tie_word_embeddings", "True"),
    "rotary_dim_odd": (top("rotary_dim", 15), "rotary_dim", "15"),
    "rotary_dim_above_head_dim": (top("rotary_dim", 64), "rotary_dim", "64"),
    "num_key_value_heads": (both(top("num_key_value_heads", 3), sparse("sparse_num_index_heads", 3)),
                            "num_key_value_heads", "3"),
    "sparse_disable_index_value": (sparse("sparse_disable_index_value", [0, 1, 0, 1]),
                                   "sparse_attention_config.sparse_disable_index_value[2]", "index value"),
    "sparse_score_type_lse": (sparse("sparse_score_type", "lse"), "sparse_attention_config.sparse_score_type", "lse"),
    "sparse_topk_blocks_zero": (sparse("sparse_topk_blocks", 0), "sparse_attention_config.sparse_topk_blocks", "0"),
    "sparse_block_size_zero": (sparse("sparse_block_size", 0), "sparse_attention_config.sparse_block_size", "0"),
    "sparse_local_block_zero": (sparse("sparse_local_block", 0), "sparse_attention_config.sparse_local_block", "0"),
    "forced_blocks_exceed_topk": (both(sparse("sparse_init_block", 1), sparse("sparse_local_block", 2)),
                                  "sparse_attention_config.sparse_init_block + sparse_local_block", "3"),
    "sparse_num_index_heads": (sparse("sparse_num_index_heads", 4), "sparse_attention_config.sparse_num_index_heads",
                               "num_key_value_heads=2"),
    # config.json values of the wrong type or range: each named with its value (int() raised a bare ValueError /
    # TypeError / ZeroDivisionError at start-up, truncated 2.5 to 2, or served the value and crashed in the
    # scheduler's warm-up: sparse_init_block -1 in the indexer, num_experts_per_tok 9 in torch.topk)
    "sparse_topk_blocks_string": (sparse("sparse_topk_blocks", "two"), "sparse_attention_config.sparse_topk_blocks",
                                  "must be an integer, got str"),
    "sparse_topk_blocks_numeric_string": (sparse("sparse_topk_blocks", "2"),
                                          "sparse_attention_config.sparse_topk_blocks", "'2'"),
    "sparse_topk_blocks_fraction": (sparse("sparse_topk_blocks", 2.5), "sparse_attention_config.sparse_topk_blocks",
                                    "2.5"),
    "sparse_topk_blocks_bool": (sparse("sparse_topk_blocks", True), "sparse_attention_config.sparse_topk_blocks",
                                "got bool"),
    "sparse_topk_blocks_null": (sparse("sparse_topk_blocks", None), "sparse_attention_config.sparse_topk_blocks",
                                "missing"),
    "sparse_block_size_missing": (lambda c: c["sparse_attention_config"].pop("sparse_block_size"),
                                  "sparse_attention_config.sparse_block_size", "missing"),
    "sparse_index_dim_missing": (lambda c: c["sparse_attention_config"].pop("sparse_index_dim"),
                                 "sparse_attention_config.sparse_index_dim", "missing"),
    "sparse_index_dim_below_rotary_dim": (sparse("sparse_index_dim", 8), "sparse_attention_config.sparse_index_dim",
                                          "rotary_dim=16"),
    "sparse_index_dim_zero": (sparse("sparse_index_dim", 0), "sparse_attention_config.sparse_index_dim", ">= 1"),
    "sparse_init_block_negative": (both(sparse("sparse_init_block", -1), sparse("sparse_local_block", 3)),
                                   "sparse_attention_config.sparse_init_block", "-1"),
    "sparse_local_tokens": (both(lambda c: c["sparse_attention_config"].pop("sparse_local_block"),
                                 sparse("sparse_local_tokens", 256)),
                            "sparse_attention_config.sparse_local_tokens", "sparse_local_block"),
    "sparse_init_tokens": (both(lambda c: c["sparse_attention_config"].pop("sparse_init_block"),
                                sparse("sparse_init_tokens", 128)),
                           "sparse_attention_config.sparse_init_tokens", "sparse_init_block"),
    "sparse_attention_config_not_object": (top("sparse_attention_config", [1]), "sparse_attention_config",
                                           "must be an object"),
    "use_sparse_attention_string": (sparse("use_sparse_attention", "false"),
                                    "sparse_attention_config.use_sparse_attention", "'false'"),
    "sparse_attention_freq_value": (sparse("sparse_attention_freq", [0, 1, 2, 1]),
                                    "sparse_attention_config.sparse_attention_freq[2]", "0 or 1"),
    "sparse_attention_freq_string": (sparse("sparse_attention_freq", "0111"),
                                     "sparse_attention_config.sparse_attention_freq", "'0111'"),
    "num_key_value_heads_zero": (top("num_key_value_heads", 0), "num_key_value_heads", ">= 1"),
    "num_hidden_layers_missing": (lambda c: c.pop("num_hidden_layers"), "num_hidden_layers", "missing"),
    "vocab_size_string": (top("vocab_size", "512"), "vocab_size", "got str"),
    "num_experts_per_tok_above_experts": (top("num_experts_per_tok", 9), "num_experts_per_tok",
                                          "num_local_experts=8"),
    "partial_rotary_factor": (both(lambda c: c.pop("rotary_dim"), top("partial_rotary_factor", "half")),
                              "partial_rotary_factor", "'half'"),
    # per-layer lists of the wrong length (config.py's _per_layer)
    "moe_layer_freq_length": (top("moe_layer_freq", [0] + [1] * (N_LAYERS - 2)), "moe_layer_freq",
                              f"num_hidden_layers={N_LAYERS}"),
    "sparse_attention_freq_length": (sparse("sparse_attention_freq", [0] + [1] * N_LAYERS),
                                     "sparse_attention_config.sparse_attention_freq", f"num_hidden_layers={N_LAYERS}"),
    "sparse_disable_index_value_length": (sparse("sparse_disable_index_value", [1] * (N_LAYERS - 1)),
                                          "sparse_attention_config.sparse_disable_index_value",
                                          f"num_hidden_layers={N_LAYERS}"),
}


@pytest.mark.parametrize("packaging", list(PACKAGINGS))
def test_release_shaped_config_is_accepted(packaging):
    view = m3_text_view(PACKAGINGS[packaging](build_text_config()))
    assert view.sparse_layers == view.moe_layers == (1, 2, 3)
    assert view.sparse.num_index_heads == view.num_kv_heads == 2
    assert (view.sparse.block_size, view.sparse.topk_blocks, view.sparse.init_blocks, view.sparse.local_blocks) \
        == (128, 2, 0, 1)


# Set on the built config object instead of the dict: transformers' config constructor already rejects a
# rope_scaling without its fields in place (so a checkpoint carrying one never reaches us through it).
POST = {"rope_scaling"}


@pytest.mark.parametrize("packaging", list(PACKAGINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_value_is_refused_naming_the_field(case, packaging):
    edit, field, detail = CASES[case]
    cfg = build_text_config()
    if case in POST and packaging != "dict":
        hf = PACKAGINGS[packaging](cfg)
        text = getattr(hf, "text_config", hf)
        probe = {}
        edit(probe)
        for key, value in probe.items():
            setattr(text, key, value)
    else:
        edit(cfg)
        hf = PACKAGINGS[packaging](cfg)
    with pytest.raises(M3ConfigError) as info:
        m3_text_view(hf)
    message = str(info.value)
    assert field in message and detail in message, f"{case}: expected {field!r} and {detail!r} in: {message}"


def test_dense_only_config_skips_the_sparse_checks():
    """use_sparse_attention false: no sparse layers, so index-head / index-value settings do not matter."""
    cfg = build_text_config()
    cfg["sparse_attention_config"].update(use_sparse_attention=False, sparse_num_index_heads=4,
                                          sparse_disable_index_value=[0] * N_LAYERS)
    view = m3_text_view(cfg)
    assert view.sparse_layers == () and view.moe_layers == (1, 2, 3)


@pytest.mark.parametrize("packaging", list(PACKAGINGS))
def test_integral_floats_and_unneeded_keys_are_accepted(packaging):
    """Controls for the type checks: integers written as floats (JSON writers may emit 128.0) read as those
    integers, per-layer switches included; a dense-only config needs no MSA geometry keys, a MoE-less one no
    expert counts; a *_tokens key beside its *_block key is not refused (the block count is read)."""
    cfg = build_text_config()
    sac = cfg["sparse_attention_config"]
    sac.update(sparse_block_size=128.0, sparse_topk_blocks=2.0, sparse_local_block=1.0, sparse_local_tokens=128,
               sparse_attention_freq=[0, 1.0, 1, 1.0])
    cfg.update(num_experts_per_tok=float(cfg["num_experts_per_tok"]), moe_layer_freq=[0.0, 1, 1.0, 1])
    view = m3_text_view(PACKAGINGS[packaging](cfg))
    assert (view.sparse.block_size, view.sparse.topk_blocks, view.sparse.local_blocks) == (128, 2, 1)
    assert view.sparse_layers == view.moe_layers == (1, 2, 3) and isinstance(view.sparse.block_size, int)
    assert view.top_k == build_text_config()["num_experts_per_tok"]

    dense = build_text_config()
    dense["sparse_attention_config"] = {"use_sparse_attention": False}
    dense.update(moe_layer_freq=0)
    for key in ("num_local_experts", "num_experts_per_tok"):
        dense.pop(key, None)
    view = m3_text_view(PACKAGINGS[packaging](dense))
    assert view.sparse_layers == () and view.moe_layers == ()


def _bounded_fields() -> list[tuple[str, str, object]]:
    """Every `_int_field(..., minimum=m)` and `_float_field(...)` call of config.py, read from its source:
    (where the field lives: "top" or "sparse", name, m; None for a float field, which must be > 0)."""
    found = []
    for node in ast.walk(ast.parse(inspect.getsource(config_module))):
        name = getattr(getattr(node, "func", None), "id", None) if isinstance(node, ast.Call) else None
        if name not in ("_int_field", "_float_field"):
            continue
        holder = "sparse" if ast.unparse(node.args[0]) == "sac" else "top"
        minimum = {k.arg: k.value for k in node.keywords}.get("minimum")
        if name == "_float_field":
            found.append((holder, node.args[1].value, None))
        elif minimum is not None:
            found.append((holder, node.args[1].value, ast.literal_eval(minimum)))
    return found


def test_every_bound_refuses_the_value_just_outside_it():
    """Each bound found in config.py (so a new one cannot go untested), set to the nearest value it must refuse:
    minimum - 1 for an integer field, 0 and -1.0 and NaN and a string for a positive real one. The message names the
    field and the value. Controls: test_release_shaped_config_is_accepted and the integral-floats test."""
    bounds = _bounded_fields()
    assert len(bounds) >= 18, bounds  # the parse found the checks (14 integer minimums, 6 positive reals)
    for holder, name, minimum in bounds:
        field = ("sparse_attention_config." if holder == "sparse" else "") + name
        edit = sparse if holder == "sparse" else top
        bad = [0, -1.0, float("nan"), "7.0", True] if minimum is None else [minimum - 1]
        for value in bad:
            cfg = build_text_config()
            edit(name, value)(cfg)
            with pytest.raises(M3ConfigError) as info:
                m3_text_view(cfg)
            assert field in str(info.value) and repr(value)[:3] in str(info.value), (field, value, str(info.value))


def _checked_fields() -> set[str]:
    """The field argument of every _require call in config.py (f-strings: their literal prefix)."""
    fields = set()
    for node in ast.walk(ast.parse(inspect.getsource(config_module))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_require":
            arg = node.args[1]
            if isinstance(arg, ast.Constant):
                fields.add(arg.value)
            elif isinstance(arg, ast.JoinedStr):  # the literal text before the first {...}
                prefix = []
                for v in arg.values:
                    if not isinstance(v, ast.Constant):
                        break
                    prefix.append(v.value)
                fields.add("".join(prefix))
            else:
                fields.add(ast.unparse(arg))
    return fields


def test_every_check_has_a_case():
    checked = _checked_fields()
    assert len(checked) >= 15, checked  # the parse found the checks
    covered = {field for _, field, _ in CASES.values()}
    untested = sorted(f for f in checked if not f.startswith("quantization_config.")  # tests/test_quant.py
                      and not any(c.startswith(f) for c in covered))
    assert not untested, f"config checks without a refusal case in tests/test_config.py: {untested}"
