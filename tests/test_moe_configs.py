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
