"""Bad input fails loudly, naming the problem: never random weights, never silent garbage, never a lost request."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.server


def broken_copy(src, dst, *, drop=(), add=None, config=None):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def launch_fails(start_server, ckpt, *flags) -> str:
    server = start_server(ckpt, *flags, wait=False)
    try:
        rc = server.wait_exit(timeout=600)
    finally:
        log = server.log()
        server.stop()
    assert rc != 0, f"server started although it should have refused:\n{log[-3000:]}"
    return log


@pytest.fixture(scope="module")
def flat(tiny_dir):
    return tiny_dir(flat=True)


def test_missing_tensor_is_an_error_naming_it(start_server, flat, tmp_path):
    ckpt = broken_copy(flat, tmp_path / "ckpt", drop=["model.layers.2.self_attn.index_k_proj.weight",
                                                      "model.layers.1.block_sparse_moe.experts.3.w3.weight"])
    log = launch_fails(start_server, ckpt)
    assert "were not (fully) loaded" in log
    assert "model.layers.2.self_attn.index_k_proj.weight" in log
    assert "model.layers.1.block_sparse_moe.experts.w13_weight" in log


def test_unexpected_tensor_is_an_error_naming_it(start_server, flat, tmp_path):
    import torch

    extra = {"model.layers.1.self_attn.index_v_proj.weight": torch.zeros(32, 128)}
    log = launch_fails(start_server, broken_copy(flat, tmp_path / "ckpt", add=extra))
    assert "map to no parameter" in log and "model.layers.1.self_attn.index_v_proj.weight" in log


def test_unsupported_config_value_names_the_field(start_server, flat, tmp_path):
    def gate_on(cfg):
        cfg["attention_output_gate"] = True

    log = launch_fails(start_server, broken_copy(flat, tmp_path / "ckpt", config=gate_on))
    assert "attention_output_gate" in log and "unsupported MiniMax-M3 config" in log


def test_hierarchical_cache_is_refused(start_server, flat):
    log = launch_fails(start_server, flat, "--enable-hierarchical-cache")
    assert "--enable-hierarchical-cache is not supported for MiniMax-M3" in log


def test_over_long_prompt_is_a_clear_error_and_the_server_lives_on(start_server, flat):
    server = start_server(flat, "--context-length", "1024")
    body = {"input_ids": [65] * 1500, "sampling_params": {"max_new_tokens": 4}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=120)
    message = err.value.read().decode()
    assert err.value.code == 400 and "context length" in message.lower(), message
    ok = {"input_ids": [65] * 300, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(ok).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert json.loads(r.read())["meta_info"]["completion_tokens"] == 4
