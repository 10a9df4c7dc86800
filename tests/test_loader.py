"""The strict loader (sglang_m3/loader.py) refuses every checkpoint that does not fit, naming the tensors.

Unit level, no server: the tiny model is built in-process (fp32, CPU, the SGLang layers a server builds) and fed
the tiny checkpoint's tensors through `model.load_weights`, the entry SGLang's loader calls. Each case breaks
the checkpoint in one way; the intact checkpoint loading (flat and VL packaging) is the control that shows the
error comes from the break. The server-level path (the same errors stopping `launch_server`) is covered by
tests/test_bad_input.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_layers import sglang_env  # noqa: F401  (fixture; importing it also sets up SGLang on CPU)

L1 = "model.layers.1"


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    from safetensors.torch import load_file

    from sglang_m3.tiny import write_tiny_checkpoint

    flat = write_tiny_checkpoint(tmp_path_factory.mktemp("flat"), dtype="float32", flat=True)
    vl = write_tiny_checkpoint(tmp_path_factory.mktemp("vl"), dtype="float32")
    return {"flat": load_file(str(flat / "model.safetensors")), "vl": load_file(str(vl / "model.safetensors")),
            "config": flat / "config.json", "vl_config": vl / "config.json"}


def build(tensors, vl=False):
    import json

    from transformers import PretrainedConfig

    from sglang_m3.config import MiniMaxM3Config
    from sglang_m3.model import MiniMaxM3SparseForCausalLM, MiniMaxM3SparseForConditionalGeneration

    cfg = json.loads(tensors["vl_config" if vl else "config"].read_text())
    if vl:
        hf = PretrainedConfig(**{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")})
        hf.text_config = MiniMaxM3Config(**cfg["text_config"])
        return MiniMaxM3SparseForConditionalGeneration(hf)
    return MiniMaxM3SparseForCausalLM(MiniMaxM3Config(**cfg))


def load(model, weights: dict):
    model.load_weights(iter(list(weights.items())))


def expected_parameter(name: str, ck: dict, prefix: str, params) -> torch.Tensor:
    """What parameter `name` must hold after loading checkpoint `ck`, from M3_SPEC §4.1's tensor names and the fused
    layouts the model builds (written out here, not read from loader.py): qkv_proj = q | k | v rows (sparse layers:
    | index_q | index_k), gate_up_proj = gate | up rows, experts.w13_weight[e] = w1 | w3 rows of expert e,
    experts.w2_weight[e] = w2 of expert e; every other parameter is the checkpoint tensor of the same name. (`params`:
    the model's parameter names; a layer with its own index_proj keeps the index rows out of qkv_proj.)"""
    module, _, leaf = name.rpartition(".")
    base = module.rpartition(".")[0] + "."

    def get(n):
        return ck[prefix + n]

    if module.endswith(".self_attn.qkv_proj"):
        parts = ["q_proj", "k_proj", "v_proj"]
        if prefix + base + "index_q_proj.weight" in ck and base + "index_proj.weight" not in params:
            parts += ["index_q_proj", "index_k_proj"]
        return torch.cat([get(base + p + ".weight") for p in parts])
    if module.endswith(".self_attn.index_proj"):
        return torch.cat([get(base + p + ".weight") for p in ("index_q_proj", "index_k_proj")])
    if module.endswith(".gate_up_proj"):
        return torch.cat([get(base + "gate_proj.weight"), get(base + "up_proj.weight")])
    if module.endswith(".experts"):
        n_experts = len({k for k in ck if k.startswith(prefix + module + ".") and k.endswith(".w2.weight")})
        assert n_experts > 1, name
        if leaf == "w13_weight":
            return torch.stack([torch.cat([get(f"{module}.{e}.w1.weight"), get(f"{module}.{e}.w3.weight")])
                                for e in range(n_experts)])
        assert leaf == "w2_weight", name
        return torch.stack([get(f"{module}.{e}.w2.weight") for e in range(n_experts)])
    return get(name)


def test_intact_checkpoints_load_every_parameter(sglang_env, tensors):  # noqa: F811
    """Control: both packagings load (VL: the vision tensors skipped), and every parameter holds the checkpoint data
    of its place (expected_parameter). Bit-equal on purpose: an fp32 checkpoint copied into fp32 parameters, no
    arithmetic in between."""
    for vl in (False, True):
        model = build(tensors, vl)
        for p in model.parameters():
            p.data.fill_(float("nan"))
        ck = tensors["vl" if vl else "flat"]
        load(model, ck)
        left = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
        assert not left, f"parameters not filled: {left}"
        assert any(k.startswith("vision_tower.") for k in tensors["vl"])  # there was something to skip
        names = dict(model.named_parameters())
        assert any(n.endswith("experts.w13_weight") for n in names) and any(n.endswith("gate_up_proj.weight")
                                                                             for n in names)
        assert f"{L1}.self_attn.index_proj.weight" not in names  # unquantized sparse layer: q|k|v|index in one GEMM
        for name, param in names.items():
            want = expected_parameter(name, ck, "language_model." if vl else "", names)
            assert param.dtype == want.dtype == torch.float32, name
            assert torch.equal(param.data, want), f"{'vl' if vl else 'flat'}: {name} does not hold its checkpoint data"


def _drop(*names):
    return lambda t: [t.pop(n) for n in names]


def _add(name, tensor):
    return lambda t: t.__setitem__(name, tensor)


def _reshape(name, shape):
    return lambda t: t.__setitem__(name, torch.zeros(shape))


# case: (packaging, breaking edit, error text, names the message must contain)
CASES = {
    "missing_tensor": ("flat", _drop(f"{L1}.self_attn.index_k_norm.weight"), "were not (fully) loaded",
                       [f"{L1}.self_attn.index_k_norm.weight"]),
    "missing_q_shard": ("flat", _drop(f"{L1}.self_attn.q_proj.weight"), "were not (fully) loaded",
                        [f"{L1}.self_attn.qkv_proj.weight"]),
    "missing_k_shard": ("flat", _drop("model.layers.2.self_attn.k_proj.weight"), "were not (fully) loaded",
                        ["model.layers.2.self_attn.qkv_proj.weight"]),
    "missing_v_shard": ("flat", _drop("model.layers.0.self_attn.v_proj.weight"), "were not (fully) loaded",
                        ["model.layers.0.self_attn.qkv_proj.weight"]),
    "missing_index_q_shard": ("flat", _drop(f"{L1}.self_attn.index_q_proj.weight"), "were not (fully) loaded",
                              [f"{L1}.self_attn.qkv_proj.weight (no {L1}.self_attn.index_q_proj.weight)"]),
    "index_k_on_dense_layer": ("flat", _add("model.layers.0.self_attn.index_k_proj.weight", torch.zeros(128, 128)),
                               "map to no parameter", ["model.layers.0.self_attn.index_k_proj.weight"]),
    "missing_gate_shard": ("flat", _drop("model.layers.0.mlp.gate_proj.weight"), "were not (fully) loaded",
                           ["model.layers.0.mlp.gate_up_proj.weight"]),
    "missing_up_shard": ("flat", _drop(f"{L1}.block_sparse_moe.shared_experts.up_proj.weight"),
                         "were not (fully) loaded", [f"{L1}.block_sparse_moe.shared_experts.gate_up_proj.weight"]),
    "missing_expert_w3": ("flat", _drop(f"{L1}.block_sparse_moe.experts.3.w3.weight"), "were not (fully) loaded",
                          [f"{L1}.block_sparse_moe.experts.w13_weight (no {L1}.block_sparse_moe.experts.3.w3.weight)"]),
    "missing_expert_w2": ("flat", _drop("model.layers.3.block_sparse_moe.experts.7.w2.weight"),
                          "were not (fully) loaded", ["model.layers.3.block_sparse_moe.experts.w2_weight"]),
    "unexpected_tensor": ("flat", _add(f"{L1}.self_attn.index_v_proj.weight", torch.zeros(32, 128)),
                          "map to no parameter", [f"{L1}.self_attn.index_v_proj.weight"]),
    "expert_id_out_of_range": ("flat", _add(f"{L1}.block_sparse_moe.experts.8.w1.weight", torch.zeros(64, 128)),
                               "map to no parameter", [f"{L1}.block_sparse_moe.experts.8.w1.weight"]),
    "layer_out_of_range": ("flat", _add("model.layers.4.input_layernorm.weight", torch.zeros(128)),
                           "map to no parameter", ["model.layers.4.input_layernorm.weight"]),
    "stray_non_vision_tensor_vl": ("vl", _add("audio_tower.proj.weight", torch.zeros(4, 4)), "map to no parameter",
                                   ["audio_tower.proj.weight"]),
    "unprefixed_text_tensor_vl": ("vl", _add("model.norm.weight", torch.zeros(128)), "map to no parameter",
                                  ["model.norm.weight"]),
    "wrong_shape_norm": ("flat", _reshape("model.norm.weight", (64,)), "has shape", ["model.norm.weight", "(64,)"]),
    "wrong_shape_index_norm": ("flat", _reshape(f"{L1}.self_attn.index_q_norm.weight", (16,)), "has shape",
                               [f"{L1}.self_attn.index_q_norm.weight"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_refused_naming_the_tensor(sglang_env, tensors, case):  # noqa: F811
    from sglang_m3.loader import CheckpointMismatchError

    packaging, edit, text, names = CASES[case]
    weights = dict(tensors[packaging])
    edit(weights)
    with pytest.raises(CheckpointMismatchError) as info:
        load(build(tensors, vl=packaging == "vl"), weights)
    message = str(info.value)
    assert text in message, message
    for name in names:
        assert name in message, f"{case}: {name!r} not named in:\n{message}"


# SGLang's linear weight loaders zero-pad a checkpoint tensor that is too small along the TP-sharded dim (CPU:
# narrow_padded_param_and_loaded_weight; CUDA: pad_or_narrow_weight), so the loader checks projection shapes
# against config.json itself (loader.checkpoint_weight_shape); the others fail in SGLang's own loaders.
@pytest.mark.parametrize("name,shape,ours", [
    (f"{L1}.self_attn.o_proj.weight", (128, 64), True),
    (f"{L1}.self_attn.k_proj.weight", (32, 128), True),
    (f"{L1}.self_attn.index_q_proj.weight", (32, 128), True),
    ("model.layers.0.mlp.down_proj.weight", (128, 96), True),
    (f"{L1}.block_sparse_moe.shared_experts.gate_proj.weight", (32, 128), True),
    (f"{L1}.block_sparse_moe.experts.2.w2.weight", (64, 64), True),
    # router and vocabulary weights: SGLang's own loaders refused these with a bare assert / broadcast RuntimeError
    # naming neither the tensor nor config.json's shape (probe, session 22)
    (f"{L1}.block_sparse_moe.gate.weight", (8, 64), True),
    (f"{L1}.block_sparse_moe.gate.weight", (7, 128), True),
    ("lm_head.weight", (512, 64), True),
    ("lm_head.weight", (500, 128), True),
    ("model.embed_tokens.weight", (500, 128), True),
    ("model.embed_tokens.weight", (600, 128), True),
])
def test_wrong_shape_of_a_sharded_weight_is_an_error(sglang_env, tensors, name, shape, ours):  # noqa: F811
    """A projection, router or embedding weight of the wrong shape stops loading, naming the tensor and the shape
    config.json implies."""
    from sglang_m3.loader import CheckpointMismatchError

    weights = dict(tensors["flat"])
    weights[name] = torch.ones(shape)
    with pytest.raises(CheckpointMismatchError if ours else (AssertionError, RuntimeError)) as info:
        load(build(tensors), weights)
    if ours:
        assert name in str(info.value) and str(shape) in str(info.value), str(info.value)
        assert "config.json implies" in str(info.value), str(info.value)


@pytest.mark.parametrize("name,dtype", [
    (f"{L1}.self_attn.index_k_norm.weight", torch.int32),
    (f"{L1}.self_attn.index_q_proj.weight", torch.int64),
    (f"{L1}.block_sparse_moe.experts.2.w1.weight", torch.int32),
    ("model.embed_tokens.weight", torch.bool),
])
def test_non_float_weight_is_an_error_naming_it(sglang_env, tensors, name, dtype):  # noqa: F811
    """An integer or bool tensor where a weight belongs (corrupt or mislabelled file) was copied into the float
    parameter without a word (SGLang's loaders cast) and served; it stops loading, naming the tensor and dtype.
    A float tensor of another precision (fp16 into an fp32 model) is still cast, as SGLang does for any --dtype."""
    from sglang_m3.loader import CheckpointMismatchError

    weights = dict(tensors["flat"])
    weights[name] = torch.ones(tuple(weights[name].shape), dtype=dtype)
    with pytest.raises(CheckpointMismatchError) as info:
        load(build(tensors), weights)
    assert name in str(info.value) and str(dtype) in str(info.value), str(info.value)
    weights[name] = tensors["flat"][name].half()
    load(build(tensors), weights)
