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
    with pytest.raises(KeyError, match="layer 0 has no index-key lane"):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_dense_layer_kv_rows_written_to_their_slots(sglang_env, dtype):  # noqa: F811
    """set_kv_buffer on a dense layer (M3KVPool's row store instead of SGLang's JIT store_cache; on CPU its torch
    twin, the Triton kernel is checked against that twin in test_kernels.py): each token's K/V rows land in its
    slot, rounded to the cache dtype as SGLang rounds them (into fp8: K / k_scale, then the cast; at the model
    dtype the scale is not applied), every other slot and layer untouched. Oracle: the rows written one slot at a
    time."""
    from types import SimpleNamespace

    from sglang_m3.attention.pool import M3KVPool

    pool = M3KVPool(64, 1, dtype, 2, 8, 4, "cpu", False, start_layer=0, end_layer=4, enable_alt_stream=False,
                    enable_kv_cache_copy=True, sparse_layer_ids=SPARSE, index_dim=8, index_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    before = [b.clone() for b in all_buffers(pool)]
    loc = torch.tensor([9, 3, 40, 17])
    k, v = torch.randn(4, 2, 8, generator=g) * 3, torch.randn(4, 2, 8, generator=g)
    want_k, want_v = before[0].clone(), before[4].clone()
    for i, slot in enumerate(loc.tolist()):
        want_k[slot] = (k[i] / 2.0 if dtype != k.dtype else k[i]).to(dtype).view(pool.store_dtype)
        want_v[slot] = v[i].to(dtype).view(pool.store_dtype)
    from sglang_m3.attention import reference

    assert pool._dense_kv_store is reference.store_kv  # on CPU: the twin (the kernel: tests/test_kernels.py)
    calls, store = [], pool._dense_kv_store
    pool._dense_kv_store = lambda *a: calls.append(a[2]) or store(*a)
    pool.set_kv_buffer(SimpleNamespace(layer_id=0), loc, k.clone(), v.clone(), k_scale=2.0)
    assert len(calls) == 1 and torch.equal(calls[0], loc)  # SGLang's set_kv_buffer went through our row store
    assert torch.equal(pool.k_buffer[0], want_k) and torch.equal(pool.v_buffer[0], want_v)
    for i, (old, new) in enumerate(zip(before, all_buffers(pool))):
        if i not in (0, 4):
            assert torch.equal(new, old), i


def test_fused_sparse_store_only_for_plain_row_pools(sglang_env):  # noqa: F811
    """The backend stores a sparse layer's K, V and index key in one launch only where the pool's own K/V write is a
    plain row write (backend._plain_kv_rows): M3KVPool (with its dense-layer row store) at the model dtype or fp8;
    not an HND layout, a quantized cache, or a pool whose _store_kv_layer writes some other layout."""
    from sglang_m3.attention.backend import _plain_kv_rows
    from sglang_m3.attention.pool import M3KVPool

    def pool(dtype, **over):
        p = M3KVPool(16, 1, dtype, 2, 8, 4, "cpu", False, start_layer=0, end_layer=4, enable_alt_stream=False,
                     enable_kv_cache_copy=False, sparse_layer_ids=SPARSE, index_dim=8, index_dtype=torch.float32)
        for name, value in over.items():
            setattr(p, name, value)
        return p

    assert _plain_kv_rows(pool(torch.float32)) and _plain_kv_rows(pool(torch.float8_e4m3fn))
    assert not _plain_kv_rows(pool(torch.float32, kv_cache_layout="hnd", use_hnd=True))
    assert not _plain_kv_rows(pool(torch.bfloat16))  # K/V neither at the lane's (model) dtype nor fp8

    class Quantized(M3KVPool):
        is_quantized_kv_cache = True

    class OtherLayout(M3KVPool):
        def _store_kv_layer(self, *args):
            raise NotImplementedError

    for cls in (Quantized, OtherLayout):
        p = pool(torch.float32)
        p.__class__ = cls  # (built as a plain pool: the point is what the backend sees)
        assert not _plain_kv_rows(p), cls.__name__
