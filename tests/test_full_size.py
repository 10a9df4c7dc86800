"""benchmarks/full_size.py: the per-GPU memory arithmetic behind the full-size benchmark's layer counts (issue 12).

Oracles: the bytes of a checkpoint the tiny writer actually saves (tp 1), the tensors that checkpoint holds for the
replication rule (tp > 1), and the KV pool's own index-lane size function."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import full_size  # noqa: E402

REPLICATED = ("norm.weight", "index_k_proj.weight", "gate.weight", "e_score_correction_bias")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A flat bf16 tiny checkpoint with 4 KV heads (so tp 2 and 4 split them) and its config."""
    from sglang_m3.tiny import write_tiny_checkpoint
    from sglang_m3.tiny_config import build_text_config

    over = dict(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("fs"), flat=True, dtype="bfloat16", **over)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    nbytes = {k: torch.Size(s).numel() * (4 if dtypes[k] == "F32" else 2) for k, s in sizes.items()}
    return build_text_config(**over), nbytes


def test_tp1_weight_bytes_equal_the_written_checkpoint(tiny):
    cfg, nbytes = tiny
    assert full_size.rank_weight_bytes(cfg, 1) == sum(nbytes.values())


@pytest.mark.parametrize("tp", [2, 4])
def test_split_except_replicated_tensors(tiny, tp):
    """With tp dividing the KV heads, tp ranks hold the checkpoint once plus (tp - 1) extra copies of the
    replicated tensors (norms, the shared index-key head, the router)."""
    cfg, nbytes = tiny
    replicated = sum(b for k, b in nbytes.items() if k.endswith(REPLICATED))
    assert replicated > 0
    assert full_size.rank_weight_bytes(cfg, tp) * tp == pytest.approx(sum(nbytes.values()) + (tp - 1) * replicated,
                                                                      abs=tp)


def test_kv_heads_replicated_past_their_count(tiny):
    """tp 8 > 4 KV heads: a rank keeps one KV head (and its index heads), not half of one."""
    cfg, nbytes = tiny
    per_head = sum(b for k, b in nbytes.items() if k.endswith(("k_proj.weight", "v_proj.weight", "index_q_proj.weight"))
                   and "index_k_proj" not in k) / cfg["num_key_value_heads"]
    assert full_size.rank_weight_bytes(cfg, 8) - full_size.rank_weight_bytes(cfg, 4) == pytest.approx(
        -(sum(nbytes.values()) - sum(b for k, b in nbytes.items() if k.endswith(REPLICATED)) - 4 * per_head) / 8,
        abs=8)


def test_kv_bytes_index_lane_matches_the_pool():
    from sglang_m3.attention.pool import index_k_bytes_per_token

    cfg = full_size.real_config(60)
    sparse_ids = [i for i, s in enumerate(cfg["sparse_attention_config"]["sparse_attention_freq"]) if s]
    lane = index_k_bytes_per_token(sparse_ids, 0, 60, 128, torch.bfloat16)
    for tp, kv_heads in ((1, 4), (2, 2), (8, 1)):
        assert full_size.kv_bytes_per_token(cfg, tp) == 60 * 2 * kv_heads * 128 * 2 + lane


@pytest.mark.parametrize("tp", [2, 8])
def test_layers_that_fit_is_the_largest(tp):
    n = full_size.layers_that_fit(tp)
    assert 4 <= n <= 60 and full_size.budget(n, tp)["fits"]
    assert n == 60 or not full_size.budget(n + 1, tp)["fits"]


@pytest.mark.parametrize("tp", [1, 8])
def test_budget_fits_exactly_up_to_the_static_fraction(tp):
    """budget() at the edge of its rule (weights + runtime allowance + the workload's KV <= mem_fraction x GPU
    bytes): a GPU of exactly that many bytes fits and its pool holds exactly the workload's tokens, one byte less
    does not fit; the dense-layer count, the memory fraction and the token count are the ones asked for. Oracles:
    rank_weight_bytes and kv_bytes_per_token, checked above against a written checkpoint and the KV pool."""
    layers, dense, tokens, frac = 6, 2, 1000, 0.5
    cfg = full_size.real_config(layers, dense)
    assert cfg["moe_layer_freq"] == [0, 0, 1, 1, 1, 1]
    need = full_size.rank_weight_bytes(cfg, tp) + full_size.RUNTIME_OVERHEAD + tokens * full_size.kv_bytes_per_token(
        cfg, tp)
    edge = full_size.budget(layers, tp, dense_layers=dense, gpu_bytes=int(need / frac), mem_fraction=frac,
                            tokens=tokens)
    assert edge["fits"] and edge["kv_tokens_that_fit"] == tokens and edge["dense_layers"] == dense
    assert edge["weights_gb"] * 1e9 == pytest.approx(full_size.rank_weight_bytes(cfg, tp), abs=1e3)
    short = full_size.budget(layers, tp, dense_layers=dense, gpu_bytes=int(need / frac) - 2, mem_fraction=frac,
                             tokens=tokens)
    assert not short["fits"] and short["kv_tokens_that_fit"] == tokens - 1


def test_layers_that_fit_reaches_sixty():
    """On a GPU sized for exactly 60 layers (at the default fraction and workload) the answer is 60, and 59 on one
    byte less; 61 layers are never counted."""
    tp = 8
    need = full_size.budget(60, tp, gpu_bytes=1, mem_fraction=1.0)
    need = (need["weights_gb"] + need["runtime_gb"] + need["kv_gb"]) * 1e9
    gpu = int(need / full_size.MEM_FRACTION_STATIC) + 64
    assert full_size.layers_that_fit(tp, gpu_bytes=gpu) == 60
    assert full_size.layers_that_fit(tp, gpu_bytes=gpu * 4) == 60
    assert full_size.layers_that_fit(tp, gpu_bytes=int(need / full_size.MEM_FRACTION_STATIC) - 2**20) == 59
