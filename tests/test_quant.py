"""Quantized MiniMax-M3 on CPU (issue 10): MXFP8 → 128×128 block-FP8 conversion against a float64 oracle, the
config/method choice, which layers get which SGLang quant method, and strict loading of MXFP8 checkpoints.

The fp8 GEMMs themselves need a GPU (scripts/gpu_quant.sh compares served logprobs); here everything up to the
kernels is checked: formats, shapes, dtypes, placement of every converted tile in SGLang's fused parameters.

Oracles are written here in float64 from the format definitions (OCP MX: w = e4m3 · 2^(s−127) per 1×32; block
FP8: w = e4m3 · scale per 128×128, scale = amax/448), sharing no code with sglang_m3.mxfp8.
Tolerances:
- MX dequantization: exact (e4m3 · 2^e is representable in fp32);
- block scales (powers of two, see mxfp8.py): equal to the oracle's;
- requantized codes: equal to the oracle's (nearest e4m3 of x/scale, a division by a power of two in both);
- reconstruction of an MXFP8 tensor: exact wherever |x|/scale >= 2^-6 (e4m3's normal range), else within half the
  subnormal step, 2^-10·scale; for arbitrary input (the writer, bf16 sources) <= 2^-4·|x| + 2^-10·scale.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

import torch  # noqa: E402  (before sglang: decides whether SGLang runs on its CPU engine)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # SGLang's CPU engine and the sgl_kernel stand-in (see tests/test_layers.py)
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    _SHIM = str(REPO / "cpu_shim")
    if _SHIM in sys.path:
        sys.path.remove(_SHIM)
    sys.path.insert(0, _SHIM)
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from sglang_m3 import mxfp8, tiny  # noqa: E402
from sglang_m3.config import M3ConfigError, m3_text_view  # noqa: E402

E4M3 = torch.float8_e4m3fn
# Geometry whose every projection is a multiple of 128 (block FP8 needs it, like the release at TP8): real head
# and index dims, 2 layers (dense + sparse/MoE), 4 experts.
SHAPE = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128, rotary_dim=64,
             sparse_index_dim=128, num_local_experts=4, num_experts_per_tok=2, intermediate_size=128,
             shared_intermediate_size=128, dense_intermediate_size=256, num_hidden_layers=2)


# ------------------------------------------------------------------------------------------------ float64 oracles

def ref_mx_dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """OCP MX: element · 2^(scale − 127), each scale covering 32 consecutive elements of a row; float64."""
    return w.double() * torch.pow(2.0, s.double() - 127.0).repeat_interleave(32, dim=1)


def ref_block_quant(x: torch.Tensor, block: int = 128):
    """Block FP8 in float64: per tile scale = the smallest power of two >= amax/448 (zero tile: 1), codes = nearest
    e4m3 of x/scale."""
    n, k = x.shape
    scale = torch.ones(-(-n // block), -(-k // block), dtype=torch.float64)
    q = torch.empty(n, k, dtype=E4M3)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = x[i * block:(i + 1) * block, j * block:(j + 1) * block]
            amax = tile.abs().max()
            if amax > 0:
                scale[i, j] = 2.0 ** math.ceil(math.log2(amax / 448.0))
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(E4M3)
    return q, scale


def expand(scale: torch.Tensor, shape, block: int = 128) -> torch.Tensor:
    return scale.double().repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def _amax448(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    n, k = x.shape
    return torch.tensor([[float(x[i:i + block, j:j + block].abs().max()) / 448 for j in range(0, k, block)]
                         for i in range(0, n, block)], dtype=torch.float64)


def random_mx(n: int, k: int, seed: int, exp_range=(-12, 6)):
    """A random MXFP8 pair: e4m3 codes of magnitude < 256 (exponent field 15 folded down, so NaN cannot occur and
    a tile's amax/448 is not a power of two, as in quantized data), UE8M0 exponents in 127 + exp_range."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) >= 0x78, codes - 0x08, codes).to(torch.uint8)
    scale = torch.randint(127 + exp_range[0], 127 + exp_range[1] + 1, (n, k // 32), generator=g).to(torch.uint8)
    return codes.view(E4M3), scale


def assert_block_fp8_close(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, label: str,
                           mx_input: bool = True) -> None:
    """(q, scale) is the block-FP8 form of float64 `x`: scales, codes and the reconstruction as the header says
    (`mx_input`: x holds MXFP8 values, so normal-range elements must come back exactly)."""
    q_ref, s_ref = ref_block_quant(x)
    assert q.dtype == E4M3 and scale.dtype == torch.float32, label
    assert tuple(scale.shape) == tuple(s_ref.shape), (label, scale.shape, s_ref.shape)
    assert torch.equal(scale.double(), s_ref), f"{label}: block scales"
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert not bool(differ.any()), f"{label}: {int(differ.sum())} codes differ from the oracle's"
    sfull = expand(scale, x.shape)
    err = (q.double() * sfull - x).abs()
    assert bool((err <= 2.0 ** -4 * x.abs() + 2.0 ** -10 * sfull).all()), f"{label}: reconstruction error"
    if mx_input:
        normal = x.abs() >= 2.0 ** -6 * sfull
        assert bool((err[normal] == 0).all()), f"{label}: {int((err[normal] > 0).sum())} normal-range elements moved"
        assert bool((err <= 2.0 ** -10 * sfull).all()), f"{label}: subnormal-range rounding"


# ------------------------------------------------------------------------------------------------ formats

def test_mx_dequantize_is_exact():
    w, s = random_mx(64, 96, seed=1, exp_range=(-40, 40))
    got = mxfp8.mxfp8_dequantize(w, s)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), ref_mx_dequant(w, s))


@pytest.mark.parametrize("n,k", [(320, 448), (128, 256), (64, 32)], ids=["partial-tiles", "whole", "one-small"])
def test_mxfp8_to_block_fp8_against_float64_oracle(n, k):
    w, s = random_mx(n, k, seed=n + k)
    q, scale = mxfp8.mxfp8_to_block_fp8(w, s)
    assert tuple(q.shape) == (n, k)
    x = ref_mx_dequant(w, s)
    assert_block_fp8_close(q, scale, x, f"{n}x{k}")
    q_striped, scale_striped = mxfp8.mxfp8_to_block_fp8(w, s, stripe_rows=128)  # the loader's memory bound
    assert torch.equal(q_striped.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale_striped, scale)
    # It can fail: DeepSeek-V3's amax/448 scales round most elements a second time; tiles transposed are far off.
    ds_scale = _amax448(x)
    q_ds = (x / expand(ds_scale, x.shape)).to(E4M3)
    with pytest.raises(AssertionError):
        assert_block_fp8_close(q_ds, ds_scale.float(), x, "amax/448 scales")
    if scale.shape[0] != scale.shape[1]:
        with pytest.raises(AssertionError):
            assert_block_fp8_close(q, scale.t().contiguous(), x, "transposed tiles")


def test_block_quant_zero_and_extreme_tiles():
    x = torch.zeros(256, 256, dtype=torch.float64)
    x[128:, :128] = 1e-30  # far below e4m3's range at scale 1: the tile's own scale carries it
    x[:128, 128:] = 3e4
    q, scale = mxfp8.block_fp8_quantize(x.float())
    assert float(scale[0, 0]) == 1.0 and int(q[:128, :128].view(torch.uint8).count_nonzero()) == 0
    assert_block_fp8_close(q, scale, x.float().double(), "zero/extreme tiles", mx_input=False)


def test_mxfp8_pair_errors():
    w, s = random_mx(32, 64, seed=3)
    for bad_w, bad_s, what in [(w.float(), s, "float8_e4m3fn"), (w, s[:, :1], "uint8 of shape (32, 2)"),
                               (w, s.float(), "uint8 of shape"), (w[:, :48], s, "multiple of the MX block")]:
        with pytest.raises(ValueError, match=re.escape(what)):
            mxfp8.mxfp8_dequantize(bad_w, bad_s)
    nan = s.clone()
    nan[3, 1] = 255
    with pytest.raises(ValueError, match="NaN"):
        mxfp8.mxfp8_dequantize(w, nan)


def test_mxfp8_quantize_matches_ocp_definition():
    """The tiny writer's quantizer: each 32-run scaled by the smallest power of two that fits it in ±448."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 128, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 48, dtype=torch.float64)[:, None]
    x[0, :32] = 0.0
    q, s = mxfp8.mxfp8_quantize(x.float())
    assert q.dtype == E4M3 and s.dtype == torch.uint8 and tuple(s.shape) == (48, 4)
    xf = x.float().double()
    amax = xf.abs().reshape(48, 4, 32).amax(-1)
    e = s.double() - 127
    live = amax > 0
    assert bool((amax[live] / 2 ** e[live] <= 448).all()) and bool((amax[live] / 2 ** (e[live] - 1) > 448).all())
    assert int(s[0, 0]) == 0
    back = ref_mx_dequant(q, s)
    scale = torch.pow(2.0, e).repeat_interleave(32, 1)
    assert bool(((back - xf).abs() <= 2.0 ** -4 * xf.abs() + 2.0 ** -10 * scale).all())


# ------------------------------------------------------------------------------------------------ config

def _mxfp8_config(**extra) -> dict:
    tc = tiny.build_text_config(**SHAPE)
    return {"architectures": ["MiniMaxM3SparseForCausalLM"], **tc,
            "quantization_config": {**tiny.mxfp8_quantization_config(tc), **extra}}


def test_config_accepts_mxfp8_only(tmp_path):
    m3_text_view(_mxfp8_config())
    m3_text_view(_obj({"text_config": tiny.build_text_config(**SHAPE), "quantization_config": {"quant_method": "mxfp8"}}))
    cases = {"quant_method": {"quant_method": "fp8"}, "activation_scheme": {"activation_scheme": "static"},
             "weight_block_size": {"weight_block_size": [128, 128]}, "moe_quant_algo": {"moe_quant_algo": "NVFP4"}}
    for field, extra in cases.items():
        with pytest.raises(M3ConfigError, match=f"quantization_config.{field}"):
            m3_text_view(_mxfp8_config(**extra))
    # the writer's real-width MXFP8 config (dummy-weight benchmarks) passes too
    out = tiny.main([str(tmp_path / "real"), "--config-only", "--real-dims", "--layers", "4", "--quant", "mxfp8"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp8" and not (out / "model.safetensors").exists()
    # the release's ignore list (VL packaging: routers named with the language_model. prefix, vision side listed)
    ignored = cfg["quantization_config"]["ignored_layers"]
    assert {"language_model.model.layers.3.block_sparse_moe.gate", "lm_head", "model.embed_tokens", "vision_tower",
            "multi_modal_projector", "patch_merge_mlp"} == set(ignored)
    view = m3_text_view(_obj(cfg))
    assert (view.hidden_size, view.num_layers, view.moe_layers) == (6144, 4, (3,))


# MiniMaxAI/MiniMax-M3-MXFP8 as published (a public model-inspection report reproducing the release's config.json
# and its 45,838-tensor list, 31 shards, 413.27 GB; layer and expert indices folded to N): tensor name -> dtype. Every
# quantized weight comes with `weight_scale_inv` uint8 [out, in/32] (e.g. q_proj [8192, 6144] + [8192, 192]).
_RELEASE_TEXT = {"lm_head.weight": "BF16", "model.embed_tokens.weight": "BF16", "model.norm.weight": "BF16",
                 **{f"model.layers.N.{n}.weight": "BF16" for n in (
                     "input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm",
                     "self_attn.index_q_norm", "self_attn.index_k_norm")},
                 "model.layers.N.block_sparse_moe.gate.weight": "F32",
                 "model.layers.N.block_sparse_moe.e_score_correction_bias": "F32"}
_RELEASE_MXFP8 = [f"model.layers.N.{m}" for m in (
    *(f"self_attn.{p}_proj" for p in ("q", "k", "v", "o", "index_q", "index_k")),
    *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
    *(f"block_sparse_moe.shared_experts.{p}_proj" for p in ("gate", "up", "down")),
    *(f"block_sparse_moe.experts.N.{w}" for w in ("w1", "w2", "w3")))]
_RELEASE_IGNORED = {"lm_head", "model.embed_tokens", "vision_tower", "multi_modal_projector", "patch_merge_mlp"}


def test_writer_mxfp8_layout_is_the_release_layout(tmp_path):
    """The tiny writer's VL MXFP8 checkpoint has exactly the release's text tensor names and dtypes (the loader's
    tests run on it), scale shapes [N, K/32], and the release's quantization_config (routers ignored under the
    VL prefix)."""
    from safetensors import safe_open

    out = tiny.write_tiny_checkpoint(tmp_path / "vl", quant="mxfp8", dtype="bfloat16", **SHAPE)
    want = {**_RELEASE_TEXT, **{f"{m}.weight": "F8_E4M3" for m in _RELEASE_MXFP8},
            **{f"{m}.weight_scale_inv": "U8" for m in _RELEASE_MXFP8}}
    got, shapes = {}, {}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.startswith("language_model."):
                folded = re.sub(r"\.\d+\.", ".N.", name[len("language_model."):])
                got[folded] = f.get_slice(name).get_dtype()
                shapes[name] = f.get_slice(name).get_shape()
    assert got == want
    for name, shape in shapes.items():
        if name.endswith("weight_scale_inv"):
            n, k = shapes[name[: -len("_scale_inv")]]
            assert shape == [n, k // 32], name
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["activation_scheme"], q["weight_block_size"]) == ("mxfp8", "dynamic", [1, 32])
    moe = [i for i, m in enumerate(tiny.build_text_config(**SHAPE)["moe_layer_freq"]) if m]
    assert set(q["ignored_layers"]) == _RELEASE_IGNORED | {
        f"language_model.model.layers.{i}.block_sparse_moe.gate" for i in moe}


def test_method_choice_per_device():
    from sglang_m3.quant import MXFP8_BLOCK_NAME, server_quantization

    mx = _mxfp8_config()
    bf16 = {k: v for k, v in mx.items() if k != "quantization_config"}
    assert server_quantization(None, _obj(mx), (9, 0)) == {"quantization": MXFP8_BLOCK_NAME}
    assert server_quantization("mxfp8", _obj(mx), (9, 0)) == {"quantization": MXFP8_BLOCK_NAME}
    assert server_quantization(None, _obj(mx), (10, 0)) == {}  # SGLang's own MXFP8 on Blackwell
    with pytest.raises(ValueError, match="drop --quantization mxfp8"):
        server_quantization("mxfp8", _obj(mx), (10, 0))
    assert server_quantization("fp8", _obj(mx), (9, 0)) == {}  # SGLang reports that mismatch itself
    for cap in [(9, 0), (8, 0), None]:
        assert server_quantization(None, _obj(bf16), cap) == {}
        assert server_quantization("fp8", _obj(bf16), cap) == {}
    with pytest.raises(ValueError, match="compute capability 8.9"):
        server_quantization(None, _obj(mx), (8, 9))
    with pytest.raises(ValueError, match="no CUDA device"):
        server_quantization(None, _obj(mx), None)


def _obj(d: dict):
    from transformers import PretrainedConfig

    return PretrainedConfig(**d)


def test_registered_method_lowers_the_gate_only_for_itself():
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.server_args import QUANTIZATION_CHOICES
    from sglang_m3 import quant

    quant.register()
    quant.register()  # idempotent
    assert get_quantization_config(quant.MXFP8_BLOCK_NAME) is quant.Mxfp8AsBlockFp8Config
    assert QUANTIZATION_CHOICES.count(quant.MXFP8_BLOCK_NAME) == 1
    hf_quant = _mxfp8_config()["quantization_config"]
    sglang_mx = Fp8Config.from_config(hf_quant)
    ours = quant.Mxfp8AsBlockFp8Config.from_config({**hf_quant, "packed_modules_mapping": {}})
    assert sglang_mx.get_min_capability() == 100 and ours.get_min_capability() == 90
    assert ours.weight_block_size == [128, 128] and ours.is_checkpoint_fp8_serialized and not ours.use_mxfp8
    assert "model.layers.1.block_sparse_moe.gate" in ours.ignored_layers
    # ModelConfig accepts the name only when it was asked for (the plugin asks on sm90)
    for method in QUANTIZATION_METHODS.values():
        if method is not quant.Mxfp8AsBlockFp8Config:
            assert method.override_quantization_method(hf_quant, quant.MXFP8_BLOCK_NAME) in (None,)
    assert quant.Mxfp8AsBlockFp8Config.override_quantization_method(hf_quant, quant.MXFP8_BLOCK_NAME) \
        == quant.MXFP8_BLOCK_NAME
    assert quant.Mxfp8AsBlockFp8Config.override_quantization_method(hf_quant, None) is None
    with pytest.raises(ValueError, match="mxfp8"):
        quant.Mxfp8AsBlockFp8Config.from_config({"quant_method": "fp8", "activation_scheme": "dynamic"})


def test_sglang_picks_the_method_from_the_checkpoint(tmp_path):
    """Through SGLang's own entry points: ServerArgs (plugin overrides), ModelConfig, get_quant_config."""
    from unittest import mock

    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    from sglang.srt.server_args import ServerArgs
    from sglang_m3 import plugin, quant

    plugin.register()
    ckpt = tiny.write_tiny_checkpoint(tmp_path / "mx", quant="mxfp8", config_only=True, **SHAPE)
    # the plugin's declaration on a Hopper GPU (device query mocked) / refusal without one
    hf = ModelConfig(str(ckpt)).hf_config
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        assert plugin._quantization_overrides(mock.Mock(quantization=None, device="cuda"), hf) == \
            {"quantization": quant.MXFP8_BLOCK_NAME}
    with pytest.raises(ValueError, match="no CUDA device"):
        ServerArgs(model_path=str(ckpt), device="cpu")
    # what the scheduler then builds from --quantization m3_mxfp8_block
    model_config = ModelConfig(str(ckpt), quantization=quant.MXFP8_BLOCK_NAME)
    assert model_config.quantization == quant.MXFP8_BLOCK_NAME
    built = get_quant_config(model_config, LoadConfig(), {})
    assert type(built) is quant.Mxfp8AsBlockFp8Config and built.weight_block_size == [128, 128]
    assert built.get_min_capability() == 90
    assert ModelConfig(str(ckpt)).quantization == "mxfp8"  # without the declaration: SGLang's MXFP8 (sm100)


