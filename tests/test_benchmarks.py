"""benchmarks/kernel_decode.py --smoke: the issue-4 benchmark's CPU cross-check.

The smoke run executes our MSA kernels and SGLang 0.5.17's in-tree MiniMax-M3 kernels (through the benchmark's
adapter, i.e. the same calls the timed GPU run makes) under the Triton interpreter on identical tiny inputs,
plus our torch reference, and records the differences in its JSON. It runs here through a small driver that
wraps the benchmark's per-case check (`_check`) so that each case also records, from the case's own inputs:
  * per pair of sides (ours / in-tree / reference), the (token, head) rows whose block selections differ by more
    than a near-tie: the differing blocks' float64 scores must lie within TIE_REL * (1 + |score|), TIE_REL 1e-5
    for ours vs the reference (both fp32 arithmetic on the fp16 data) and 2e-3 for pairs with the in-tree (fp16
    score arithmetic); this must be 0;
  * each side's output vs the reference's attention over *that side's own* selection (max abs <= ATOL), so a
    legitimate near-tie flip still has its output checked rather than skipped.
Outputs of two sides are compared directly only where both selected the same blocks. The data are fp16 (see the
benchmark's docstring); the observed differences are one fp16 ulp (<= 1e-3: outputs of magnitude <~ 2, and the
in-tree rounds its split-K partials to fp16 before merging them). Runs in a subprocess because TRITON_INTERPRET
must be set before triton is imported (~2.5 min on one core).

``--page-size`` (slots in pages of contiguous slots, as a server at that page size allocates them; the in-tree M3's
Hopper default is 128) is checked cheaply: the layout of ``make_batch`` in process, and one mixed-length decode batch
at page size 16 (one page per smoke key block) through our kernels and the in-tree adapter against the torch
reference in an interpreter subprocess (~20 s). ``--smoke --page-size 16`` runs the whole cross-check at that page.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ATOL = 5e-3
TIE_REL = {"ours_vs_ref": 1e-5, "intree_vs_ref": 2e-3, "ours_vs_intree": 2e-3}

DRIVER = r"""
import json, sys
out_dir, bench_dir, tie_rel = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.argv = ["kernel_decode.py", "--smoke", "--out", out_dir]
sys.path.insert(0, bench_dir)
import kernel_decode as kd  # sets TRITON_INTERPRET before triton is imported
import torch
from sglang_m3.attention import reference


def block_scores(b, block):
    # float64 block scores [H, nb] of each packed new token (max over its visible keys)
    rows = {}
    for i, (n, ext) in enumerate(zip(b.seq_lens_list, b.ext_lens_list)):
        row, start = int(b.req_pool_indices[i]), int(b.extend_start_loc[i])
        for r in range(ext):
            t, pos = start + r, n - ext + r
            slots = b.req_to_token[row, : pos + 1].long()
            s = b.index_q[t].double() @ b.index_k_cache[slots].double().T  # [H, pos + 1]
            nb = pos // block + 1
            s = torch.nn.functional.pad(s, (0, nb * block - (pos + 1)), value=float("-inf"))
            rows[t] = s.view(s.shape[0], nb, block).amax(-1)
    return rows


def beyond_tie(a, c, scores, rel):
    a, c, bad = a.to(torch.int64), c.to(torch.int64), 0
    for t, h in (a != c).any(-1).nonzero().tolist():
        diff = (set(a[t, h].tolist()) ^ set(c[t, h].tolist())) - {-1}
        sc = scores[t][h]
        if not diff or any(not 0 <= x < sc.numel() for x in diff):
            bad += 1
            continue
        vals = [float(sc[x]) for x in diff]
        bad += (max(vals) - min(vals)) > rel * (1 + max(abs(v) for v in vals))
    return bad


orig = kd._check


