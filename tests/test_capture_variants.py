"""Decode-graph warm-up compiles a fixed set of Triton kernel variants, whatever batch sizes are captured (issue 9
§4: cold capture time). Oracle: Triton's own cache key for each launch (its binder for a CUDA sm_90 target and
``compute_cache_key``, as ``JITFunction.run`` looks kernels up), computed on CPU with nothing compiled or run
(benchmarks/capture_variants.record_launches). One distinct key = one compile on a GPU."""

from __future__ import annotations

import pytest

from benchmarks import capture_variants as cv

# The variants by design, for M3's per-rank shapes (bf16): the per-forward metadata kernel; the fused K/V/index-key
# store; the indexer's split kernel + merge (batches > INDEXER_TWO_PASS_MAX_TILES) and its two-pass score kernel +
# select (smaller); the attention kernel with split partials + merge, and (TP1: 4 KV heads fill the SMs from bs 33)
# without splits, writing the output directly.
# ("store": _store_kv_index_kernel, or _store_index_k_kernel where the pool writes K/V itself.)
DESIGN = {"tp1": {"_meta_kernel": 1, "store": 1, "_indexer_kernel": 2, "_indexer_merge_kernel": 1,
                  "_indexer_select_kernel": 1, "_sparse_attn_kernel": 2, "_sparse_attn_merge_kernel": 1},
          "tp8": {"_meta_kernel": 1, "store": 1, "_indexer_kernel": 2, "_indexer_merge_kernel": 1,
                  "_indexer_select_kernel": 1, "_sparse_attn_kernel": 1, "_sparse_attn_merge_kernel": 1}}


@pytest.mark.parametrize("heads", ["tp1", "tp8"])
def test_warmup_compiles_the_same_variants_for_any_batch_sizes(heads):
    per_bs = {bs: cv.recorded_variants([bs], heads) for bs in range(1, 65)}  # a fresh workspace each
    every = {name: set().union(*(seen.get(name, set()) for seen in per_bs.values()))
             for name in set().union(*per_bs.values())}
    # bs 1..64 together compile the design's variants and no more: the batch size (a grid size, and the integer
    # arguments derived from it) is not part of any kernel's key.
    counts = {("store" if name.startswith("_store") else name): len(keys) for name, keys in every.items()}
    assert counts == DESIGN[heads], counts
    # SGLang's capture list, warmed as the backend warms it (one workspace), compiles the same set.
    assert cv.recorded_variants(cv.SGLANG_CAPTURED_64, heads) == every


def test_recorder_sees_integer_specialisation():
    """The recorder is Triton's key: an integer argument without do_not_specialize gets one key per class
    (== 1, divisible by 16, other), a do_not_specialize one a single key; constexprs key by value."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def plain(x_ptr, n, C: tl.constexpr):
        tl.store(x_ptr + n, C)

    @triton.jit(do_not_specialize=["n"])
    def unspecialised(x_ptr, n, C: tl.constexpr):
        tl.store(x_ptr + n, C)

    x = torch.zeros(64)
    with cv.record_launches() as seen:
        for n in (1, 2, 3, 16, 32, 48):
            plain[(1,)](x, n, C=1)
            unspecialised[(1,)](x, n, C=1)
        unspecialised[(1,)](x, 5, C=2)
    assert len(seen["plain"]) == 3
    assert len(seen["unspecialised"]) == 2
