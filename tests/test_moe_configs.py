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
"""


def test_hooked_get_moe_configs_answers_our_names_only_while_m3_is_served(tmp_path):
    """The registered hook, in a fresh process with the plugin enabled, through SGLang's own module attribute and
    its caller try_get_optimal_moe_config: for the one name we ship (N=768, which SGLang also bundles a file for,
    tuned for another model), ours once an M3 ModelConfig is built and SGLang's before; for N=384 (no file of ours)
    SGLang's answer. Oracles: the JSON written here; SGLang's function below the hook (``__wrapped__``)."""
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
