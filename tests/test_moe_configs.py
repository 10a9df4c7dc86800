"""sglang_m3.moe_configs.lookup: packaged fused-MoE configs are found for their exact SGLang name and Triton version
only; any other name, or another Triton version's folder, gives None (SGLang's own lookup then applies).
Oracle: files written here in SGLang's layout, named by SGLang's get_config_file_name."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def h200(monkeypatch):
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config as cfg

    monkeypatch.setattr(cfg, "get_device_name", lambda: "NVIDIA H200")  # CPU: SGLang has no device name
    return cfg


def test_lookup_finds_only_its_own_names(tmp_path, h200):
    import triton

    from sglang_m3 import moe_configs

    ours = {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
                  "num_stages": 3},
            "256": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8,
                    "num_stages": 3}}
    here = tmp_path / f"triton_{triton.__version__.replace('.', '_')}"
    here.mkdir()
    (here / "E=128,N=384,device_name=NVIDIA_H200.json").write_text(json.dumps(ours))
    other = tmp_path / "triton_0_0_1"  # another Triton version's file of a name we lack
    other.mkdir()
    (other / "E=128,N=768,device_name=NVIDIA_H200.json").write_text(json.dumps(ours))

    got = moe_configs.lookup(128, 384, None, 0, 0, config_dir=tmp_path)
    assert got == {int(m): c for m, c in ours.items()}
    assert moe_configs.lookup(128, 384, None, 0, 0, down_moe=True, config_dir=tmp_path) is None  # "_down" name
    assert moe_configs.lookup(128, 384, "fp8_w8a8", 128, 128, config_dir=tmp_path) is None
    assert moe_configs.lookup(128, 768, None, 0, 0, config_dir=tmp_path) is None
    assert moe_configs.lookup(64, 384, None, 0, 0, config_dir=tmp_path) is None
    assert h200.get_config_file_name(128, 384, None) == "E=128,N=384,device_name=NVIDIA_H200.json"


# ---- the plugin's hook on SGLang's get_moe_configs --------------------------------------------------------------

HOOK_PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)  # as SGLang's server configures it
from pathlib import Path
import sglang_m3
from sglang_m3 import moe_configs, tiny
sglang_m3.enable()
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config as cfg
from sglang.srt.runtime_context import publish
from sglang.srt.server_args import ServerArgs
publish(ServerArgs(model_path="dummy", device="cpu"), role="test")  # get_moe_configs reads the exec flags
cfg.get_device_name = lambda: "NVIDIA H200"  # CPU: SGLang has no device name
moe_configs.CONFIG_DIR = Path(sys.argv[1])
sglang_own = cfg.get_moe_configs.__wrapped__  # SGLang's lookup as installed, below the hook

def show(tag, got):
    print(tag, json.dumps(None if got is None else {str(m): c for m, c in got.items()}))

def shape(n):  # w1 [E, 2N, hidden], w2 [E, hidden, N], as fused_experts passes them
    return (128, 2 * n, 6144), (128, 6144, n)

show("before_768", cfg.get_moe_configs(128, 768, None, 0, 0))  # no M3 model in this process yet
show("sglang_768", sglang_own(128, 768, None, 0, 0))
ModelConfig(tiny.write_tiny_checkpoint(Path(sys.argv[2]), config_only=True).as_posix())
show("m3_768", cfg.get_moe_configs(128, 768, None, 0, 0))
show("m3_384", cfg.get_moe_configs(128, 384, None, 0, 0))
show("sglang_384", sglang_own(128, 384, None, 0, 0))
up, (down, _) = cfg.try_get_optimal_moe_config(*shape(768), 4, None, 200, return_down_config=True)
print("picked_768", json.dumps([up, down]))
publish(ServerArgs(model_path="dummy", device="cpu", enable_deterministic_inference=True), role="test")
assert cfg.get_exec().deterministic.enable_deterministic_inference
show("deterministic_768", cfg.get_moe_configs(128, 768, None, 0, 0))
"""


