"""Triton MSA kernels (sglang_m3.attention.kernels) against their torch twins (attention/reference.py).

CPU (always run): the kernels execute under Triton's interpreter, which needs TRITON_INTERPRET=1 set
*before* triton is imported. Other test modules of the same pytest process may already have imported
triton, so the interpreter checks run in worker subprocesses (``python tests/test_kernels.py --worker
CASE ...``, two in parallel) and each pytest test asserts on its case's result. Shapes are tiny: the
interpreter executes every program instance in Python (~0.1 s each).

GPU (``@pytest.mark.gpu``, skipped without CUDA): real M3 shapes (64 q / 4 kv / 4 index heads at TP1,
8 / 1 / 1 on a TP8 rank, D = Di = 128, block 128, top-16), mixed long contexts, extend, and a CUDA-graph
capture/replay of the decode path.

Tolerances. Block selections must equal the twin's exactly, except that two blocks may swap when their
scores (recomputed in float64) lie within ``tol`` of each other: 1e-5 on CPU (fp32 data), and on GPU
1e-4 * (1 + |score|) (bf16 inputs: products are exact in fp32, only the fp32 summation order differs).
Two launch configurations of the kernels (decode vs extend form, prebuilt meta, other split counts) are each
compared with the twin under that allowance, not bit for bit with each other. Attention is compared with the
twin's attention over the same block lists (the twin's selection, or the kernel's own where a whole decode step
is checked, so that a legitimate near-tie flip never skips the output check): fp32 atol/rtol 1e-4 (CPU), bf16
atol 1e-2 / rtol 2e-2 (P is rounded to bf16 for the P @ V tensor-core product, and the output is bf16). Graph
replay vs an eager call of the same launches on the same inputs is bit-exact (same kernels, grids, reductions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__" and "--worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# batches: contiguous random sequences -> SGLang paged layout (random slots and pool rows)
# ----------------------------------------------------------------------------------------------


@contextmanager
def indexer_launches():
    """index_block_topk's kernels record their launches instead of running while the block is active: yields a list
    that fills with (kernel name, kernel, args, kwargs), one per launch; the kernels are restored after. (Also
    used by tests/test_kernels_sm90.py, which compiles the recorded launches.)"""
    from sglang_m3.attention.kernels import indexer as I

    names = ("_indexer_kernel", "_indexer_select_kernel", "_indexer_merge_kernel")
    launches, saved = [], {n: getattr(I, n) for n in names}

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.kernel.fn.__name__, self.kernel, args, kw))

    try:
        for n, kernel in saved.items():
            setattr(I, n, Spy(kernel))
        yield launches
    finally:
        for n, kernel in saved.items():
            setattr(I, n, kernel)


def make_batch(lens, ext, *, hq, hkv, d, di, dv, dtype, seed, device="cpu", extra_rows=0):
    """Request i has seq_lens = lens[i], its last ext[i] tokens are new. Unused cache slots hold NaN
    (a stray read shows), slots and pool rows are random. ``extra_rows`` trailing tokens are owned by
    no request (their output rows must stay untouched)."""
    g = torch.Generator(device=device).manual_seed(seed)
    gc = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    bs = len(lens)
    n_slots = sum(lens) + 7
    perm = torch.randperm(n_slots, generator=gc)
    nan_slot = int(perm[-1])
    rows = torch.randperm(bs + 3, generator=gc)[:bs]
    r2t = torch.full((bs + 3, max(lens) + 9), nan_slot, dtype=torch.int32)
    nan = float("nan")
    ik_cache = torch.full((n_slots, di), nan, dtype=dtype, device=device)
    k_cache = torch.full((n_slots, hkv, d), nan, dtype=dtype, device=device)
    v_cache = torch.full((n_slots, hkv, dv), nan, dtype=dtype, device=device)
    off, tok = 0, []
    for i, n in enumerate(lens):
        slots = perm[off: off + n]
        off += n
        r2t[rows[i], :n] = slots.to(torch.int32)
        s = slots.to(device)
        ik_cache[s], k_cache[s], v_cache[s] = rnd(n, di), rnd(n, hkv, d), rnd(n, hkv, dv)
        tok += [(i, p) for p in range(n - ext[i], n)]
    T = len(tok) + extra_rows
    ext_t = torch.tensor(ext, dtype=torch.int32)
    meta = dict(req_to_token=r2t.to(device), req_pool_indices=rows.to(device),
                seq_lens=torch.tensor(lens, dtype=torch.int64, device=device),
                extend_seq_lens=ext_t.to(device), extend_start_loc=(torch.cumsum(ext_t, 0) - ext_t).to(device))
    return dict(index_q=rnd(T, hkv, di), q=rnd(T, hq, d), index_k_cache=ik_cache, k_cache=k_cache,
                v_cache=v_cache, meta=meta, tok=tok, T=T)


def decode_meta(b):
    """The batch's metadata in the kernels' decode form (extend tensors None)."""
    return {**b["meta"], "extend_seq_lens": None, "extend_start_loc": None}


def block_scores(b, t, h, block_size):
    """float64 block scores (max over visible keys) of token t, index head h."""
    req, pos = b["tok"][t]
    m = b["meta"]
    slots = m["req_to_token"][m["req_pool_indices"][req], : pos + 1].long()
    s = b["index_k_cache"][slots].double() @ b["index_q"][t, h].double()
    nb = pos // block_size + 1
    s = torch.nn.functional.pad(s, (0, nb * block_size - s.numel()), value=float("-inf"))
    return s.view(nb, block_size).amax(-1)


def assert_same_selection(got, want, b, block_size, rel_tol):
    """Exact equality, except swaps of blocks whose float64 scores are within rel_tol * (1 + |s|)."""
    assert got.shape == want.shape and got.dtype == torch.int32
    if torch.equal(got, want):
        return
    got_c, want_c = got.cpu(), want.cpu()
    assert torch.equal((got_c >= 0).sum(-1), (want_c >= 0).sum(-1)), "different selection sizes"
    bad = (got_c != want_c).any(-1).nonzero().tolist()
    for t, h in bad:
        g = [x for x in got_c[t, h].tolist() if x >= 0]
        w = [x for x in want_c[t, h].tolist() if x >= 0]
        assert g == sorted(set(g)), f"row ({t},{h}) not ascending/unique: {got_c[t, h].tolist()}"
        assert got_c[t, h, len(g):].eq(-1).all(), f"row ({t},{h}) badly padded: {got_c[t, h].tolist()}"
        diff = sorted(set(g) ^ set(w))
        sc = block_scores(b, t, h, block_size)
        vals = [float(sc[x]) for x in diff]
        spread = max(vals) - min(vals)
        assert spread <= rel_tol * (1 + max(abs(v) for v in vals)), (
            f"token {t} head {h}: kernel {g} vs twin {w}; differing blocks {diff} have scores {vals}")


def run_both_indexers(b, block_size, topk, init_blocks=0, local_blocks=1, **kw):
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref

    want = ref.index_block_topk(b["index_q"], b["index_k_cache"], **b["meta"], block_size=block_size,
                                topk_blocks=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    got = K.index_block_topk(b["index_q"], b["index_k_cache"], **kw.pop("meta_args", b["meta"]),
                             block_size=block_size, topk_blocks=topk, init_blocks=init_blocks,
                             local_blocks=local_blocks, **kw)
    return got, want


def run_both_attentions(b, sel, block_size, sm_scale, **kw):
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref

    want = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=sel,
                                block_size=block_size, sm_scale=sm_scale)
    got = K.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **kw.pop("meta_args", b["meta"]),
                             block_topk=sel, block_size=block_size, sm_scale=sm_scale, **kw)
    return got, want


# ----------------------------------------------------------------------------------------------
# CPU cases (run by the interpreter worker)
# ----------------------------------------------------------------------------------------------

CPU_CASES = {}


def cpu_case(fn):
    CPU_CASES[fn.__name__] = fn
    return fn


F32 = dict(dtype=torch.float32, rtol=1e-4, atol=1e-4)


@cpu_case
def extend_mixed_fp32_gqa2():
    """Chunk with prefix on a block boundary, decode row, prefill from mid-block prefix, pad rows."""
    from sglang_m3.attention import kernels as K

    lens, ext, bsz, topk = [70, 37, 21, 50], [6, 1, 4, 3], 16, 3
    b = make_batch(lens, ext, hq=4, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=1, extra_rows=2)
    T = b["T"]
    sel_out = torch.full((T, 2, topk), 77, dtype=torch.int32)
    for ns in (None, 1, 2):  # None: default heuristic (2 splits with the worker's 8 "SMs")
        sel_out.fill_(77)
        got, want = run_both_indexers(b, bsz, topk, out=sel_out, num_splits=ns)
        assert got is sel_out and (sel_out[T - 2:] == 77).all()
        assert_same_selection(got[: T - 2], want[: T - 2], b, bsz, 1e-5)
    want_sel = want
    assert (want[: T - 2] >= 0).sum(-1).max() == topk and (want[: T - 2] < 0).any()  # sparse and short rows
    o_out = torch.full((T, 4, 16), 5.0)
    got, want = run_both_attentions(b, want, bsz, 0.25, out=o_out, num_splits=1)
    assert got is o_out and (o_out[T - 2:] == 5.0).all()
    torch.testing.assert_close(got[: T - 2], want[: T - 2], rtol=1e-4, atol=1e-4)
    # the same through a prebuilt meta (BLOCK_T > 1 tiles for the indexer)
    meta = K.prepare_meta(b["meta"]["req_pool_indices"], b["meta"]["seq_lens"], b["meta"]["extend_seq_lens"],
                          b["meta"]["extend_start_loc"], T, index_heads=2)
    assert meta.block_t > 1 and int(meta.tile_ntok.sum()) == T - 2
    assert meta.tok_row[T - 2:].eq(-1).all()
    got2 = K.index_block_topk(b["index_q"], b["index_k_cache"], **b["meta"], block_size=bsz, topk_blocks=topk,
                              meta=meta)
    assert_same_selection(got2[: T - 2], want_sel[: T - 2], b, bsz, 1e-5)


@cpu_case
def indexer_init_local_variants():
    """init/local block settings, long extend over several tiles of one request, key splits + merge."""
    lens, ext, bsz, topk = [150, 90, 64], [40, 7, 1], 16, 3
    b = make_batch(lens, ext, hq=2, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=2)
    for (init_b, local_b), ns in (((1, 2), 1), ((0, 0), 3), ((1, 1), 2), ((0, 2), None)):
        got, want = run_both_indexers(b, bsz, topk, init_b, local_b, num_splits=ns)
        assert_same_selection(got, want, b, bsz, 1e-5)


@cpu_case
def indexer_prefetch_variants():
    """With and without the indexer's load-ahead (chosen by grid size) the selection equals the twin's, for split
    ranges of one, two and many blocks (loads past a split's end must be masked off)."""
    from sglang_m3.attention.kernels import common

    lens, ext, bsz, topk = [150, 90, 64, 47], [5, 1, 1, 2], 16, 3
    b = make_batch(lens, ext, hq=2, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=9)
    saved = common.INDEXER_PREFETCH_PROGRAMS_PER_SM, common.INDEXER_MIN_BLOCKS_PER_SPLIT
    try:
        common.INDEXER_MIN_BLOCKS_PER_SPLIT = 1
        for per_sm in (0, 1 << 20):  # never / always
            common.INDEXER_PREFETCH_PROGRAMS_PER_SM = per_sm
            for ns in (1, 4, 10):
                got, want = run_both_indexers(b, bsz, topk, 1, 1, num_splits=ns)
                assert_same_selection(got, want, b, bsz, 1e-5)
    finally:
        common.INDEXER_PREFETCH_PROGRAMS_PER_SM, common.INDEXER_MIN_BLOCKS_PER_SPLIT = saved


@cpu_case
def indexer_two_pass_matches_twin():
    """The two-pass indexer (score every block, then select) against the twin and against the split variant
    (which must agree exactly: same block scores, same key order): batch sizes 1 / 3 / 7, lengths off the block
    grid, dense rows (<= topk blocks), a lone token, exact block multiples, several init/local settings,
    pass-1 program counts from 1 to more than the blocks; an extend-form batch of one token per request with
    a row owned by no request (its out row must stay untouched) and a request with no new token."""
    from sglang_m3.attention import kernels as K

    bsz, topk = 16, 3
    batches = [([150], 1), ([47, 16, 1], 2), ([200, 33, 48, 17, 129, 96, 5], 2)]  # (lens, kv heads)
    for lens, hkv in batches:
        b = make_batch(lens, [1] * len(lens), hq=2 * hkv, hkv=hkv, d=16, di=16, dv=16, dtype=torch.float32,
                       seed=len(lens))
        for (init_b, local_b), ns in (((0, 1), None), ((1, 2), 1), ((0, 0), 3), ((2, 1), 64)):
            got, want = run_both_indexers(b, bsz, topk, init_b, local_b, meta_args=decode_meta(b), two_pass=True,
                                          num_splits=ns)
            assert_same_selection(got, want, b, bsz, 1e-5)
            split, _ = run_both_indexers(b, bsz, topk, init_b, local_b, meta_args=decode_meta(b), two_pass=False)
            assert_same_selection(split, want, b, bsz, 1e-5)  # both variants agree with the twin up to near-ties
    assert (want >= 0).sum(-1).min() == 1 and (want >= 0).sum(-1).max() == topk  # lone token and sparse rows
    # extend form, one token per tile: request 2 has no new token, the last packed row belongs to nobody
    b = make_batch([90, 33, 40, 64], [1, 1, 0, 1], hq=4, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=5,
                   extra_rows=1)
    meta = K.prepare_meta(b["meta"]["req_pool_indices"], b["meta"]["seq_lens"], b["meta"]["extend_seq_lens"],
                          b["meta"]["extend_start_loc"], b["T"], index_heads=2)
    assert meta.block_t == 1 and K.indexer.uses_two_pass(meta)
    out = torch.full((b["T"], 2, topk), 77, dtype=torch.int32)
    got, want = run_both_indexers(b, bsz, topk, out=out, meta=meta)
    assert (out[-1] == 77).all()
    assert_same_selection(got[:-1], want[:-1], b, bsz, 1e-5)
    with pytest.raises(ValueError, match="one token per tile"):
        b = make_batch([90], [5], hq=2, hkv=1, d=16, di=16, dv=16, dtype=torch.float32, seed=6)
        run_both_indexers(b, bsz, topk, two_pass=True)


@cpu_case
def indexer_select_ties():
    """Pass 2 of the two-pass indexer (radix select) picks exactly the split kernel's blocks -- packed-key order,
    ties to the lower block id -- where block scores tie a lot: index keys rounded to halves (many equal block
    maxima), all keys equal (every block ties), forced init/local blocks (+inf ties); topk below and above the
    visible block count. (The twin's torch.topk orders ties arbitrarily, so it is only held to the near-tie
    allowance.)"""
    for coarse in (True, False):
        b = make_batch([150, 200, 33, 17], [1] * 4, hq=4, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=1)
        if coarse:
            b["index_k_cache"][:] = torch.round(b["index_k_cache"] * 2)
            b["index_q"][:] = torch.round(b["index_q"])
        else:
            b["index_k_cache"][:] = b["index_k_cache"][:1].clone()
        for (init_b, local_b), topk in (((0, 0), 5), ((2, 1), 5), ((0, 1), 16)):
            got, want = run_both_indexers(b, 16, topk, init_b, local_b, meta_args=decode_meta(b), two_pass=True)
            split, _ = run_both_indexers(b, 16, topk, init_b, local_b, meta_args=decode_meta(b), two_pass=False)
            assert torch.equal(got, split), (coarse, init_b, local_b, topk)
            assert_same_selection(got, want, b, 16, 1e-5)


def select_oracle(scores, nb, topk):
    """Top min(topk, nb) block ids of one int32 score-image row by (score desc, id asc), ascending, -1 padded."""
    ids = sorted(range(nb), key=lambda i: (-int(scores[i]), i))[:topk]
    return sorted(ids) + [-1] * (topk - len(ids))


# Pass-2 forms run by indexer_select_exact: (RANK_MAX, RB, CC, G, GC, RT) -- the radix search alone; rows of <= 16
# blocks ranked in row tiles of 4 and column steps of 4 (several of each), longer rows of the same launch on the radix
# search; every row ranked in one tile; rows of <= 4 blocks ranked in one tile of 8, column steps of 4; the threshold
# select alone with groups of 2 (2 groups per step, ranks in 4 x 4 steps) and of 4 (4 per step, 8 x 8); rows of <= 8
# blocks ranked, longer ones by the threshold with groups of 4 (2 per step, 4 x 4).
SELECT_FORMS = ((0, 1, 1, 0, 1, 1), (16, 4, 4, 0, 1, 1), (32, 32, 8, 0, 1, 1), (4, 8, 4, 0, 1, 1),
                (0, 1, 4, 2, 2, 4), (0, 1, 8, 4, 4, 8), (8, 8, 4, 4, 2, 4))


@cpu_case
def indexer_select_exact():
    """Pass 2 alone (_indexer_select_kernel: the radix select, the threshold select and the all-pairs rank of
    select="rank", with rows beyond a form's reach taking the radix or threshold path in the same launch,
    SELECT_FORMS) on hand-made int32
    score-image rows against a plain sort (score descending, ties to the lower id): full-range random images,
    images equal in their top 1 / 2 / 3 bytes (the later radix rounds decide), many exact ties, INT32_MIN /
    INT32_MAX; rows shorter and longer than the interpreter's chunk (8), nb below / equal / above topk, nb =
    RANK_MAX and RANK_MAX + 1, lengths clipped by max_blocks; a token owned by no request keeps its out row, and
    nothing is written past a row's topk columns."""
    from sglang_m3.attention.kernels import indexer as I

    g = torch.Generator().manual_seed(11)
    H, topk, bsz, max_blocks = 2, 5, 4, 23
    # nb 1, 3, 5, 7, 9, 23 (clipped), 13, 23 (clipped), 4, 16, 17
    pos = torch.tensor([0, 9, 17, 27, 35, 91, 50, 200, 12, 63, 64], dtype=torch.int32)
    T = pos.numel()
    rows = torch.arange(T, dtype=torch.int32)
    rows[6] = -1  # owned by no request
    base = torch.randint(-2**31, 2**31 - 1, (T, H, max_blocks), generator=g, dtype=torch.int64)
    sc = base.clone()
    for t in range(T):
        kind = t % 5
        if kind in (1, 2, 3):  # equal top `kind` bytes: later rounds decide
            keep = 32 - 8 * kind
            sc[t] = (base[t, :, :1] >> keep << keep) | (base[t] & ((1 << keep) - 1))
        elif kind == 4:  # heavy ties
            sc[t] = torch.randint(-2, 2, (H, max_blocks), generator=g) * 1000003
    sc[0, 0, 0] = 2**31 - 1
    sc[4, 1, :3] = -2**31
    sc[4, 0, :] = 2**31 - 1
    sc[9, 0, ::2] = -2**31  # ties at INT32_MIN in a ranked row
    sc = ((sc + 2**31) % 2**32 - 2**31).to(torch.int32)
    def check(padded, form):
        out = padded[..., :topk]
        assert (padded[..., topk] == 77).all(), (form, "pass 2 wrote past its TOPK columns")
        for t in range(T):
            for h in range(H):
                if rows[t] < 0:
                    assert (out[t, h] == 77).all(), (form, t)
                    continue
                nb = min(int(pos[t]) // bsz + 1, max_blocks)
                want = select_oracle(sc[t, h].tolist(), nb, topk)
                assert out[t, h].tolist() == want, (form, t, h, nb, out[t, h].tolist(), want)

    for form in SELECT_FORMS:
        rank_max, rb, cc, grp, gc, rt = form
        padded = torch.full((T, H, topk + 1), 77, dtype=torch.int32)  # a guard column after each out row
        out = padded[..., :topk]
        buf_w = max(-(-max_blocks // grp), topk * grp) if grp else 1  # index_block_topk's threshold scratch width
        buf = torch.full((T, H, buf_w), 5, dtype=torch.int64)
        I._indexer_select_kernel[(T, H)](rows, pos, out, out.stride(0), out.stride(1), sc, max_blocks, buf, buf_w,
                                         H=H, BLOCK_SIZE=bsz, TOPK=topk, K_PAD=8, CH=8,
                                         RANK_MAX=rank_max, RB=rb, CC=cc, G=grp, GC=gc, RT=rt, num_warps=4)
        check(padded, form)


@cpu_case
def indexer_pass2_launches():
    """Which pass-2 launch index_block_topk makes, with which settings. Every select gives the same selection (the
    tests around this one), so only this shows that each select takes its module constants (RANK_MAX, the warp
    count): a silent fallback from "rank" to "radix" would pass every selection test. The kernels are spies here
    (pass 1 and pass 2 record their launch instead of running)."""
    from sglang_m3.attention.kernels import common
    from sglang_m3.attention.kernels import indexer as I

    knobs = dict(INDEXER_RANK_MAX_BLOCKS=8, INDEXER_SELECT_WARPS=2, INDEXER_THRESHOLD_GROUP=4,
                 INDEXER_LONG_ROW_SELECT="radix")
    saved = {k: getattr(common, k) for k in knobs}
    b = make_batch([150, 300], [1, 1], hq=4, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=4)

    def run(select):
        with indexer_launches() as launches:
            I.index_block_topk(b["index_q"], b["index_k_cache"], **decode_meta(b), block_size=16, topk_blocks=3,
                               two_pass=True, select=select)
        assert [name for name, *_ in launches] == ["_indexer_kernel", "_indexer_select_kernel"], launches
        return launches[1][3]

    try:
        for k, v in knobs.items():
            setattr(common, k, v)
        rank = run("rank")
        assert (rank["RANK_MAX"], rank["RB"], rank["num_warps"], rank["G"]) == (8, 8, 2, 0), rank
        radix = run("radix")
        assert (radix["RANK_MAX"], radix["num_warps"], radix["G"]) == (0, 2, 0), radix
        thr = run("threshold")
        assert (thr["RANK_MAX"], thr["num_warps"], thr["G"]) == (0, 2, 4), thr
        common.INDEXER_LONG_ROW_SELECT = "threshold"  # the default's rows past RANK_MAX
        rank = run("rank")
        assert (rank["RANK_MAX"], rank["G"]) == (8, 4), rank
    finally:
        for k, v in saved.items():
            setattr(common, k, v)


@cpu_case
def indexer_select_rank_matches_radix():
    """The whole two-pass indexer with select="rank" and "radix" equals the split variant exactly (same
    block scores, same key order), on tie-heavy batches (keys rounded to halves) and plain ones, for several
    init/local/topk settings: with every row ranked (INDEXER_RANK_MAX_BLOCKS 256) and with rows above and below a
    RANK_MAX of 8 in one launch (the longer ones by the radix search or the threshold select, groups of 4); and the
    twin up to near-ties. An
    extend-form batch of one token per request keeps the out row of a token owned by no request. Any other select: ValueError."""
    from sglang_m3.attention.kernels import common

    saved = common.INDEXER_RANK_MAX_BLOCKS, common.INDEXER_LONG_ROW_SELECT, common.INDEXER_THRESHOLD_GROUP
    try:
        common.INDEXER_THRESHOLD_GROUP = 4  # several groups per row at these lengths
        for coarse in (True, False):
            # nb 10, 13, 3, 2, 9, 19 at block 16
            b = make_batch([150, 200, 33, 17, 129, 300], [1] * 6, hq=4, hkv=2, d=16, di=16, dv=16,
                           dtype=torch.float32, seed=3)
            if coarse:
                b["index_k_cache"][:] = torch.round(b["index_k_cache"] * 2)
                b["index_q"][:] = torch.round(b["index_q"])
            for (init_b, local_b), topk in (((0, 1), 3), ((2, 1), 5), ((0, 0), 16)):
                kw = dict(meta_args=decode_meta(b), two_pass=True)
                split, want = run_both_indexers(b, 16, topk, init_b, local_b, meta_args=decode_meta(b), two_pass=False)
                for rank_max, long_rows in ((256, "radix"), (8, "radix"), (8, "threshold")):
                    common.INDEXER_RANK_MAX_BLOCKS, common.INDEXER_LONG_ROW_SELECT = rank_max, long_rows
                    for select in ("rank", "radix", "threshold"):
                        got, _ = run_both_indexers(b, 16, topk, init_b, local_b, select=select, **kw)
                        assert torch.equal(got, split), (select, rank_max, long_rows, coarse, init_b, local_b, topk)
                assert_same_selection(got, want, b, 16, 1e-5)
        b = make_batch([90, 33, 40, 64], [1, 1, 0, 1], hq=4, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=5,
                       extra_rows=1)
        out = torch.full((b["T"], 2, 3), 77, dtype=torch.int32)
        got, want = run_both_indexers(b, 16, 3, out=out, two_pass=True, select="rank")
        assert (out[-1] == 77).all()
        assert_same_selection(got[:-1], want[:-1], b, 16, 1e-5)
    finally:
        common.INDEXER_RANK_MAX_BLOCKS, common.INDEXER_LONG_ROW_SELECT, common.INDEXER_THRESHOLD_GROUP = saved
    with pytest.raises(ValueError, match="select must be"):
        b = make_batch([40], [1], hq=2, hkv=1, d=16, di=16, dv=16, dtype=torch.float32, seed=2)
        run_both_indexers(b, 16, 3, meta_args=decode_meta(b), two_pass=True, select="rank_segments")


@cpu_case
def decode_fp32_mqa_splits():
    """TP8-like grouping (2 q heads / 1 kv head, padded to 16 rows), Di 32, block 32, decode form,
    default splits (2 in the worker) for both kernels, and the extend form on the same batch."""
    lens, bsz, topk = [200, 33, 96, 130], 32, 3
    b = make_batch(lens, [1] * 4, hq=2, hkv=1, d=32, di=32, dv=32, dtype=torch.float32, seed=3)
    got, want = run_both_indexers(b, bsz, topk, meta_args=decode_meta(b))
    assert_same_selection(got, want, b, bsz, 1e-5)
    got_e, _ = run_both_indexers(b, bsz, topk)  # the extend form of the same batch
    assert_same_selection(got_e, want, b, bsz, 1e-5)
    o, o_ref = run_both_attentions(b, want, bsz, 0.2, meta_args=decode_meta(b))
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)


@cpu_case
def bf16_mixed():
    lens, ext, bsz, topk = [45, 80, 120], [3, 1, 2], 16, 3
    b = make_batch(lens, ext, hq=4, hkv=2, d=16, di=32, dv=16, dtype=torch.bfloat16, seed=4)
    got, want = run_both_indexers(b, bsz, topk)
    assert_same_selection(got, want, b, bsz, 1e-5)
    o, o_ref = run_both_attentions(b, want, bsz, 0.25, num_splits=2)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=1e-2)


@cpu_case
def attention_holes_duplicates_out_of_range():
    """Twin semantics of odd lists: unsorted, -1 holes, duplicate ids (count once), ids beyond the
    token's visible blocks (ignored), width != topk; with and without splits."""
    lens, ext, bsz = [60, 29], [3, 2], 8
    b = make_batch(lens, ext, hq=4, hkv=2, d=16, di=16, dv=8, dtype=torch.float32, seed=5)
    g = torch.Generator().manual_seed(5)
    sel = torch.randint(-1, 9, (b["T"], 2, 5), generator=g, dtype=torch.int32)
    sel[0, 0] = torch.tensor([6, 2, 6, -1, 2], dtype=torch.int32)
    sel[1, 1] = -1  # nothing to attend: output 0
    for ns in (1, 2, 5):
        o, o_ref = run_both_attentions(b, sel, bsz, 0.3, num_splits=ns)
        torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    assert (o[1, 2:] == 0).all()


@cpu_case
def block_size_not_power_of_two():
    lens, ext, bsz, topk = [61, 40, 100], [1, 2, 1], 12, 3
    b = make_batch(lens, ext, hq=4, hkv=2, d=16, di=16, dv=16, dtype=torch.float32, seed=6)
    got, want = run_both_indexers(b, bsz, topk, 1, 1)
    assert_same_selection(got, want, b, bsz, 1e-5)
    o, o_ref = run_both_attentions(b, want, bsz, 0.25)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)


@cpu_case
def graph_style_decode_with_frozen_workspace():
    """The decode recipe of kernels/__init__.py: warmup sizes a workspace, freeze, then calls with new
    lengths / slots / rows reuse the same buffers (same addresses) and stay equal to the twin. With the
    two-pass limit at 2 tiles, bs 1 takes the two-pass indexer and bs 3 the split one, under one workspace."""
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention.kernels import common

    bsz, topk, hq, hkv = 16, 3, 2, 1
    width = 129 + 9  # req_to_token width of the batches below (make_batch: longest + 9)
    saved = common.INDEXER_TWO_PASS_MAX_TILES
    common.INDEXER_TWO_PASS_MAX_TILES = 2
    try:
        ws = K.MSAWorkspace("cpu")
        K.warmup(ws, batch_sizes=[1, 3], num_q_heads=hq, num_kv_heads=hkv, head_dim=16, head_dim_v=16,
                 index_dim=16, block_size=bsz, topk_blocks=topk, dtype=torch.float32, device="cpu",
                 context_len=width)
        ws.freeze()
        ptrs = {k: v.data_ptr() for k, v in ws._bufs.items()}
        # both indexer variants and the attention splits were sized (worker: 8 "SMs")
        assert {"indexer.part", "indexer.scores", "attn.acc"} <= set(ptrs)
        for seed, lens in ((7, [90, 17, 64]), (8, [33, 129, 5]), (9, [129]), (10, [77])):
            n = len(lens)
            sel_buf = torch.empty(n, hkv, topk, dtype=torch.int32)
            out_buf = torch.empty(n, hq, 16)
            b = make_batch(lens, [1] * n, hq=hq, hkv=hkv, d=16, di=16, dv=16, dtype=torch.float32, seed=seed)
            m = {**decode_meta(b), "req_to_token": torch.nn.functional.pad(  # the captured (server-wide) width
                b["meta"]["req_to_token"], (0, width - b["meta"]["req_to_token"].shape[1]))}
            meta = K.prepare_meta(m["req_pool_indices"], m["seq_lens"], None, None, n, index_heads=hkv, workspace=ws)
            assert K.indexer.uses_two_pass(meta) == (n == 1)
            got, want = run_both_indexers(b, bsz, topk, meta_args=m, out=sel_buf, meta=meta, workspace=ws)
            assert_same_selection(got, want, b, bsz, 1e-5)
            o, o_ref = run_both_attentions(b, want, bsz, 0.25, meta_args=m, out=out_buf, meta=meta, workspace=ws)
            torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
            assert {k: v.data_ptr() for k, v in ws._bufs.items()} == ptrs
        with pytest.raises(RuntimeError, match="cannot grow"):  # frozen: a bigger batch must not reallocate
            K.prepare_meta(torch.zeros(9, dtype=torch.int64), torch.ones(9, dtype=torch.int64), None, None, 9,
                           index_heads=1, workspace=ws)
        with pytest.raises(RuntimeError, match="indexer.scores"):  # nor a wider req_to_token (two-pass scores)
            m2 = {**m, "req_to_token": torch.nn.functional.pad(m["req_to_token"], (0, bsz))}
            K.index_block_topk(b["index_q"], b["index_k_cache"], **m2, block_size=bsz, topk_blocks=topk,
                               meta=meta, workspace=ws)
    finally:
        common.INDEXER_TWO_PASS_MAX_TILES = saved


def check_store_index_k(device):
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref

    loc = torch.tensor([7, 2, 5], device=device)
    vals = torch.randn(3, 24, device=device)
    # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even, like torch): that pair
    # is only checked on GPU
    pairs = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
    if device == "cuda":
        pairs.append((torch.float32, torch.bfloat16))
    for src_dtype, cache_dtype in pairs:
        src = vals.to(src_dtype)
        for form in (src, src[:, None, :]):
            a = torch.zeros(10, 24, dtype=cache_dtype, device=device)
            c = a.clone()
            K.store_index_k(a, loc, form)
            ref.store_index_k(c, loc, form)
            assert torch.equal(a, c), (src_dtype, cache_dtype)
    with pytest.raises(ValueError, match="ONE shared"):
        K.store_index_k(torch.zeros(9, 24, device=device), loc[:1], torch.zeros(1, 2, 24, device=device))


def check_store_kv_index(device):
    """store_kv_index (one launch) == its twin, bit for bit, and the twin == what SGLang's set_kv_buffer does
    (``cache_k.div_(k_scale).to(cache dtype)``, then index_put) + store_index_k; fp8 values span subnormals,
    the rounding boundary at 464 and beyond (-> NaN); K arrives as a strided view (as from a qkv split)."""
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref

    T, H, D, DV, DI, S = 5, 3, 24, 40, 16, 20
    g = torch.Generator().manual_seed(5)
    loc = torch.tensor([3, 7, 1, 19, 0], device=device)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}

    def same_bits(a, b):  # NaN payloads included
        return torch.equal(a.view(bits[a.element_size()]), b.view(bits[b.element_size()]))

    fp32_cases = [(torch.float32, torch.float32, 1.0, 1.0), (torch.float32, torch.float8_e4m3fn, 0.37, 2.5)]
    for dt, cdt, ks, vs in [(torch.bfloat16, torch.bfloat16, 1.0, 1.0), (torch.bfloat16, torch.float8_e4m3fn, 1.0, 1.0),
                            (torch.bfloat16, torch.float8_e4m3fn, 0.37, 2.5), (torch.float16, torch.float8_e4m3fn, 0.2, 1.0),
                            *fp32_cases]:
        wide = torch.logspace(-5, 3, D)  # e4m3 subnormals (< 2^-6) up to past its range
        k = (torch.randn(T, 2 * H, D, generator=g) * wide).to(dt).to(device)[:, ::2]  # strided heads
        k[0, 0, :3] = torch.tensor([464.0, 465.0, -500.0]).to(dt)
        v = (torch.randn(T, H, DV, generator=g) * 100).to(dt).to(device)
        ik = torch.randn(T, 1, DI, generator=g).to(dt).to(device)
        caches = [torch.zeros(S, H, D, dtype=cdt, device=device), torch.zeros(S, H, DV, dtype=cdt, device=device),
                  torch.zeros(S, DI, dtype=dt, device=device)]
        got, want, pool = ([c.clone() for c in caches] for _ in range(3))
        K.store_kv_index(*got, loc, k, v, ik, k_scale=ks, v_scale=vs)
        ref.store_kv_index(*want, loc, k, v, ik[:, 0], k_scale=ks, v_scale=vs)
        for src, cache, scale in ((k, pool[0], ks), (v, pool[1], vs)):  # MHATokenToKVPool.set_kv_buffer's ops
            x = src.clone().div_(scale).to(cdt) if cdt != dt else src
            cache.view(bits[cache.element_size()])[loc] = x.view(bits[x.element_size()])
        pool[2][loc] = ik[:, 0]
        for i, name in enumerate(("k", "v", "index_k")):
            assert same_bits(got[i], want[i]), (name, dt, cdt, ks)
            assert same_bits(want[i], pool[i]), (name, dt, cdt, ks)
    c = [torch.zeros(S, H, D, device=device), torch.zeros(S, H, D, device=device), torch.zeros(S, DI, device=device)]
    x = torch.zeros(T, H, D, device=device)
    for args, match in (((x, x, torch.zeros(T, 2, DI, device=device)), "ONE shared"),
                        ((x[:, :2], x, torch.zeros(T, DI, device=device)), "k must be"),
                        ((x, x, torch.zeros(T, DI + 1, device=device)), "index_k must be")):
        with pytest.raises(ValueError, match=match):
            K.store_kv_index(*c, loc, *args)
    with pytest.raises(ValueError, match="must be > 0"):
        K.store_kv_index(*c, loc, x, x, torch.zeros(T, DI, device=device), k_scale=0.0)