def tie_aware(kind, geo, b, out_ours, sel_ours, out_in, sel_in, **extra):
    row = orig(kind, geo, b, out_ours, sel_ours, out_in, sel_in, **extra)
    _, sel_ref = kd.reference_msa(geo, b)
    scores = block_scores(b, geo.block)
    for name, x, y in (("ours_vs_ref", sel_ours, sel_ref), ("intree_vs_ref", sel_in, sel_ref),
                       ("ours_vs_intree", sel_ours, sel_in)):
        row[f"sel_beyond_tie_{name}"] = beyond_tie(x, y, scores, tie_rel[name])
    meta = dict(req_to_token=b.req_to_token, req_pool_indices=b.req_pool_indices, seq_lens=b.seq_lens,
                extend_seq_lens=b.extend_seq_lens, extend_start_loc=b.extend_start_loc)
    for name, sel, o in (("ours", sel_ours, out_ours), ("intree", sel_in, out_in)):
        own = reference.sparse_attention(b.q, b.k_cache, b.v_cache, **meta, block_topk=sel.to(torch.int32),
                                         block_size=geo.block, sm_scale=geo.sm_scale)
        row[f"max_abs_{name}_vs_ref_own_selection"] = float((o.float() - own.float()).abs().max())
    row["ok"] = (all(row[f"sel_beyond_tie_{n}"] == 0 for n in tie_rel)
                 and row["max_abs_ours_vs_ref_own_selection"] <= kd.SMOKE_ATOL
                 and row["max_abs_intree_vs_ref_own_selection"] <= kd.SMOKE_ATOL)
    return row


kd._check = tie_aware
kd.main()
"""


def test_kernel_decode_smoke_matches_intree_kernels(tmp_path):
    cmd = [sys.executable, "-c", DRIVER, str(tmp_path), str(REPO / "benchmarks"), json.dumps(TIE_REL)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=900)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    res = json.loads((tmp_path / "kernel_decode_smoke.json").read_text())
    assert (tmp_path / "kernel_decode_smoke.md").exists()
    smoke = res["smoke_result"]
    cases = smoke["cases"]
    # 2 head layouts x (2 batch sizes x 2 contexts decode + 1 packed prefill)
    assert [c["kind"] for c in cases].count("decode") == 8 and [c["kind"] for c in cases].count("prefill") == 2
    for c in cases:
        where = f"{c['kind']} {c['heads']} seq_lens={c['seq_lens']}"
        for pair in TIE_REL:
            assert c[f"sel_beyond_tie_{pair}"] == 0, (where, pair, c)
        assert c["max_abs_ours_vs_ref_own_selection"] <= ATOL, (where, c)
        assert c["max_abs_intree_vs_ref_own_selection"] <= ATOL, (where, c)
        # direct output comparisons only where the two sides selected the same blocks
        if c["sel_mismatch_ours_vs_ref"] == 0:
            assert c["max_abs_ours_vs_ref"] <= ATOL, (where, c["max_abs_ours_vs_ref"])
        if c["sel_mismatch_intree_vs_ref"] == 0:
            assert c["max_abs_intree_vs_ref"] <= ATOL, (where, c["max_abs_intree_vs_ref"])
        if c["sel_mismatch_ours_vs_intree"] == 0:
            assert c["max_abs_ours_vs_intree"] <= ATOL, (where, c["max_abs_ours_vs_intree"])
    # the check had something to compare: sparse selections (some row selects fewer blocks than are visible)
    assert any(max(c["seq_lens"]) > 32 for c in cases)
    assert smoke["ok"], log


PAGED_DRIVER = r"""
import json, sys
bench_dir, page = sys.argv[1], int(sys.argv[2])
sys.argv = ["kernel_decode.py", "--smoke"]
sys.path.insert(0, bench_dir)
import kernel_decode as kd  # sets TRITON_INTERPRET before triton is imported
import torch

geo, ctx = kd.SMOKE_HEADS["tp8"], max(kd.SMOKE_CTX)
b = kd.make_batch(geo, list(kd.SMOKE_DECODE_LENS[ctx]), [1, 1, 1], context_len=ctx, device="cpu", seed=0,
                  page_size=page)
ours = kd.OursDecode(geo, b, kd.sglang_kv_store())
ours.prepare()
out = ours.layer().clone()
intree = kd.InTree(torch.device("cpu"))
intree.pin_autotune_for_interpreter()
out_in, sel_in = intree.with_selection(lambda: intree.decode_layer(geo, b, ctx))
out_ref, sel_ref = kd.reference_msa(geo, b)
print("@@RESULT@@" + json.dumps(dict(
    sel_ours_vs_ref=kd.sel_mismatch(ours.block_topk, sel_ref), sel_intree_vs_ref=kd.sel_mismatch(sel_in, sel_ref),
    max_abs_ours_vs_ref=kd.max_abs(out, out_ref), max_abs_intree_vs_ref=kd.max_abs(out_in, out_ref),
    seq_lens=b.seq_lens_list, dense_max=geo.topk * geo.block)))
