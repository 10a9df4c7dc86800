"""Tests of sglang_m3.attention.reference (MSA, M3_SPEC.md §3) against a brute-force oracle.

The oracle below shares no code with the module under test: it works on contiguous per-request
tensors in float64 and spells the spec's definition out with Python loops over requests, query
positions, heads, blocks and keys. The module under test gets the same data through a randomly
permuted paged cache (req_to_token), whose unused slots hold NaN so that any stray read shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from sglang_m3.attention import reference as ref

H = 2  # index heads == KV heads
HQ = 4  # query heads (GQA group of 2)
DI = 8  # index head dim
D = 8  # q/k head dim
DV = 6  # v head dim
SM_SCALE = D**-0.5


# ----------------------------------------------------------------------------------------------
# brute-force oracle (spec §3.2-3.6), contiguous tensors, float64, literal loops
# ----------------------------------------------------------------------------------------------


def bf_select(dots, p, block_size, topk, init_blocks, local_blocks):
    """dots[p][j] = <iq_h(p), ik(j)> for one head. Returns (sorted selection, block scores, forced)."""
    nb = p // block_size + 1
    scores = []
    for b in range(nb):
        best = -math.inf
        for j in range(b * block_size, min((b + 1) * block_size, p + 1)):  # visible keys of b
            best = max(best, dots[p][j])
        scores.append(best)
    forced = [b for b in range(nb) if b < init_blocks or b >= nb - local_blocks]
    others = sorted((b for b in range(nb) if b not in forced), key=lambda b: -scores[b])
    k = min(topk, nb)
    return sorted(forced + others[: k - len(forced)]), scores, forced


def bf_attend(q, k, v, p, qh, sel, group, block_size):
    """Softmax attention of query head qh at position p over keys j <= p in blocks `sel`."""
    h = qh // group
    logits, vals = [], []
    for j in range(p + 1):
        if j // block_size in sel:
            logits.append(float(torch.dot(q[p, qh], k[j, h])) * SM_SCALE)
            vals.append(v[j, h])
    if not logits:
        return torch.zeros(v.shape[-1], dtype=torch.float64)
    m = max(logits)
    w = [math.exp(x - m) for x in logits]
    return sum(wi * vi for wi, vi in zip(w, vals)) / sum(w)


def dot_tables(seq):
    """Per head, the full token score table as nested lists (float64)."""
    iq, ik = seq["iq"].double(), seq["ik"].double()
    return [(iq[:, h] @ ik.T).tolist() for h in range(iq.shape[1])]


def assert_selection(got_row, sel, scores, forced, topk, tol=1e-4):
    """got_row must be the oracle's selection; a different pick is only tolerated on a near-tie."""
    k = len(sel)
    assert got_row[k:] == [-1] * (topk - k), f"padding wrong: {got_row} vs {sel}"
    got = got_row[:k]
    assert got == sorted(set(got)), f"not sorted/unique: {got_row}"
    if got != sel:
        assert set(forced) <= set(got), f"forced blocks {forced} missing from {got}"
        cut = min(scores[b] for b in sel if b not in forced)
        for b in set(got) ^ set(sel):
            assert 0 <= b < len(scores) and abs(scores[b] - cut) <= tol, (
                f"selection {got} != oracle {sel} (scores {scores})")


# ----------------------------------------------------------------------------------------------
# batch construction: contiguous sequences -> SGLang paged layout
# ----------------------------------------------------------------------------------------------