def test_hooked_get_moe_configs_answers_our_names_only_while_m3_is_served(tmp_path):
    """The registered hook, in a fresh process with the plugin enabled, through SGLang's own module attribute and
    its caller try_get_optimal_moe_config: for the one name we ship (N=768, which SGLang also bundles a file for,
    tuned for another model), ours once an M3 ModelConfig is built and SGLang's before; for N=384 (no file of ours)
    SGLang's answer; under deterministic inference SGLang's answer again. Oracles: the JSON written here; SGLang's function below the hook (``__wrapped__``)."""
    import subprocess
    import sys

    import triton

    from tests.conftest import cpu_env

    ours = {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
                  "num_stages": 3},
            "256": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8,
                    "num_stages": 3}}
    here = tmp_path / "configs" / f"triton_{triton.__version__.replace('.', '_')}"
    here.mkdir(parents=True)
    (here / "E=128,N=768,device_name=NVIDIA_H200.json").write_text(json.dumps(ours))
    out = subprocess.run([sys.executable, "-c", HOOK_PROBE, str(tmp_path / "configs"), str(tmp_path / "ckpt")],
                         env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = {tag: rest for tag, rest in (line.split(" ", 1) for line in out.stdout.strip().splitlines())}
    sglang_768, sglang_384 = json.loads(seen["sglang_768"]), json.loads(seen["sglang_384"])
    assert sglang_768 and sglang_768 != ours and sglang_384  # SGLang bundles H200 files for both names
    assert json.loads(seen["before_768"]) == sglang_768
    assert json.loads(seen["m3_768"]) == ours
    assert json.loads(seen["m3_384"]) == sglang_384
    up, down = json.loads(seen["picked_768"])
    assert up == ours["256"] and down is None  # nearest M to 200; no _down file: the down GEMM runs the up config
    assert json.loads(seen["deterministic_768"]) == sglang_768  # deterministic inference: SGLang's answer
    assert "fused-MoE kernel configs from" in out.stderr and "E=128,N=768" in out.stderr  # the file, logged
    assert out.stderr.count("fused-MoE kernel configs from") == 1  # once


# ---- the packaged files ---------------------------------------------------------------------------------------

# Keys a fused_moe_kernel config carries (num_warps/num_stages may be absent: Triton's defaults, as in SGLang's own
# default config, which the tuner keeps where nothing beat it).
CONFIG_KEYS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"}
OPTIONAL_KEYS = {"num_warps", "num_stages"}


def test_every_shipped_config_parses_names_an_m3_shape_and_is_package_data():
    """Each file under sglang_m3/moe_configs/configs: a Triton-version folder, SGLang's name for E = M3's expert
    count and N = its expert width / TP for TP 1, 2, 4 or 8 (oracle: the release config's numbers through
    m3_text_view), a JSON map of token counts to complete kernel configs, and matched by pyproject's package-data
    (so a wheel carries it)."""
    import fnmatch
    import re
    import tomllib
    from pathlib import Path

    from sglang_m3 import moe_configs
    from sglang_m3.config import MiniMaxM3Config, m3_text_view
    from sglang_m3.tiny import build_text_config

    files = sorted(moe_configs.CONFIG_DIR.glob("*/*.json"))
    if not files:
        pytest.skip("no fused-MoE configs packaged yet (scripts/gpu_tune_moe.sh makes them)")
    cfg = MiniMaxM3Config(**build_text_config(real_dims=True))
    cfg.architectures = ["MiniMaxM3SparseForCausalLM"]
    view = m3_text_view(cfg)
    widths = {view.moe_intermediate_size // tp for tp in (1, 2, 4, 8)}
    package = Path(moe_configs.__file__).resolve().parents[1]
    patterns = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for f in files:
        assert re.fullmatch(r"triton_\d+(_\d+)+", f.parent.name), f
        m = re.fullmatch(r"E=(\d+),N=(\d+),device_name=[^,]+?(,dtype=\w+)?(,block_shape=\[\d+, \d+\])?(_down)?\.json",
                         f.name)
        assert m and int(m[1]) == view.num_experts and int(m[2]) in widths, f.name
        table = json.loads(f.read_text())
        assert table, f
        for tokens, config in table.items():
            assert int(tokens) > 0 and CONFIG_KEYS <= set(config) <= CONFIG_KEYS | OPTIONAL_KEYS, (f.name, config)
            assert all(isinstance(v, int) and v > 0 for v in config.values()), (f.name, tokens)
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns["sglang_m3"]), rel


# ---- the tuner's block-FP8 case (benchmarks/tune_moe.py) --------------------------------------------------------

@pytest.mark.parametrize("tp", [8, 1])
def test_tuner_fp8_case_is_what_sglangs_block_fp8_moe_serves_and_its_file_is_found(tmp_path, h200, tp):
    """The tuner's fp8_w8a8 case against SGLang's own block-FP8 MoE layer as our MXFP8-on-Hopper config builds it
    (Fp8MoEMethod(Mxfp8AsBlockFp8Config()).create_weights, on the meta device: no memory): same weight and scale
    shapes and dtypes, and the quant arguments the Triton runner passes (get_triton_quant_info: use_fp8_w8a8,
    block_shape). The tuner's file names (bf16 and fp8) are the ones sglang_m3.moe_configs.lookup opens for the
    arguments SGLang's try_get_optimal_moe_config passes (dtype from get_config_dtype_str, block_n/block_k)."""
    import torch
    import triton
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config import get_config_dtype_str
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod
    from sglang.srt.runtime_context import get_parallel

    from benchmarks import tune_moe
    from sglang_m3 import moe_configs
    from sglang_m3.quant import Mxfp8AsBlockFp8Config

    n = 3072 // tp
    case = tune_moe.Case(tp, "meta", "fp8_w8a8")
    method = Fp8MoEMethod(Mxfp8AsBlockFp8Config())
    layer = torch.nn.Module()
    with torch.device("meta"), get_parallel().override(tp_size=tp, tp_rank=0):  # as on a TP rank
        method.create_weights(layer, num_experts=128, hidden_size=6144, intermediate_size_per_partition=n,
                              params_dtype=torch.bfloat16)
    for ours, sglang in [(case.w1, layer.w13_weight), (case.w2, layer.w2_weight),
                         (case.w1_scale, layer.w13_weight_scale_inv), (case.w2_scale, layer.w2_weight_scale_inv)]:
        assert (ours.shape, ours.dtype) == (sglang.shape, sglang.dtype)
    info = method.get_triton_quant_info(layer)
    kwargs = case.quant_kwargs()
    assert info.use_fp8_w8a8 and kwargs["use_fp8_w8a8"] and kwargs["block_shape"] == info.block_shape == [128, 128]
    assert (case.sglang_dtype, case.block_shape) == (get_config_dtype_str(torch.bfloat16, use_fp8_w8a8=True),
                                                     info.block_shape)
    assert all(tune_moe.valid_for_block_fp8(c, info.block_shape) for m in tune_moe.DEFAULT_M
               for c in tune_moe.candidates(m, "fp8_w8a8"))

    here = tmp_path / f"triton_{triton.__version__.replace('.', '_')}"
    here.mkdir()
    table = {"1": tune_moe.candidates(1, "fp8_w8a8")[0]}
    (here / tune_moe.config_file_name(n, "fp8_w8a8")).write_text(json.dumps(table))
    block_n, block_k = info.block_shape
    assert moe_configs.lookup(128, n, case.sglang_dtype, block_n, block_k, config_dir=tmp_path) == {1: table["1"]}
    assert moe_configs.lookup(128, n, None, 0, 0, config_dir=tmp_path) is None  # bf16 is another file
    bf16_dir = tmp_path / "bf16"  # another folder: lookup caches the miss above
    (bf16_dir / here.name).mkdir(parents=True)
    (bf16_dir / here.name / tune_moe.config_file_name(n, "bf16")).write_text(json.dumps(table))
    assert moe_configs.lookup(128, n, None, 0, 0, config_dir=bf16_dir) == {1: table["1"]}


def test_tuner_candidate_space_respects_block_fp8_tiles_and_budget_order():
    """Block-FP8 tiles: BLOCK_SIZE_K divides 128; BLOCK_SIZE_N divides 128 or exceeds it (fused_moe_kernel reads
    one scale per K step and, for N tiles ≤ 128, one per tile). Budget plan: TP8 first, both dtypes per TP, decode
    M before larger M."""
    from benchmarks import tune_moe

    assert tune_moe.valid_for_block_fp8(dict(BLOCK_SIZE_N=64, BLOCK_SIZE_K=128))
    assert tune_moe.valid_for_block_fp8(dict(BLOCK_SIZE_N=256, BLOCK_SIZE_K=64))
    assert not tune_moe.valid_for_block_fp8(dict(BLOCK_SIZE_N=128, BLOCK_SIZE_K=256))
    assert not tune_moe.valid_for_block_fp8(dict(BLOCK_SIZE_N=96, BLOCK_SIZE_K=128))
    # the H200 run's OutOfResources for bf16 64x256x128, 3 stages: "Required: 245760, Hardware limit: 232448"
    assert tune_moe.pipelined_smem_bytes(64, 256, 128, 3, "bf16") == 245760 > tune_moe.HOPPER_SMEM_BYTES == 232448
    for dtype in tune_moe.DTYPES:
        for m in tune_moe.DEFAULT_M:
            assert all(tune_moe.pipelined_smem_bytes(c["BLOCK_SIZE_M"], c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"],
                                                     c["num_stages"], dtype) <= 232448
                       for c in tune_moe.candidates(m, dtype))
    shapes, passes = tune_moe.plan([8, 4, 2, 1], ["bf16", "fp8_w8a8"], tune_moe.DEFAULT_M)
    assert shapes[:3] == [("bf16", 8), ("fp8_w8a8", 8), ("bf16", 4)] and len(shapes) == 8
    assert passes[0][1] == [1, 2, 4, 8, 16, 32, 64, 128, 256] and passes[-1][1] == [512, 1024, 2048, 4096]
    with pytest.raises(ValueError, match="unknown MoE dtype"):
        tune_moe.sglang_dtype("fp16")


# ---- the tuner's completion of untuned M values (benchmarks/tune_moe.py fill_untuned) ------------------------------
RUN_DIR = "benchmarks/results/2026-11-30-h200-s6"  # the H200 run whose files ship


def _tuner():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import tune_moe

    return root, tune_moe


def test_cpu_reproduces_sglangs_h200_choice_for_every_tuned_m(h200):
    """fill_untuned computes SGLang's config choice off the GPU (device name patched). Oracle: what SGLang itself
    chose on the H200, recorded by the tuner as "sglang_config" for every M it tuned (92 values, 8 shapes)."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    root, tune_moe = _tuner()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test")
    report = json.loads((root / RUN_DIR / "tune_moe.json").read_text())
    checked = 0
    for shape in report["shapes"]:
        case = tune_moe.Case(shape["tp"], "meta", shape["dtype"])
        for m, entry in shape["m"].items():
            assert case.sglang_current_config(int(m)) == entry["sglang_config"], (shape["file"], m)
            checked += 1
    assert checked >= 80


def test_fill_untuned_completes_a_cut_run_from_its_grid(tmp_path, h200):
    """A report written mid-run (no "not_reached" yet, files ending at the last tuned M) is completed from its M grid
    with SGLang's choice, and tuned entries stay; oracle: SGLang's try_get_optimal_moe_config for the missing M."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import try_get_optimal_moe_config
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    root, tune_moe = _tuner()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test")
    shipped = json.loads((root / RUN_DIR / "tune_moe.json").read_text())
    shape = next(s for s in shipped["shapes"] if s["tp"] == 1 and s["dtype"] == "bf16")
    tuned = {m: e["best"] for m, e in shape["m"].items()}
    version_dir = "triton_" + shipped["triton"].replace(".", "_")
    (tmp_path / "configs" / version_dir).mkdir(parents=True)
    (tmp_path / "configs" / version_dir / shape["file"]).write_text(json.dumps(tuned))
    grid = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    report = dict(device=shipped["device"], triton=shipped["triton"], m_grid=grid,
                  shapes=[dict(shape, not_reached=[], m=shape["m"])])
    report["shapes"][0].pop("filled", None)
    tune_moe.fill_untuned(tmp_path, json.loads(json.dumps(report)))  # keys as a JSON round trip leaves them
    got = json.loads((tmp_path / "configs" / version_dir / shape["file"]).read_text())
    assert sorted(map(int, got)) == grid
    for m in grid:
        if str(m) in tuned:
            assert got[str(m)] == tuned[str(m)], m
        else:
            want = try_get_optimal_moe_config((128, 6144, 6144), (128, 6144, 3072), 4, None, m)
            assert got[str(m)] == dict(want), m


def test_shipped_block_fp8_configs_respect_the_block_tiles():
    """Block-FP8 files: every tile reads one weight-scale block per K step (BLOCK_SIZE_K divides 128) and per N tile
    (BLOCK_SIZE_N divides 128 when <= 128) -- fused_moe_kernel's block-scale indexing (k_start // group_k,
    offs_bn // group_n)."""
    from sglang_m3 import moe_configs

    files = sorted(moe_configs.CONFIG_DIR.glob("*/*block_shape=*.json"))
    if not files:
        pytest.skip("no block-FP8 configs packaged")
    for f in files:
        for m, cfg in json.loads(f.read_text()).items():
            bn, bk = cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
            assert 128 % bk == 0 and (bn > 128 or 128 % bn == 0), (f.name, m, cfg)


def test_merge_tuned_configs_into_packaged(tmp_path):
    """scripts/merge_moe_configs.py: a tuning run's M values replace or join the packaged file's entries, the others
    stay, keys come out in numeric order; a file the package lacks is copied; a folder that is no tuning output is
    refused by name."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import merge_moe_configs

    packaged, run = tmp_path / "packaged", tmp_path / "run"
    (packaged / "triton_3_6_0").mkdir(parents=True)
    (run / "configs" / "triton_3_6_0").mkdir(parents=True)
    old = {"1": {"BLOCK_SIZE_M": 16}, "4096": {"BLOCK_SIZE_M": 64}, "64": {"BLOCK_SIZE_M": 32}}
    (packaged / "triton_3_6_0" / "a.json").write_text(json.dumps(old))
    (run / "configs" / "triton_3_6_0" / "a.json").write_text(
        json.dumps({"8192": {"BLOCK_SIZE_M": 128}, "4096": {"BLOCK_SIZE_M": 128}}))
    (run / "configs" / "triton_3_6_0" / "b.json").write_text(json.dumps({"2": {"BLOCK_SIZE_M": 16}}))
    lines = merge_moe_configs.merge(run, packaged)
    got = json.loads((packaged / "triton_3_6_0" / "a.json").read_text())
    assert list(got) == ["1", "64", "4096", "8192"]
    assert got["1"] == old["1"] and got["64"] == old["64"]
    assert got["4096"] == got["8192"] == {"BLOCK_SIZE_M": 128}
    assert json.loads((packaged / "triton_3_6_0" / "b.json").read_text()) == {"2": {"BLOCK_SIZE_M": 16}}
    assert lines == ["triton_3_6_0/a.json: M [4096, 8192]", "triton_3_6_0/b.json: M [2]"]
    with pytest.raises(FileNotFoundError, match="not a tune_moe.py output"):
        merge_moe_configs.merge(tmp_path / "nothing", packaged)