"""


def test_make_batch_paged_layout(monkeypatch):
    """Each request's token j sits at offset j % P of its (j // P)-th page; pages are whole, distinct across the
    batch, never page 0 (SGLang's padding page), inside the pool, and in no fixed order; the new tokens' slots are
    the requests' last positions."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ki = importlib.import_module("kernel_inputs")
    geo, P, lens, ext = ki.SMOKE_HEADS["tp1"], 16, [100, 33, 17, 32, 1], [1, 3, 17, 1, 1]
    b = ki.make_batch(geo, lens, ext, context_len=128, device="cpu", seed=0, page_size=P)
    assert b.page_size == P and b.k_cache.shape[0] == b.index_k_cache.shape[0] == ki.pool_slots(lens, P)
    pages, new_locs = [], []
    for i, (n, e) in enumerate(zip(lens, ext)):
        slots = b.req_to_token[b.req_pool_indices[i], :n].long()
        pos = torch.arange(n)
        req_pages = slots[::P] // P
        assert torch.equal(slots, req_pages.repeat_interleave(P)[:n] * P + pos % P), (i, slots)
        pages.append(req_pages)
        new_locs.append(slots[n - e:])
    pages = torch.cat(pages)
    assert pages.unique().numel() == pages.numel() == sum(-(-n // P) for n in lens)
    assert pages.min() >= 1 and (pages.max() + 1) * P <= b.k_cache.shape[0]
    assert not torch.equal(pages, pages.sort().values)  # random order, as a churned pool hands them out
    assert torch.equal(b.out_cache_loc, torch.cat(new_locs))


def test_kernel_decode_paged_matches_reference():
    """One mixed-length decode batch (sparse, dense-boundary and short requests) at page size 16: our kernels and
    the in-tree adapter select the reference's blocks and match its output on the paged slot layout (the in-tree
    ignores page_size on this path, so this guards the layout, not the pass-through)."""
    cmd = [sys.executable, "-c", PAGED_DRIVER, str(REPO / "benchmarks"), "16"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-6000:]
    r = json.loads(line[-1][len("@@RESULT@@"):])
    assert max(r["seq_lens"]) > r["dense_max"], r  # some request selects fewer blocks than it can see
    assert r["sel_ours_vs_ref"] == 0 and r["sel_intree_vs_ref"] == 0, r
    assert r["max_abs_ours_vs_ref"] <= ATOL and r["max_abs_intree_vs_ref"] <= ATOL, r


def test_decode_floor_bytes_count_what_a_decode_step_reads(monkeypatch):
    """kernel_inputs.decode_bytes_needed (the HBM floor of kernel_decode.py's table) against the bytes of the cache
    rows one decode step of the torch reference reads and writes, counted from its own block selection: every
    visible token's index key, the K and V rows of each KV head's selected blocks, and the new token's K, V and
    index key. Lengths of whole blocks (the benchmark's contexts are multiples of 128), below, at and past the
    dense limit topk * block, for both smoke head layouts and one whose index dim is not the head dim."""
    from sglang_m3.attention import reference

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ki = importlib.import_module("kernel_inputs")
    narrow_index = ki.Geometry("index-dim-16", 4, 2, 32, 16, 16, 2, dtype=torch.bfloat16)  # Di != D, bf16
    for geo in (*ki.SMOKE_HEADS.values(), narrow_index):
        for n, bs in ((16, 1), (32, 2), (64, 3), (96, 2)):
            b = ki.make_batch(geo, [n] * bs, [1] * bs, context_len=128, device="cpu", seed=n)
            sel = reference.index_block_topk(
                b.index_q, b.index_k_cache, b.req_to_token, b.req_pool_indices, b.seq_lens, b.extend_seq_lens,
                b.extend_start_loc, block_size=geo.block, topk_blocks=geo.topk, init_blocks=geo.init_blocks,
                local_blocks=geo.local_blocks)
            elt = b.k_cache.element_size()
            want = 0
            for t in range(bs):
                want += n * b.index_k_cache.shape[1] * elt  # index keys of every visible token
                for h in range(geo.hkv):
                    blocks = set(sel[t, h].tolist()) - {-1}
                    tokens = sum(min(geo.block, n - blk * geo.block) for blk in blocks)
                    want += tokens * (b.k_cache.shape[2] + b.v_cache.shape[2]) * elt  # K and V of its blocks
                want += (b.k.shape[1] * b.k.shape[2] + b.v.shape[1] * b.v.shape[2] + b.index_k.shape[1]) * elt
            assert ki.decode_bytes_needed(bs, n, geo) == want, (geo.name, n, bs)
