"""--json-model-override-args on M3 (issue 8): nested objects merge recursively into the config (VL packaging:
into `text_config`; flat: into the top level), the merged config goes through m3_text_view's validation, and the
overrides reach the served model (served logprobs equal the HF oracle of a checkpoint written with those values)."""

from __future__ import annotations

import json

import pytest
import torch

import sglang_m3
from sglang_m3.config import M3ConfigError, m3_text_view

try:
    from tests.hf_oracle import hf_logits
except ImportError:
    from hf_oracle import hf_logits

sglang_m3.enable()  # the plugin's get_config hook, in this process

LOGPROB_TOL = 2e-4  # fp32 served vs fp32 HF, as in test_server.py
TOPK3_THETA = {"sparse_attention_config": {"sparse_topk_blocks": 3}, "rope_theta": 10000.0}


def sglang_config(path, overrides: dict):
    """The config an SGLang server builds from the checkpoint and --json-model-override-args (ModelConfig path)."""
    from sglang.srt.utils.hf_transformers.config import get_config

    return get_config(str(path), trust_remote_code=False, model_override_args=overrides)


@pytest.fixture(scope="module")
def vl(tiny_dir):
    return tiny_dir()


@pytest.fixture(scope="module")
def flat(tiny_dir):
    return tiny_dir(flat=True)


def test_nested_override_merges_into_text_config(vl):
    base = m3_text_view(sglang_config(vl, {}))
    view = m3_text_view(sglang_config(vl, {"text_config": TOPK3_THETA}))
    assert (view.sparse.topk_blocks, view.rope_theta) == (3, 10000.0)
    # everything else as in the checkpoint (SGLang alone would replace text_config / sparse_attention_config)
    assert view.sparse_layers == base.sparse_layers != ()
    assert (view.sparse.block_size, view.sparse.local_blocks, view.num_layers, view.vocab_size) == (
        base.sparse.block_size, base.sparse.local_blocks, base.num_layers, base.vocab_size)
    # the cached un-overridden config is untouched
    assert m3_text_view(sglang_config(vl, {})) == base


def test_flat_override_merges_on_a_flat_checkpoint(flat):
    base = m3_text_view(sglang_config(flat, {}))
    view = m3_text_view(sglang_config(flat, {**TOPK3_THETA, "max_position_embeddings": 4096}))
    assert (view.sparse.topk_blocks, view.rope_theta, view.max_position_embeddings) == (3, 10000.0, 4096)
    assert view.sparse_layers == base.sparse_layers != ()  # sparse_attention_config merged, not replaced


def test_top_level_text_field_on_vl_is_refused_by_name(vl):
    with pytest.raises(M3ConfigError, match="'rope_theta' is a text_config field"):
        sglang_config(vl, {"rope_theta": 1.0})


@pytest.mark.parametrize("override,field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"sparse_attention_config": {"sparse_score_type": "mean"}}, "sparse_score_type"),
    ({"sparse_attention_config": {"sparse_topk_blocks": 1, "sparse_local_block": 2}}, "sparse_local_block"),
])
def test_unsupported_override_is_refused_by_name(vl, override, field):
    config = sglang_config(vl, {"text_config": override})
    with pytest.raises(M3ConfigError, match=field):
        m3_text_view(config)


@pytest.mark.server
def test_unsupported_override_stops_the_server_naming_it(start_server, vl):
    server = start_server(vl, "--json-model-override-args",
                          json.dumps({"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}),
                          wait=False)
    try:
        rc = server.wait_exit(timeout=600)
    finally:
        log = server.log()
        server.stop()
    assert rc != 0 and "rope_scaling" in log and "unsupported MiniMax-M3 config" in log, log[-3000:]


def _served_logprobs(server, ids):
    import urllib.request

    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]


def _hf_logprobs(ckpt, ids):
    # per KV group: M3's selection (the HF code pools it over index heads, exact only at one KV head)
    logp = torch.log_softmax(hf_logits(ckpt, ids, per_kv_group=True).double(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


@pytest.mark.server
def test_overrides_reach_the_served_model(start_server, vl, tmp_path):
    """The VL checkpoint (top-2, rope_theta 5e6) served with a nested override to top-3 and rope_theta 1e4 gives the
    logprobs of a checkpoint written with those values (HF oracle), not those of the original; the prompt (600
    tokens) is past both dense limits (256, 384), so the top-k decides which blocks every late query reads."""
    from sglang_m3 import tiny

    ref = tiny.write_tiny_checkpoint(tmp_path / "ref", dtype="float32", topk_blocks=3)
    cfg = json.loads((ref / "config.json").read_text())
    cfg["text_config"]["rope_theta"] = 10000.0
    (ref / "config.json").write_text(json.dumps(cfg))
    server = start_server(vl, "--json-model-override-args", json.dumps({"text_config": TOPK3_THETA}))
    assert "top-3 blocks (dense up to 384 tokens)" in server.log() and "rope_theta 10000" in server.log()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(32, 127, (600,), generator=g).tolist()
    served = _served_logprobs(server, ids)
    gap = lambda a, b: max(abs(x - y) for x, y in zip(a, b))  # noqa: E731
    assert gap(served, _hf_logprobs(ref, ids)) < LOGPROB_TOL
    assert gap(served, _hf_logprobs(vl, ids)) > 10 * LOGPROB_TOL