def check_store_kv(device):
    """store_kv (a dense layer's K/V rows, already in the cache dtype) == its twin == one row written per slot,
    bit for bit: bf16, and fp8 bit patterns as the pool hands them over (uint8); K as a strided view; slots other
    than loc untouched; a K of another dtype than the cache's is refused."""
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref

    T, H, D, DV, S = 5, 3, 24, 40, 20
    g = torch.Generator().manual_seed(6)
    loc = torch.tensor([3, 7, 1, 19, 0], device=device)
    for dt in (torch.bfloat16, torch.uint8):
        k = (torch.randn(T, 2 * H, D, generator=g) * 50).to(torch.float8_e4m3fn).view(torch.uint8) \
            if dt == torch.uint8 else torch.randn(T, 2 * H, D, generator=g).to(dt)
        k = k.to(device)[:, ::2]  # strided heads
        v = (torch.randn(T, H, DV, generator=g) * 50).to(torch.float8_e4m3fn).view(torch.uint8) \
            if dt == torch.uint8 else torch.randn(T, H, DV, generator=g).to(dt)
        v = v.to(device)
        caches = [torch.randint(0, 100, (S, H, D), generator=g).to(dt).to(device),
                  torch.randint(0, 100, (S, H, DV), generator=g).to(dt).to(device)]
        got, want, rows = ([c.clone() for c in caches] for _ in range(3))
        K.store_kv(*got, loc, k, v)
        ref.store_kv(*want, loc, k, v)
        for i, slot in enumerate(loc.tolist()):
            rows[0][slot], rows[1][slot] = k[i], v[i]
        for a, b, c in zip(got, want, rows):
            assert torch.equal(a, b) and torch.equal(b, c), dt
    with pytest.raises(ValueError, match="k must be"):
        K.store_kv(*caches, loc, k.float(), v)


