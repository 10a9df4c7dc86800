"""The index-key lane travels with K/V through every pool path that moves slots, and is counted in sizes."""

from __future__ import annotations

import pytest
import torch

from tests.test_layers import sglang_env  # noqa: F401  (fixture; importing it also sets up SGLang on CPU)

SPARSE = (1, 2, 3)


def make_pool():
    from sglang_m3.attention.pool import M3KVPool

    return M3KVPool(64, 1, torch.float32, 2, 8, 4, "cpu", False, start_layer=0, end_layer=4,
                    enable_alt_stream=False, enable_kv_cache_copy=True, sparse_layer_ids=SPARSE, index_dim=8)


def all_buffers(pool):
    return [*pool.k_buffer, *pool.v_buffer, *pool.index_k_buffer]


@pytest.fixture
def pool(sglang_env):  # noqa: F811
    pool = make_pool()
    g = torch.Generator().manual_seed(0)
    for buf in all_buffers(pool):
        buf.copy_(torch.randn(buf.shape, generator=g))
    return pool


def test_one_index_row_per_slot_for_each_sparse_layer(pool):
    assert [b.shape for b in pool.index_k_buffer] == [torch.Size([65, 8])] * len(SPARSE)
    assert pool.get_index_k_buffer(2) is pool.index_k_buffer[1]
    with pytest.raises(KeyError):
        pool.get_index_k_buffer(0)  # dense layer: no lane


def test_move_kv_cache_moves_index_rows(pool):
    before = [b.clone() for b in all_buffers(pool)]
    tgt, src = torch.tensor([5, 6, 7]), torch.tensor([40, 41, 3])
    pool.move_kv_cache(tgt, src)
    for old, new in zip(before, all_buffers(pool)):
        assert torch.equal(new[tgt], old[src])
        keep = torch.ones(65, dtype=torch.bool)
        keep[tgt] = False
        assert torch.equal(new[keep], old[keep])


def test_cpu_copy_round_trip_includes_index_rows(pool):
    idx = torch.tensor([2, 9, 33])
    before = [b.clone() for b in all_buffers(pool)]
    saved = pool.get_cpu_copy(idx)
    for buf in all_buffers(pool):
        buf[idx] = 0
    pool.load_cpu_copy(saved, idx)
    for old, new in zip(before, all_buffers(pool)):
        assert torch.equal(new, old)


def test_sizes_count_the_index_lane(pool):
    from sglang_m3.attention.pool import index_k_bytes_per_token

    lane = sum(b.numel() * b.element_size() for b in pool.index_k_buffer)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes - v_bytes == lane  # K and V have equal shapes here; the difference is the lane
    assert index_k_bytes_per_token(SPARSE, 0, 4, 8, torch.float32) * 65 == lane
    assert index_k_bytes_per_token(SPARSE, 2, 4, 8, torch.float32) == 2 * 8 * 4  # pipeline stage: layers 2, 3


def test_pipeline_stage_holds_only_its_sparse_layers(sglang_env):  # noqa: F811
    """A pipeline stage's pool (layers 2-3 here) allocates index lanes for its own sparse layers only, and its
    sizes and the cell size's lane term agree on it."""
    from sglang_m3.attention.pool import M3KVPool, index_k_bytes_per_token

    pool = M3KVPool(64, 1, torch.float32, 2, 8, 2, "cpu", False, start_layer=2, end_layer=4,
                    enable_alt_stream=False, enable_kv_cache_copy=True, sparse_layer_ids=SPARSE, index_dim=8)
    assert pool.sparse_layer_ids == (2, 3) and len(pool.index_k_buffer) == 2
    assert pool.get_index_k_buffer(3) is pool.index_k_buffer[1]
    with pytest.raises(KeyError):
        pool.get_index_k_buffer(1)  # sparse, but on the other stage
    lane = sum(b.numel() * b.element_size() for b in pool.index_k_buffer)
    assert lane == index_k_bytes_per_token(SPARSE, 2, 4, 8, torch.float32) * 65
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes - v_bytes == lane
