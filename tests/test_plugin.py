"""Registration: what SGLang sees with the plugin enabled, and the SGLANG_PLUGINS switch back to the in-tree M3."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import cpu_env

PROBE = """
import sglang_m3
sglang_m3.enable()
sglang_m3.enable()  # idempotent
from transformers import AutoConfig, CONFIG_MAPPING
from sglang.srt.models.registry import ModelRegistry
from sglang.srt.configs import model_config
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
cls = ModelRegistry.models["MiniMaxM3SparseForConditionalGeneration"]
print("vl", getattr(cls, "__module__", cls))
cls = ModelRegistry.models["MiniMaxM3SparseForCausalLM"]
print("text", getattr(cls, "__module__", cls))
print("config", "minimax_m3" in CONFIG_MAPPING)
print("backend", "m3_msa" in ATTENTION_BACKENDS)
print("minimax_sparse", model_config.is_minimax_sparse(type("C", (), {"architectures": ["MiniMaxM3SparseForCausalLM"]})()))
"""


def probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=cpu_env(**env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_enable_registers_everything():
    seen = probe()
    assert seen == {"vl": "sglang_m3.model", "text": "sglang_m3.model", "config": "True", "backend": "True",
                    "minimax_sparse": "False"}


def test_sglang_plugins_switch_leaves_the_in_tree_m3():
    seen = probe(SGLANG_PLUGINS="none")
    assert not seen["vl"].startswith("sglang_m3") and not seen["text"].startswith("sglang_m3")
    assert seen["backend"] == "False" and seen["minimax_sparse"] == "True"