def make_seqs(lens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return [dict(iq=r(n, H, DI), ik=r(n, DI), q=r(n, HQ, D), k=r(n, H, D), v=r(n, H, DV)) for n in lens]


def pack(seqs, seq_lens, ext_lens, seed=0):
    """Paged batch: new tokens of request i are its positions [seq_lens-ext_lens, seq_lens).

    The caches hold every position of every full sequence (also beyond seq_lens: such keys exist
    but must never be used); slots and pool rows are random; unused slots are NaN.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    full = [s["ik"].shape[0] for s in seqs]
    bs, n_slots, dtype = len(seqs), sum(full) + 5, seqs[0]["k"].dtype
    perm = torch.randperm(n_slots, generator=g)
    nan_slot = int(perm[-1])
    pool_rows = torch.randperm(bs + 3, generator=g)[:bs]
    req_to_token = torch.full((bs + 3, max(full) + 4), nan_slot, dtype=torch.int32)
    ik_cache = torch.full((n_slots, DI), float("nan"), dtype=dtype)
    k_cache = torch.full((n_slots, H, D), float("nan"), dtype=dtype)
    v_cache = torch.full((n_slots, H, DV), float("nan"), dtype=dtype)
    iq, q, off = [], [], 0
    for i, s in enumerate(seqs):
        slots = perm[off: off + full[i]]
        off += full[i]
        req_to_token[pool_rows[i], : full[i]] = slots.to(torch.int32)
        ref.store_index_k(ik_cache, slots, s["ik"][:, None, :])  # [T, 1, Di] form
        k_cache[slots], v_cache[slots] = s["k"], s["v"]
        iq.append(s["iq"][seq_lens[i] - ext_lens[i]: seq_lens[i]])
        q.append(s["q"][seq_lens[i] - ext_lens[i]: seq_lens[i]])
    ext = torch.tensor(ext_lens, dtype=torch.int32)
    meta = dict(req_to_token=req_to_token, req_pool_indices=pool_rows,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int64), extend_seq_lens=ext,
                extend_start_loc=torch.cumsum(ext, 0) - ext)
    return dict(index_q=torch.cat(iq), q=torch.cat(q), index_k_cache=ik_cache,
                k_cache=k_cache, v_cache=v_cache, meta=meta)


def packed_rows(lens, ext_lens):
    """(request, absolute position) of each packed new token."""
    return [(i, p) for i in range(len(lens)) for p in range(lens[i] - ext_lens[i], lens[i])]


def assert_agree_up_to_ties(sel_a, o_a, sel_b, o_b, seqs, rows, block_size, tol=1e-4):
    """Two runs of the module on the same data whose arithmetic differs (query chunking, other matmul shapes, other
    batch layouts): the selections must be equal except for swaps between blocks whose float64 scores lie within
    tol; outputs must agree (atol/rtol 1e-6) where the selections agree, and elsewhere each must be the brute-force
    attention over its own selection."""
    assert sel_a.shape == sel_b.shape and o_a.shape == o_b.shape
    same = (sel_a == sel_b).all(-1)  # [T, H]
    tables = {}
    for t, h in (~same).nonzero().tolist():
        i, p = rows[t]
        dots = tables.setdefault(i, dot_tables(seqs[i]))[h]
        _, scores, _ = bf_select(dots, p, block_size, 1, 0, 1)
        diff = (set(sel_a[t, h].tolist()) ^ set(sel_b[t, h].tolist())) - {-1}
        vals = [scores[b] for b in diff]
        assert vals and max(vals) - min(vals) <= tol, (
            f"row {t} head {h}: {sel_a[t, h].tolist()} vs {sel_b[t, h].tolist()} (scores {vals}): not a near tie")
        s = seqs[i]
        for sel, o in ((sel_a, o_a), (sel_b, o_b)):
            for qh in range(h * (HQ // H), (h + 1) * (HQ // H)):
                want = bf_attend(s["q"].double(), s["k"].double(), s["v"].double(), p, qh,
                                 [x for x in sel[t, h].tolist() if x >= 0], HQ // H, block_size)
                torch.testing.assert_close(o[t, qh].double(), want, atol=1e-5, rtol=1e-5)
    same_q = same.repeat_interleave(HQ // H, dim=1)
    torch.testing.assert_close(o_a[same_q], o_b[same_q], atol=1e-6, rtol=1e-6)
    return int((~same).sum())


def run_ref(b, block_size, topk, init_blocks=0, local_blocks=1, block_topk=None):
    if block_topk is None:
        block_topk = ref.index_block_topk(b["index_q"], b["index_k_cache"], **b["meta"],
                                          block_size=block_size, topk_blocks=topk,
                                          init_blocks=init_blocks, local_blocks=local_blocks)
    o = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=block_topk,
                             block_size=block_size, sm_scale=SM_SCALE)
    return block_topk, o


def check_against_bruteforce(lens, ext_lens, block_size, topk, init_blocks, local_blocks, seed=0):
    seqs = make_seqs(lens, seed)
    b = pack(seqs, lens, ext_lens, seed)
    sel, o = run_ref(b, block_size, topk, init_blocks, local_blocks)
    assert sel.dtype == torch.int32 and sel.shape == (sum(ext_lens), H, topk)
    assert o.dtype == torch.float32 and o.shape == (sum(ext_lens), HQ, DV)
    t = 0
    for i, s in enumerate(seqs):
        dots = dot_tables(s)
        qd, kd, vd = s["q"].double(), s["k"].double(), s["v"].double()
        for p in range(lens[i] - ext_lens[i], lens[i]):
            for h in range(H):
                want = bf_select(dots[h], p, block_size, topk, init_blocks, local_blocks)
                assert_selection(sel[t, h].tolist(), *want, topk)
            for qh in range(HQ):
                # attend over the blocks the module chose (validated just above)
                blocks = [x for x in sel[t, qh // (HQ // H)].tolist() if x >= 0]
                want_o = bf_attend(qd, kd, vd, p, qh, blocks, HQ // H, block_size)
                torch.testing.assert_close(o[t, qh].double(), want_o, atol=1e-5, rtol=1e-5)
            t += 1
    return sel, o


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

# M3 itself uses init 0 / local 1. local_blocks=0 is the only setting in which the query's own
# (partial) block competes on score, i.e. where the indexer's token-level causal mask is observable.
GRID = pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (0, 2), (1, 1), (1, 2), (0, 0)])


@GRID
@pytest.mark.parametrize("block_size,lens,ext_lens", [
    (4, [37, 13, 22, 5], [37, 7, 22, 1]),  # prefill, extend-with-prefix, decode in one batch
    (16, [83, 50, 17, 61], [83, 50, 9, 1]),
])
def test_topk_and_attention_match_bruteforce(block_size, lens, ext_lens, init_blocks, local_blocks):
    sel, _ = check_against_bruteforce(lens, ext_lens, block_size, 3, init_blocks, local_blocks)
    # sparsity is really exercised: some rows select fewer blocks than are visible
    assert (sel >= 0).sum(-1).max() == 3 and max(lens) > 3 * block_size


def test_sparse_attention_given_oracle_topk():
    """sparse_attention alone, fed with the oracle's selection (also duplicates / -1 holes)."""
    lens, ext_lens, bsz, topk = [29, 18], [29, 11], 4, 3
    seqs = make_seqs(lens, seed=3)
    b = pack(seqs, lens, ext_lens, seed=3)
    rows = []
    for i, s in enumerate(seqs):
        dots = dot_tables(s)
        for p in range(lens[i] - ext_lens[i], lens[i]):
            rows.append([bf_select(dots[h], p, bsz, topk, 0, 1)[0] for h in range(H)])
    bt = torch.full((len(rows), H, topk + 2), -1, dtype=torch.int32)
    for t, row in enumerate(rows):
        for h, blocks in enumerate(row):
            # unsorted, a duplicate and a hole: the block set is what counts
            padded = list(reversed(blocks)) + [-1, blocks[0]]
            bt[t, h, : len(padded)] = torch.tensor(padded, dtype=torch.int32)
    _, o = run_ref(b, bsz, topk, block_topk=bt)
    t = 0
    for i, s in enumerate(seqs):
        for p in range(lens[i] - ext_lens[i], lens[i]):
            for qh in range(HQ):
                want = bf_attend(s["q"].double(), s["k"].double(), s["v"].double(), p, qh,
                                 rows[t][qh // 2], 2, bsz)
                torch.testing.assert_close(o[t, qh].double(), want, atol=1e-5, rtol=1e-5)
            t += 1


def test_prefix_ending_mid_block():
    # prefix 13 (block 4: ends inside block 3) + 22 new tokens; second request prefix 6
    check_against_bruteforce([35, 30], [22, 24], 4, 3, 0, 1, seed=1)
    check_against_bruteforce([35, 30], [22, 24], 4, 3, 1, 2, seed=2)


def test_chunked_extend_equals_one_shot():
    lens, bsz, topk = [45, 29], 4, 3
    seqs = make_seqs(lens, seed=4)
    sel1, o1 = run_ref(pack(seqs, lens, lens, seed=4), bsz, topk, 1, 1)
    # request 0 in chunks 10 + 17 + 18, request 1 in 5 + 13 + 11 (prefixes end mid-block)
    ends = [[10, 27, 45], [5, 18, 29]]
    sels, outs = [[], []], [[], []]
    for c in range(3):
        seq_lens = [ends[i][c] for i in range(2)]
        ext = [ends[i][c] - (ends[i][c - 1] if c else 0) for i in range(2)]
        sel, o = run_ref(pack(seqs, seq_lens, ext, seed=4), bsz, topk, 1, 1)
        sels[0].append(sel[: ext[0]])
        sels[1].append(sel[ext[0]:])
        outs[0].append(o[: ext[0]])
        outs[1].append(o[ext[0]:])
    assert_agree_up_to_ties(torch.cat(sels[0] + sels[1]), torch.cat(outs[0] + outs[1]), sel1, o1, seqs,
                            packed_rows(lens, lens), bsz)


def test_decode_equals_last_prefill_row():
    lens, bsz, topk = [45, 29, 64, 7], 4, 3
    seqs = make_seqs(lens, seed=5)
    sel_p, o_p = run_ref(pack(seqs, lens, lens, seed=5), bsz, topk, 0, 2)
    sel_d, o_d = run_ref(pack(seqs, lens, [1] * len(lens), seed=5), bsz, topk, 0, 2)
    last = torch.cumsum(torch.tensor(lens), 0) - 1
    assert_agree_up_to_ties(sel_d, o_d, sel_p[last], o_p[last], seqs, packed_rows(lens, [1] * len(lens)), bsz)


@pytest.mark.parametrize("block_size,lens,ext_lens", [(4, [12, 9, 5], [12, 5, 5]), (16, [48, 33], [48, 1])])
def test_dense_equivalence(block_size, lens, ext_lens):
    """Every sequence <= topk * block_size: all visible blocks selected, MSA == dense causal GQA."""
    topk = 3
    seqs = make_seqs(lens, seed=6)
    sel, o = run_ref(pack(seqs, lens, ext_lens, seed=6), block_size, topk)
    t = 0
    for i, s in enumerate(seqs):
        pos = torch.arange(lens[i] - ext_lens[i], lens[i])
        nb = pos // block_size + 1
        want_sel = torch.where(torch.arange(topk) < nb[:, None], torch.arange(topk), -1)
        assert torch.equal(sel[t: t + ext_lens[i]], want_sel[:, None, :].expand(-1, H, -1).int())
        # plain dense causal GQA attention
        k = s["k"].repeat_interleave(HQ // H, dim=1)
        v = s["v"].repeat_interleave(HQ // H, dim=1)
        logits = torch.einsum("phd,jhd->hpj", s["q"][pos], k) * SM_SCALE
        logits = logits.masked_fill(torch.arange(lens[i])[None, None, :] > pos[None, :, None], -math.inf)
        dense = torch.einsum("hpj,jhd->phd", logits.softmax(-1), v)
        torch.testing.assert_close(o[t: t + ext_lens[i]], dense, atol=1e-5, rtol=1e-5)
        t += ext_lens[i]


def test_selection_is_per_kv_group_not_pooled():
    """Head 0 prefers blocks 1, 2 and head 1 blocks 4, 5; a head-pooled max would pick {1, 4}."""
    n, bsz, topk = 32, 4, 3
    seqs = make_seqs([n], seed=7)
    s = seqs[0]
    ik = torch.tensor([-1.0, -1.0] + [0.0] * (DI - 2)).repeat(n, 1)
    for blk, vec in ((1, [3.0, 0]), (2, [2.0, 0]), (4, [0, 3.0]), (5, [0, 2.0])):
        ik[blk * bsz: (blk + 1) * bsz, :2] = torch.tensor(vec)
    iq = torch.zeros(n, H, DI)
    iq[:, 0, 0] = 1.0
    iq[:, 1, 1] = 1.0
    s["ik"], s["iq"] = ik, iq
    b = pack(seqs, [n], [n], seed=7)
    sel, o = run_ref(b, bsz, topk)
    assert sel[-1].tolist() == [[1, 2, 7], [4, 5, 7]]
    pooled = sel.clone()
    pooled[-1] = torch.tensor([1, 4, 7], dtype=torch.int32)
    _, o_pooled = run_ref(b, bsz, topk, block_topk=pooled)
    for qh in range(HQ):
        want = bf_attend(s["q"].double(), s["k"].double(), s["v"].double(), n - 1, qh,
                         [[1, 2, 7], [4, 5, 7]][qh // 2], 2, bsz)
        torch.testing.assert_close(o[-1, qh].double(), want, atol=1e-5, rtol=1e-5)
    assert (o[-1] - o_pooled[-1]).abs().amax(-1).min() > 1e-2  # every head sees the difference


def test_long_decode_matches_bruteforce():
    """Realistic block size / top-k over long caches (decode, 2 requests)."""
    lens, bsz, topk = [20000, 5003], 128, 16
    seqs = make_seqs(lens, seed=8)
    sel, o = run_ref(pack(seqs, lens, [1, 1], seed=8), bsz, topk)
    for i, s in enumerate(seqs):
        p = lens[i] - 1
        iq, ik = s["iq"].double(), s["ik"].double()
        for h in range(H):
            dots = {p: (ik @ iq[p, h]).tolist()}
            want = bf_select(dots, p, bsz, topk, 0, 1)
            assert_selection(sel[i, h].tolist(), *want, topk)
        for qh in range(HQ):
            blocks = [x for x in sel[i, qh // 2].tolist() if x >= 0]
            want_o = bf_attend(s["q"].double(), s["k"].double(), s["v"].double(), p, qh, blocks, 2, bsz)
            torch.testing.assert_close(o[i, qh].double(), want_o, atol=1e-5, rtol=1e-5)


def test_query_chunking_and_out_buffers(monkeypatch):
    lens, ext, bsz, topk = [45, 29], [45, 20], 4, 3
    seqs = make_seqs(lens, seed=9)
    b = pack(seqs, lens, ext, seed=9)
    sel, o = run_ref(b, bsz, topk, 1, 1)
    monkeypatch.setattr(ref, "_TILE_ELEMS", 1)  # one query per chunk
    T = sum(ext)
    sel_buf = torch.full((T + 2, H, topk), 77, dtype=torch.int32)  # 2 rows owned by no request
    o_buf = torch.full((T + 2, HQ, DV), 5.0)
    r1 = ref.index_block_topk(torch.cat([b["index_q"], b["index_q"][:2]]), b["index_k_cache"], **b["meta"],
                              block_size=bsz, topk_blocks=topk, init_blocks=1, local_blocks=1, out=sel_buf)
    r2 = ref.sparse_attention(torch.cat([b["q"], b["q"][:2]]), b["k_cache"], b["v_cache"], **b["meta"],
                              block_topk=torch.cat([sel, sel[:2]]), block_size=bsz, sm_scale=SM_SCALE, out=o_buf)
    assert r1 is sel_buf and r2 is o_buf
    assert (sel_buf[T:] == 77).all() and (o_buf[T:] == 5.0).all()  # rows owned by no request: untouched
    # one query per chunk: other matmul shapes than the default run, so ties may break differently
    assert_agree_up_to_ties(sel_buf[:T], o_buf[:T], sel, o, seqs, packed_rows(lens, ext), bsz)


def test_low_precision_inputs_are_computed_in_fp32():
    lens, ext, bsz, topk = [41, 26], [41, 9], 4, 3
    seqs16 = make_seqs(lens, seed=10, dtype=torch.bfloat16)
    seqs32 = [{k: v.float() for k, v in s.items()} for s in seqs16]
    sel16, o16 = run_ref(pack(seqs16, lens, ext, seed=10), bsz, topk, 0, 1)
    sel32, o32 = run_ref(pack(seqs32, lens, ext, seed=10), bsz, topk, 0, 1)
    assert o16.dtype == torch.bfloat16
    # Exact on purpose: the bf16 inputs are upcast to the very fp32 values of the fp32 run, so both runs perform
    # identical fp32 operations on identical operands; only the final cast to the output dtype may differ.
    assert torch.equal(sel16, sel32)
    assert torch.equal(o16, o32.to(torch.bfloat16))


def test_store_index_k():
    cache = torch.zeros(10, 4, dtype=torch.bfloat16)
    vals = torch.randn(3, 4)
    ref.store_index_k(cache, torch.tensor([7, 2, 5]), vals)
    assert torch.equal(cache[[7, 2, 5]], vals.to(torch.bfloat16))
    assert (cache[[0, 1, 3, 4, 6, 8, 9]] == 0).all()
    ref.store_index_k(cache, torch.tensor([0]), vals[:1, None, :])  # [T, 1, Di] form
    assert torch.equal(cache[0], vals[0].to(torch.bfloat16))


def _bad_calls():
    b = pack(make_seqs([10, 7], seed=11), [10, 7], [10, 3], seed=11)
    m = b["meta"]

    def topk(index_q=b["index_q"], cache=b["index_k_cache"], meta=m, **kw):
        kw = {"block_size": 4, "topk_blocks": 3, **kw}
        return lambda: ref.index_block_topk(index_q, cache, **meta, **kw)

    def attn(q=b["q"], k=b["k_cache"], v=b["v_cache"], bt=None, meta=m, **kw):
        bt = torch.zeros(q.shape[0], k.shape[1], 3, dtype=torch.int32) if bt is None else bt
        kw = {"block_size": 4, "sm_scale": 1.0, **kw}
        return lambda: ref.sparse_attention(q, k, v, **meta, block_topk=bt, **kw)

    T = b["q"].shape[0]
    return [
        (topk(init_blocks=2, local_blocks=2), "init_blocks \\+ local_blocks"),
        (topk(index_q=b["index_q"][..., :5]), "Di"),
        (topk(index_q=b["index_q"][0]), "index_q must be"),
        (topk(block_size=0), "block_size"),
        (topk(topk_blocks=0), "topk_blocks"),
        (topk(out=torch.zeros(T, H, 4, dtype=torch.int32)), "out must have shape"),
        (topk(meta={**m, "seq_lens": m["seq_lens"][:1]}), "seq_lens must be 1-D"),
        (topk(meta={**m, "extend_seq_lens": torch.tensor([10, 9])}), "extend_seq_lens"),
        (topk(meta={**m, "extend_start_loc": torch.tensor([0, 11])}), "outside"),
        (topk(meta={**m, "seq_lens": torch.tensor([10, 500])}), "req_to_token width"),
        (attn(q=b["q"][:, :3]), "multiple of Hkv"),
        (attn(k=b["k_cache"][..., :5]), "head dim"),
        (attn(v=b["v_cache"][:, :1]), "v_cache"),
        (attn(bt=torch.zeros(T, 1, 3, dtype=torch.int32)), "block_topk must be"),
        (attn(out=torch.zeros(T, HQ, DV + 1)), "out must have shape"),
        (lambda: ref.store_index_k(torch.zeros(9, DI), torch.tensor([1, 2]), torch.zeros(3, DI)), "index_k must be"),
        (lambda: ref.store_index_k(torch.zeros(9, DI), torch.tensor([1]), torch.zeros(1, 2, DI)), "ONE shared"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise(case):
    call, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()