@cpu_case
def store_index_k_matches_twin():
    check_store_index_k("cpu")
    check_store_kv_index("cpu")
    check_store_kv("cpu")


# Two workers, roughly balanced (interpreter seconds, unloaded 2-core machine).
_WORKER_SPLIT = [
    ["extend_mixed_fp32_gqa2", "store_index_k_matches_twin", "block_size_not_power_of_two",
     "attention_holes_duplicates_out_of_range"],
    ["indexer_init_local_variants", "decode_fp32_mqa_splits", "bf16_mixed",
     "graph_style_decode_with_frozen_workspace"],
    ["indexer_prefetch_variants", "indexer_two_pass_matches_twin", "indexer_select_ties",
     "indexer_select_exact", "indexer_select_rank_matches_radix", "indexer_pass2_launches"],
]
assert sorted(sum(_WORKER_SPLIT, [])) == sorted(CPU_CASES)


def _worker(names):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from sglang_m3.attention.kernels import common

    common._DEFAULT_SMS = 8  # tiny batches then still take the split (+ merge) paths
    results = {}
    for name in names:
        t0 = time.time()
        try:
            CPU_CASES[name]()
            results[name] = {"ok": True, "seconds": round(time.time() - t0, 1)}
        except BaseException:  # noqa: BLE001 -- reported to the parent test
            results[name] = {"ok": False, "error": traceback.format_exc()}
    print("@@RESULTS@@" + json.dumps(results), flush=True)