# ------------------------------------------------------------------------------------------------ model + loader

from tests.test_layers import sglang_env  # noqa: E402,F401  (fixture: published ServerArgs + gloo groups)

@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The bf16 tiny checkpoint and its MXFP8 twin (same seed: same source weights), VL packaging."""
    root = tmp_path_factory.mktemp("quant_ckpt")
    return {"bf16": tiny.write_tiny_checkpoint(root / "bf16", **SHAPE),
            "mxfp8": tiny.write_tiny_checkpoint(root / "mxfp8", quant="mxfp8", **SHAPE),
            "mxfp8_idx_bf16": tiny.write_tiny_checkpoint(
                root / "mxfp8_idx", quant="mxfp8", quant_ignored=("self_attn.index_q_proj", "self_attn.index_k_proj"),
                **SHAPE)}


def build_model(ckpt: Path, quant_config):
    """The VL-packaged M3 model as SGLang builds it: quant config from config.json, ignore list mapped by the
    model class's hf_to_sglang_mapper, bf16 default dtype."""
    from sglang_m3.config import MiniMaxM3Config
    from sglang_m3.model import MiniMaxM3SparseForConditionalGeneration as cls
    from transformers import PretrainedConfig

    cfg = json.loads((ckpt / "config.json").read_text())
    hf = PretrainedConfig(**{k: v for k, v in cfg.items() if k != "text_config"})
    hf.text_config = MiniMaxM3Config(**cfg["text_config"])
    if quant_config is not None:
        quant_config.apply_weight_name_mapper(cls.hf_to_sglang_mapper)
    with default_dtype(torch.bfloat16):
        return cls(hf, quant_config=quant_config)