MAX_WORKERS = 2


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p))
    def start(names):
        return subprocess.Popen([sys.executable, __file__, "--worker", *names], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # At most MAX_WORKERS interpreters at once (CI has two cores); the next group starts when one finishes.
    queue = list(_WORKER_SPLIT)
    running = [start(queue.pop(0)) for _ in range(min(MAX_WORKERS, len(queue)))]
    results = {}
    while running:
        p = running.pop(0)
        out, _ = p.communicate(timeout=900)
        if queue:
            running.append(start(queue.pop(0)))
        line = [ln for ln in out.splitlines() if ln.startswith("@@RESULTS@@")]
        if not line:
            raise RuntimeError(f"interpreter worker died (rc={p.returncode}):\n{out[-6000:]}")
        results.update(json.loads(line[-1][len("@@RESULTS@@"):]))
    return results


@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_kernel_matches_twin_interpreted(case, interpreter_results):
    r = interpreter_results[case]
    assert r["ok"], r.get("error")


# ----------------------------------------------------------------------------------------------
# GPU: real shapes
# ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA (and compiled Triton)")
BLOCK, TOPK, HD = 128, 16, 128
GPU_HEADS = [pytest.param(64, 4, id="tp1-64q-4kv"), pytest.param(8, 1, id="tp8-8q-1kv")]
BF16_TOL = dict(rtol=2e-2, atol=1e-2)


def gpu_batch(lens, ext, hq, hkv, seed, extra_rows=0):
    return make_batch(lens, ext, hq=hq, hkv=hkv, d=HD, di=HD, dv=HD, dtype=torch.bfloat16, seed=seed,
                      device="cuda", extra_rows=extra_rows)


def check_gpu(b, hq, **idx_kw):
    got, want = run_both_indexers(b, BLOCK, TOPK, **idx_kw)
    n = len(b["tok"])
    assert_same_selection(got[:n], want[:n], b, BLOCK, 1e-4)
    o, o_ref = run_both_attentions(b, want, BLOCK, HD ** -0.5)
    torch.testing.assert_close(o[:n].float(), o_ref[:n].float(), **BF16_TOL)
    return got, want


def check_gpu_indexer_variants(b, got):
    """A decode batch through both indexer variants (two-pass and split, forced) in the decode form: each must
    select as ``got`` (the default variant's selection, already checked against the twin), with the near-tie
    allowance: both compute each block score with the same dot, but they are separately compiled kernels. The
    two-pass indexer with each pass 2 ("radix", "rank", "threshold"): they select from the same pass-1 score images,
    so exactly equal (rank: rows of <= INDEXER_RANK_MAX_BLOCKS blocks ranked, longer ones by
    INDEXER_LONG_ROW_SELECT)."""
    from sglang_m3.attention import kernels as K

    sels = {}
    for two_pass, select in ((True, "radix"), (True, "rank"), (True, "threshold"), (False, "radix")):
        sel = K.index_block_topk(b["index_q"], b["index_k_cache"], **decode_meta(b), block_size=BLOCK,
                                 topk_blocks=TOPK, two_pass=two_pass, select=select)
        assert_same_selection(sel, got, b, BLOCK, 1e-4)
        sels[two_pass, select] = sel
    assert torch.equal(sels[True, "rank"], sels[True, "radix"]), "rank and radix pass 2 differ"
    assert torch.equal(sels[True, "threshold"], sels[True, "radix"]), "threshold and radix pass 2 differ"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv", GPU_HEADS)
def test_gpu_decode_mixed_long_contexts(hq, hkv):
    # 128K + odd, exactly 16 and 17 blocks, sparsity threshold +- 1, tiny, mid-size odd lengths
    lens = [131072 + 77, 2048, 2049, 16 * 128 + 129, 1, 100, 70001, 128 * 17]
    b = gpu_batch(lens, [1] * len(lens), hq, hkv, seed=11)
    got, want = check_gpu(b, hq)
    got_d, _ = run_both_indexers(b, BLOCK, TOPK, meta_args=decode_meta(b))
    assert_same_selection(got_d, want, b, BLOCK, 1e-4)
    check_gpu_indexer_variants(b, got)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv", GPU_HEADS)
@pytest.mark.parametrize("bs", [1, 8, 37, 256])
def test_gpu_decode_batch_sizes(hq, hkv, bs):
    g = torch.Generator().manual_seed(bs)
    top = 32768 if bs > 40 else 131072
    lens = torch.randint(1, top, (bs,), generator=g).tolist()
    b = gpu_batch(lens, [1] * bs, hq, hkv, seed=bs)
    got, _ = check_gpu(b, hq, meta_args=decode_meta(b))  # the decode form: the variant rule applies
    check_gpu_indexer_variants(b, got)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv", GPU_HEADS)
def test_gpu_extend_prefix_chunk_and_prefill(hq, hkv):
    # chunk of 2053 tokens after a 38 000-token prefix ending mid-block, a full 3000-token prefill,
    # a 7-token extend (speculative-verify-like), a decode row, and 3 pad rows owned by nobody
    lens, ext = [40053, 3000, 4100, 9000], [2053, 3000, 7, 1]
    b = gpu_batch(lens, ext, hq, hkv, seed=12, extra_rows=3)
    check_gpu(b, hq)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv", GPU_HEADS)
@pytest.mark.parametrize("bs,select", [(4, "radix"), (4, "rank"), (4, "threshold"), (40, "radix")])
def test_gpu_cuda_graph_decode_replay(hq, hkv, bs, select):
    """Capture store + indexer + attention at bs=max_bs with one set of lengths; replay with new
    lengths, slots, pool rows and values. Replays must be bit-identical to eager calls on the same
    inputs (same kernels, same grid and split counts, deterministic reductions) and match the twins.
    bs 4 takes the two-pass indexer (with each pass 2; "rank": rows up to INDEXER_RANK_MAX_BLOCKS blocks are ranked,
    the 128K one takes INDEXER_LONG_ROW_SELECT in the same launch), bs 40 the split one (INDEXER_TWO_PASS_MAX_TILES =
    32)."""
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention.kernels import common

    g = torch.Generator().manual_seed(21)
    sets = [torch.randint(1, 40000, (bs,), generator=g).tolist() for _ in range(3)]
    sets[1][0], sets[2][1] = 131072 + 5, 1
    cap = max(max(s) for s in sets) + 16
    bA = gpu_batch(sets[0], [1] * bs, hq, hkv, seed=30)
    # static graph inputs (what SGLang's graph runner copies into before each replay)
    n_slots = bs * cap + 8
    r2t = torch.zeros(bs + 3, cap, dtype=torch.int32, device="cuda")
    ik = torch.zeros(n_slots, HD, dtype=torch.bfloat16, device="cuda")
    kc = torch.zeros(n_slots, hkv, HD, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    rpi = torch.zeros(bs, dtype=torch.int64, device="cuda")
    seq = torch.ones(bs, dtype=torch.int64, device="cuda")
    iq = torch.zeros(bs, hkv, HD, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(bs, hq, HD, dtype=torch.bfloat16, device="cuda")
    new_ik = torch.zeros(bs, HD, dtype=torch.bfloat16, device="cuda")
    new_k = torch.zeros(bs, hkv, HD, dtype=torch.bfloat16, device="cuda")
    new_v = torch.zeros(bs, hkv, HD, dtype=torch.bfloat16, device="cuda")
    loc = torch.zeros(bs, dtype=torch.int64, device="cuda")

    def load(b):
        m = b["meta"]
        nr, w = m["req_to_token"].shape
        n = b["index_k_cache"].shape[0]
        r2t.zero_()
        r2t[:nr, :w] = m["req_to_token"]
        ik[:n], kc[:n], vc[:n] = b["index_k_cache"], b["k_cache"], b["v_cache"]
        rpi.copy_(m["req_pool_indices"])
        seq.copy_(m["seq_lens"])
        iq.copy_(b["index_q"])
        q.copy_(b["q"])
        # the new token's K, V and index key are (re)written by the captured store_kv_index, as in a forward
        last = seq - 1
        loc.copy_(r2t[rpi, last].long())
        new_ik.copy_(ik[loc])
        new_k.copy_(kc[loc])
        new_v.copy_(vc[loc])

    ws = K.MSAWorkspace("cuda")
    K.warmup(ws, batch_sizes=[1, bs], num_q_heads=hq, num_kv_heads=hkv, head_dim=HD, head_dim_v=HD,
             index_dim=HD, block_size=BLOCK, topk_blocks=TOPK, device="cuda", context_len=cap)
    if select != "threshold":  # warmup alone must have sized every buffer these need
        ws.freeze()
    # (a forced select="threshold" sizes its own scratch in the eager step before the capture, then freezes)
    # warmed bs 1 (and 4) take the two-pass indexer, bs 40 the split one
    assert 4 <= common.INDEXER_TWO_PASS_MAX_TILES < 40, "update the bs parametrisation to cover both variants"
    assert "indexer.scores" in ws._bufs and ("indexer.part" in ws._bufs) == (bs > common.INDEXER_TWO_PASS_MAX_TILES)
    sel_buf = torch.empty(bs, hkv, TOPK, dtype=torch.int32, device="cuda")
    out_buf = torch.empty(bs, hq, HD, dtype=torch.bfloat16, device="cuda")

    def step():
        meta = K.prepare_meta(rpi, seq, None, None, bs, index_heads=hkv, workspace=ws)
        K.store_kv_index(kc, vc, ik, loc, new_k, new_v, new_ik)
        K.index_block_topk(iq, ik, r2t, rpi, seq, None, None, block_size=BLOCK, topk_blocks=TOPK,
                           out=sel_buf, meta=meta, workspace=ws, select=select)
        K.sparse_attention(q, kc, vc, r2t, rpi, seq, None, None, sel_buf, block_size=BLOCK,
                           sm_scale=HD ** -0.5, out=out_buf, meta=meta, workspace=ws)

    load(bA)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    ws.freeze()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for i, lens in enumerate(sets):
        b = bA if i == 0 else gpu_batch(lens, [1] * bs, hq, hkv, seed=30 + i)
        load(b)
        graph.replay()
        torch.cuda.synchronize()
        sel_g, out_g = sel_buf.clone(), out_buf.clone()
        step()  # eager, same inputs
        assert torch.equal(sel_g, sel_buf), f"replay {i}: graph and eager selections differ"
        assert torch.equal(out_g, out_buf), f"replay {i}: graph and eager outputs differ"
        from sglang_m3.attention import reference as ref

        want = ref.index_block_topk(iq, ik, r2t, rpi, seq, torch.ones_like(seq), torch.arange(bs, device="cuda"),
                                    block_size=BLOCK, topk_blocks=TOPK)
        b_view = {**b, "index_k_cache": ik, "index_q": iq,
                  "meta": {**b["meta"], "req_to_token": r2t, "req_pool_indices": rpi}}
        assert_same_selection(sel_g, want, b_view, BLOCK, 1e-4)
        # (on the kernel's own selection: a near-tie may legitimately pick another block than the twin)
        o_ref = ref.sparse_attention(q, kc, vc, r2t, rpi, seq, torch.ones_like(seq), torch.arange(bs, device="cuda"),
                                     sel_g, block_size=BLOCK, sm_scale=HD ** -0.5)
        torch.testing.assert_close(out_g.float(), o_ref.float(), **BF16_TOL)


@pytest.mark.gpu
@needs_cuda
def test_gpu_store_index_k():
    check_store_index_k("cuda")
    check_store_kv_index("cuda")
    check_store_kv("cuda")


def check_timed_results(b, sel, out):
    """The timed decode calls' results: selection = the twin's (near-tie allowance), output = the twin's attention
    over the kernel's own selection."""
    from sglang_m3.attention import reference as ref

    want = ref.index_block_topk(b["index_q"], b["index_k_cache"], **b["meta"], block_size=BLOCK, topk_blocks=TOPK)
    assert_same_selection(sel, want, b, BLOCK, 1e-4)
    o_ref = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=sel, block_size=BLOCK,
                                 sm_scale=HD ** -0.5)
    torch.testing.assert_close(out.float(), o_ref.float(), **BF16_TOL)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_timings(capsys):
    """Prints eager decode latencies (do_bench, L2 warm) of the indexer -- both variants up to bs 32 -- and of the
    attention, for the report (benchmarks/kernel_decode.py is the graph-replay benchmark). Asserted: what is timed
    is right (check_timed_results); the times themselves are not judged here."""
    from sglang_m3.attention import kernels as K

    rows = []
    for hq, hkv in ((64, 4), (8, 1)):
        for bs, ctx in ((1, 4096), (1, 131072), (8, 32768), (32, 32768), (256, 8192), (256, 32768)):
            b = gpu_batch([ctx] * bs, [1] * bs, hq, hkv, seed=1)
            m = decode_meta(b)
            ws = K.MSAWorkspace("cuda")
            sel = torch.empty(bs, hkv, TOPK, dtype=torch.int32, device="cuda")
            out = torch.empty(bs, hq, HD, dtype=torch.bfloat16, device="cuda")

            def idx(two_pass=None, select="radix"):
                meta = K.prepare_meta(m["req_pool_indices"], m["seq_lens"], None, None, bs, index_heads=hkv,
                                      workspace=ws)
                K.index_block_topk(b["index_q"], b["index_k_cache"], **m, block_size=BLOCK, topk_blocks=TOPK,
                                   out=sel, meta=meta, workspace=ws, two_pass=two_pass, select=select)
                return meta

            def attn(meta):
                K.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **m, block_topk=sel, block_size=BLOCK,
                                   sm_scale=HD ** -0.5, out=out, meta=meta, workspace=ws)

            meta = idx()
            attn(meta)
            check_timed_results(b, sel, out)
            import triton.testing as tt

            t_idx = tt.do_bench(idx, warmup=5, rep=30) * 1e3
            t_att = tt.do_bench(lambda: attn(meta), warmup=5, rep=30) * 1e3
            both = ""
            if bs <= 32:
                t2, t1 = (tt.do_bench(lambda v=v: idx(v), warmup=5, rep=30) * 1e3 for v in (True, False))
                tr = tt.do_bench(lambda: idx(True, "rank"), warmup=5, rep=30) * 1e3
                both = f" [two-pass {t2:.1f} (rank pass 2: {tr:.1f}), split {t1:.1f}]"
            key_bytes = bs * ctx * HD * 2
            rows.append(f"hq={hq:2d} hkv={hkv} bs={bs:3d} ctx={ctx:6d}: indexer {t_idx:8.1f} us{both} "
                        f"({key_bytes / t_idx / 1e3:6.0f} GB/s of index keys), attention {t_att:7.1f} us")
            del b
    with capsys.disabled():
        print("\n" + "\n".join(rows))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1:])