def block_config(ckpt: Path):
    from sglang_m3.quant import Mxfp8AsBlockFp8Config

    hf_quant = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    return Mxfp8AsBlockFp8Config.from_config({**hf_quant, "packed_modules_mapping": {}})


def read(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


QUANTIZED_LINEAR = ("self_attn.qkv_proj", "self_attn.o_proj", "self_attn.index_proj",  # index_proj: split only
                    "mlp.gate_up_proj", "mlp.down_proj", "block_sparse_moe.shared_experts.gate_up_proj",
                    "block_sparse_moe.shared_experts.down_proj")


def test_tiny_mxfp8_is_the_bf16_checkpoint_quantized(ckpts):
    """The writer's MXFP8 checkpoint: the bf16 one's tensors, 2-D text weights as e4m3 + uint8 [N, K/32] scales
    holding the same source values (|mx − bf16| within MX's rounding plus bf16's), the rest identical."""
    bf, mx = read(ckpts["bf16"]), read(ckpts["mxfp8"])
    scales = {k for k in mx if k.endswith("weight_scale_inv")}
    assert set(mx) - scales == set(bf)
    assert len(scales) == 2 * 4 + 2 + 3 + 3 + 4 * 3  # q/k/v/o x 2 layers, index q/k, dense MLP, shared, 4 experts
    for name in scales:
        w = name[: -len("_scale_inv")]
        assert mx[w].dtype == E4M3 and mx[name].dtype == torch.uint8
        assert tuple(mx[name].shape) == (bf[w].shape[0], bf[w].shape[1] // 32), name
        got, ref = ref_mx_dequant(mx[w], mx[name]), bf[w].double()
        step = torch.pow(2.0, mx[name].double() - 127).repeat_interleave(32, 1)
        assert bool(((got - ref).abs() <= (2.0 ** -4 + 2.0 ** -8) * ref.abs() + 2.0 ** -9 * step).all()), name
    for name in set(bf) - {k[: -len("_scale_inv")] for k in scales}:
        assert torch.equal(mx[name], bf[name]), name
    assert mx["language_model.model.layers.1.block_sparse_moe.gate.weight"].dtype == torch.float32


def test_layers_get_block_fp8_methods(sglang_env, ckpts):
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.layers.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod

    model = build_model(ckpts["mxfp8"], block_config(ckpts["mxfp8"]))
    modules = dict(model.named_modules())
    seen = 0
    for name, module in modules.items():
        if name.endswith(QUANTIZED_LINEAR):
            seen += 1
            assert type(module.quant_method) is Fp8LinearMethod, name
            n, k = module.weight.shape
            assert module.weight.dtype == E4M3 and module.weight_scale_inv.dtype == torch.float32, name
            assert tuple(module.weight_scale_inv.shape) == (-(-n // 128), -(-k // 128)), name
    assert seen == 2 + 2 + 2 + 2  # qkv/o ×2 layers (sparse: q/k/v/index q/k in one qkv_proj), dense MLP, shared expert
    assert "model.layers.1.self_attn.index_proj" not in modules
    experts = modules["model.layers.1.block_sparse_moe.experts"]
    assert type(experts.quant_method) is Fp8MoEMethod and experts.quant_method.weight_block_size == [128, 128]
    assert experts.w13_weight.dtype == E4M3 and tuple(experts.w13_weight_scale_inv.shape) == (4, 2, 2)
    gate = modules["model.layers.1.block_sparse_moe.gate"]
    assert type(gate.quant_method) is UnquantizedLinearMethod and gate.weight.dtype == torch.float32
    assert modules["model.layers.1.block_sparse_moe"].e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16

    # The checkpoint's ignore list decides for the index projections (written here with the VL prefix, which
    # the model's mapper strips).
    cfg = block_config(ckpts["mxfp8"])
    cfg.ignored_layers += ["language_model.model.layers.1.self_attn.index_q_proj",
                           "language_model.model.layers.1.self_attn.index_k_proj"]
    ignored = dict(build_model(ckpts["mxfp8"], cfg).named_modules())
    module = ignored["model.layers.1.self_attn.index_proj"]  # then split off the q/k/v GEMM
    assert type(module.quant_method) is UnquantizedLinearMethod and module.weight.dtype == torch.bfloat16
    assert type(ignored["model.layers.1.self_attn.qkv_proj"].quant_method) is Fp8LinearMethod


def test_online_fp8_layers(sglang_env, ckpts):
    """--quantization fp8 on the bf16 release: SGLang's Fp8Config() methods, bf16 weights until after loading."""
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod, Fp8MoEMethod
    from sglang_m3.loader import load_m3_weights

    model = build_model(ckpts["bf16"], Fp8Config())
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name.endswith(QUANTIZED_LINEAR):
            assert type(module.quant_method) is Fp8LinearMethod and module.weight.dtype == torch.bfloat16, name
            assert not hasattr(module, "weight_scale_inv") and getattr(module, "weight_scale", None) is None, name
    experts = modules["model.layers.1.block_sparse_moe.experts"]
    assert type(experts.quant_method) is Fp8MoEMethod and experts.w13_weight.dtype == torch.bfloat16
    assert type(modules["model.layers.1.block_sparse_moe.gate"].quant_method) is UnquantizedLinearMethod
    # Strict loading of the bf16 checkpoint: the online scales are not expected from it.
    weights = read(ckpts["bf16"])
    load_m3_weights(model, weights.items(), checkpoint_prefix="language_model.")
    name = "language_model.model.layers.1.block_sparse_moe.experts.3.w3.weight"
    assert torch.equal(experts.w13_weight.data[3, 128:], weights[name])


def test_check_quant_config_refuses_other_methods(sglang_env):
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8Config
    from sglang_m3.quant import check_quant_config

    with pytest.raises(ValueError, match="w8a8_int8"):
        check_quant_config(W8A8Int8Config({}))


def test_mxfp8_checkpoint_loads_converted(sglang_env, ckpts):
    """Every quantized parameter holds the block-FP8 form of the checkpoint's MXFP8 tensor at its fused place;
    everything else is the checkpoint's value; pairs adjacent in the file mean one tensor held at a time."""
    from sglang_m3.loader import load_m3_weights

    model = build_model(ckpts["mxfp8"], block_config(ckpts["mxfp8"]))
    weights = read(ckpts["mxfp8"])
    loader = load_m3_weights(model, sorted(weights.items()), checkpoint_prefix="language_model.")
    assert loader.max_pending == 1
    params = dict(model.named_parameters())
    p = "language_model."

    def mx(name):
        return ref_mx_dequant(weights[p + name + ".weight"], weights[p + name + ".weight_scale_inv"])

    def check(param, parts, label):
        """`parts`: checkpoint modules stacked along rows, each block-quantized on its own."""
        q, s = params[param + ".weight"], params[param + ".weight_scale_inv"]
        row = 0
        for part in parts:
            x = mx(part)
            n = x.shape[0]
            assert_block_fp8_close(q[row:row + n], s[row // 128:(row + n) // 128], x, f"{label}: {part}")
            row += n
        assert row == q.shape[0]

    for layer in (0, 1):
        a = f"model.layers.{layer}.self_attn"
        index = [f"{a}.index_q_proj", f"{a}.index_k_proj"] if layer == 1 else []  # sparse layer: one GEMM
        check(f"{a}.qkv_proj", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", *index], "qkv")
        check(f"{a}.o_proj", [f"{a}.o_proj"], "o")
    check("model.layers.0.mlp.gate_up_proj", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], "mlp")
    check("model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj"], "mlp down")
    sh = "model.layers.1.block_sparse_moe.shared_experts"
    check(f"{sh}.gate_up_proj", [f"{sh}.gate_proj", f"{sh}.up_proj"], "shared")
    check(f"{sh}.down_proj", [f"{sh}.down_proj"], "shared down")
    moe = "model.layers.1.block_sparse_moe"
    for e in range(4):
        for fused, parts in (("w13", ["w1", "w3"]), ("w2", ["w2"])):
            q, s = params[f"{moe}.experts.{fused}_weight"][e], params[f"{moe}.experts.{fused}_weight_scale_inv"][e]
            row = 0
            for part in parts:
                x = mx(f"{moe}.experts.{e}.{part}")
                n = x.shape[0]
                assert_block_fp8_close(q[row:row + n], s[row // 128:(row + n) // 128], x, f"expert {e} {part}")
                row += n
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", f"{moe}.gate.weight",
                 f"{moe}.e_score_correction_bias", "model.layers.1.self_attn.index_k_norm.weight"):
        assert torch.equal(params[name], weights[p + name]), name
    # scales first, weights last: the same parameters (pairs wait for each other)
    again = build_model(ckpts["mxfp8"], block_config(ckpts["mxfp8"]))
    order = sorted(weights.items(), key=lambda kv: (not kv[0].endswith("_scale_inv"), kv[0]))
    shuffled = load_m3_weights(again, order, checkpoint_prefix="language_model.")
    assert shuffled.max_pending > 1
    for name, value in again.named_parameters():
        assert torch.equal(value.view(torch.uint8) if value.dtype == E4M3 else value,
                           params[name].view(torch.uint8) if value.dtype == E4M3 else params[name]), name


def test_mxfp8_checkpoint_with_unquantized_index_projections(sglang_env, ckpts):
    """A checkpoint that declares index projections unquantized (ignored_layers) loads them as bf16."""
    from sglang_m3.loader import load_m3_weights

    ckpt = ckpts["mxfp8_idx_bf16"]
    weights = read(ckpt)
    name = "language_model.model.layers.1.self_attn.index_q_proj.weight"
    assert weights[name].dtype == torch.bfloat16 and name + "_scale_inv" not in weights
    model = build_model(ckpt, block_config(ckpt))
    load_m3_weights(model, weights.items(), checkpoint_prefix="language_model.")
    index = dict(model.named_parameters())["model.layers.1.self_attn.index_proj.weight"]  # q/k/v stay fp8
    assert torch.equal(index, torch.cat([weights[name], weights[name.replace("index_q", "index_k")]]))


def _mutations():
    p = "language_model.model.layers."
    q = p + "1.self_attn.q_proj.weight"
    w3 = p + "1.block_sparse_moe.experts.2.w3.weight"
    return {
        "missing scale": (lambda w: w.pop(q + "_scale_inv"), [q, "no language_model.model.layers.1.self_attn.q_proj."
                                                                  "weight_scale_inv"]),
        "missing expert scale": (lambda w: w.pop(w3 + "_scale_inv"), [w3]),
        "scale without weight": (lambda w: w.pop(w3), [w3 + "_scale_inv"]),
        "missing expert": (lambda w: (w.pop(w3), w.pop(w3 + "_scale_inv")),
                           ["not (fully) loaded", "model.layers.1.block_sparse_moe.experts.w13_weight",
                            "model.layers.1.block_sparse_moe.experts.w13_weight_scale_inv"]),
        "unexpected lm_head scale": (lambda w: w.__setitem__("language_model.lm_head.weight_scale_inv",
                                                             torch.zeros(512, 8, dtype=torch.uint8)),
                                     ["map to no parameter", "language_model.lm_head.weight_scale_inv"]),
        "unexpected router scale": (lambda w: w.__setitem__(p + "1.block_sparse_moe.gate.weight_scale_inv",
                                                            torch.zeros(4, 8, dtype=torch.uint8)),
                                    [p + "1.block_sparse_moe.gate.weight_scale_inv"]),
        "scale shape": (lambda w: w.__setitem__(q + "_scale_inv", w[q + "_scale_inv"][:, :-1].contiguous()),
                        [q + "_scale_inv", "(256, 8)"]),
        "expert scale shape": (lambda w: w.__setitem__(w3 + "_scale_inv", w[w3 + "_scale_inv"][:64].contiguous()),
                               [w3 + "_scale_inv", "(128, 8)"]),
        "scale dtype": (lambda w: w.__setitem__(q + "_scale_inv", w[q + "_scale_inv"].float()), [q + "_scale_inv"]),
        "bf16 weight for fp8 module": (lambda w: w.__setitem__(q, w[q].to(torch.bfloat16)), [q, "float8_e4m3fn"]),
        "fp8 weight for bf16 module": (lambda w: w.__setitem__(
            "language_model.lm_head.weight", w["language_model.lm_head.weight"].to(E4M3)),
            ["language_model.lm_head.weight", "unquantized"]),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_strict_loading_names_bad_scales(sglang_env, ckpts, case):
    from sglang_m3.loader import CheckpointMismatchError, load_m3_weights

    mutate, needles = _mutations()[case]
    weights = read(ckpts["mxfp8"])
    mutate(weights)
    model = build_model(ckpts["mxfp8"], block_config(ckpts["mxfp8"]))
    with pytest.raises(CheckpointMismatchError) as info:
        load_m3_weights(model, sorted(weights.items()), checkpoint_prefix="language_model.")
    for needle in needles:
        assert needle in str(info.value), f"{case}: {needle!r} not in: {info.value}"


def test_native_mxfp8_layout_loads_as_shipped(sglang_env, ckpts):
    """sm100 keeps SGLang's MXFP8 (uint8 scales per 1×32): the loader passes the pairs through unconverted."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang_m3.loader import load_m3_weights

    hf_quant = json.loads((ckpts["mxfp8"] / "config.json").read_text())["quantization_config"]
    model = build_model(ckpts["mxfp8"], Fp8Config.from_config(hf_quant))
    weights = read(ckpts["mxfp8"])
    load_m3_weights(model, sorted(weights.items()), checkpoint_prefix="language_model.")
    params = dict(model.named_parameters())
    p = "language_model.model.layers.1."
    k = params["model.layers.1.self_attn.qkv_proj.weight_scale_inv"]
    assert k.dtype == torch.uint8
    assert torch.equal(k[256:384], weights[p + "self_attn.k_proj.weight_scale_inv"])
    w13 = params["model.layers.1.block_sparse_moe.experts.w13_weight"]
    assert torch.equal(w13[1, 128:].view(torch.uint8), weights[p + "block_sparse_moe.experts.1.w3.weight"].view(torch.uint8))


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_converted_weights_through_sglang_block_fp8_gemm():
    """On the GPU: a converted MXFP8 weight through SGLang's Triton block-FP8 GEMM (the sm90 linear path) against
    float64 x @ ŵᵀ with ŵ the block-FP8 weight. The GEMM quantizes x to e4m3 per 1×128 group, so each product
    term carries ≤ 2^-4 relative error: |y − ref| ≤ 2^-4 · (|x| @ |ŵ|ᵀ) + bf16 output rounding 2^-8 · |ref|."""
    from sglang.srt.layers.quantization.fp8_utils import triton_w8a8_block_fp8_linear

    w, s = random_mx(384, 1024, seed=7, exp_range=(-12, -7))
    s += (torch.arange(3).repeat_interleave(128) * 3).to(torch.uint8)[:, None]  # row blocks 8x apart in size
    q, scale = mxfp8.mxfp8_to_block_fp8(w.cuda(), s.cuda())
    x = torch.randn(33, 1024, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16).cuda()
    y = triton_w8a8_block_fp8_linear(x, q, [128, 128], scale)
    w_hat = q.double().cpu() * expand(scale.cpu(), q.shape)
    ref = x.double().cpu() @ w_hat.T
    bound = 2.0 ** -4 * (x.double().cpu().abs() @ w_hat.abs().T) + 2.0 ** -8 * ref.abs()
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3e}, max bound {float(bound.max()):.3e}"
    # it can fail: the scales transposed (tiles misplaced) are far outside
    y_bad = triton_w8a8_block_fp8_linear(x, q, [128, 128], torch.flip(scale, dims=[0]).contiguous())
    assert not bool(((y_bad.double().cpu() - ref).abs() <= bound).all())
