#!/usr/bin/env python
"""Kernel-level benchmark of one MSA sparse layer (issue 4): ours vs SGLang 0.5.17's in-tree MiniMax-M3 kernels.

Decode: one sparse layer's attention work for one decode step of ``bs`` requests of ``context`` tokens each (the
new token included) -- store of the new token's K, V and index key, indexer top-k, block-sparse attention -- at
real per-rank shapes (TP1: 64 q / 4 KV / 4 index heads; a TP8 rank: 8 / 1 / 1), head dim = index dim = 128,
block 128, top-16, bf16. Both sides read the *same* tensors: one paged K/V cache, one index-key cache, one
req_to_token table, slots and pool rows randomly permuted. ``--page-size N`` allocates the slots in pages of N
contiguous slots, pages in random order (``kernel_inputs.make_batch``), as a server with ``--page-size N`` does:
SGLang's in-tree M3 on Hopper defaults to fa3 at page size 128 (arg_groups/overrides.py, _minimax_m3_overrides),
where a key block of 128 tokens is one page of contiguous slots. Default 1: the token-slot pool.

  ours     ``sglang_m3.attention.kernels`` as ``M3SparseAttnBackend`` drives them under decode CUDA graphs:
           MSAWorkspace + warmup(...) + freeze(), fixed-address top-k/output buffers, prepare_meta(...) once per
           forward, then per layer: store_kv_index (K, V and index key, one launch), index_block_topk(out=...),
           sparse_attention(out=...). The store it replaced (the K/V write of SGLang's MHATokenToKVPool, its
           ``store_cache`` JIT kernel, then store_index_k) is timed as the stage ``store_unfused``. prepare_meta serves all 57 sparse
           layers of a forward, so it is captured in a graph of its own and reported apart (``ours_meta_us``).
  in-tree  what ``MiniMaxSparseAttnBackend.forward_decode`` (srt/layers/attention/minimax_sparse_backend.py) runs
           on Hopper under decode graphs: the fused K/V/index-key store (``store_kv_index`` JIT, the path
           ``MiniMaxSparseKVPool.set_fused_kv_index_buffer`` takes for bf16; its separate stores if the JIT
           cannot be built), then ``minimax_sparse_decode`` with the backend's arguments (score "max",
           disable_index_value, no sink, the pool's page_size (``--page-size``; on Hopper it selects no other kernel,
           see ``InTree.decode_layer``), use_msa False: fmha_sm100 is SM100-only and the backend
           keeps it off under decode graphs anyway, minimax_sparse_backend.py:157-159). Inside: score kernel,
           block top-k (radix-select JIT by default; the Triton two-stage top-k if the JIT cannot be built or
           with ``--intree-topk triton``), GQA-shared sparse decode + merge.
           Its per-forward metadata is host-side only: during capture ``init_forward_metadata_out_graph`` sets
           ``max_seqlen = model context length`` (minimax_sparse_backend.py:206-207), a Python int baked into the
           graph. Mirrored: ``max_seqlen`` = ``--context-len`` (default: the largest context benchmarked, i.e. a
           server started with that --context-length; req_to_token has that width for both sides). At M3's
           default 1M context the score buffer would have 8192 block columns and the radix top-k is gated off
           (> 4096, kernels/ops/attention/minimax_sparse/decode/flash_with_topk_idx.py:861-865).
           Its Triton kernels are autotuned. SGLang's graph runner tunes them in the pre-capture warmup on dummy
           batches with seq_lens = 1 (decode_cuda_graph_runner.py:846, fill value from
           minimax_sparse_backend.py:263); here, more favourably to the peer, every case clears the autotune
           caches and tunes on its own real inputs before capture.

Timing: each side's per-layer step is captured in one torch.cuda.CUDAGraph; median of ``--iters`` per-replay
CUDA-event times. L2 is flushed (memset of 2x its size) before each replay -- in a real forward 56 other sparse
layers' caches pass through L2 between two calls of a layer -- unless ``--no-l2-flush``.
HBM floor: ``decode_bytes_needed`` / the bandwidth of a large device-to-device copy on the same GPU
(``dst.copy_(src)`` of ``--copy-gib`` GiB, bandwidth = 2 * bytes / time). Reported per case: µs, achieved
bytes/s (bytes needed / time), time / floor time, ours' speed-up, and a cross-check: max |ours - in-tree| of the
output and the number of (token, head) rows whose block selections differ.
Prefill (``--prefill``): one prompt of L tokens through one sparse layer, eager, extend form (ours:
extend_seq_lens / extend_start_loc; in-tree: ``minimax_sparse_prefill`` with the cu_seqlens / prefix_lens its
``forward_extend`` builds per layer). Median of ``--prefill-iters`` runs; ms and tokens/s.

``--smoke``: CPU, Triton interpreter (TRITON_INTERPRET=1, set below before triton is imported), tiny shapes, no
timing. Checks that ours, the in-tree kernels and our torch reference (``sglang_m3.attention.reference``) agree
-- output and block selection -- on identical inputs: decode batches with mixed lengths (1 token, dense regime
<= topk * block tokens, sparse regime) and a packed prefill with a cached prefix. fp16, not bf16: the
interpreter's tl.dot multiplies bf16 operands as raw uint16 bit patterns (triton/runtime/interpreter.py,
create_dot), which garbles the in-tree kernels (ours upcast under the interpreter). The interpreter cannot
autotune, so the in-tree autotuners are pinned to one small-tile config each (``INTERPRETER_TILES``), and the
CUDA-only JIT kernels are replaced by the in-tree's own fallbacks (separate stores, Triton two-stage top-k).

Usage:
  python benchmarks/kernel_decode.py                               # full matrix on one GPU -> $OUT or ./bench_out
  python benchmarks/kernel_decode.py --heads tp8 --bs 1,32 --ctx 32768 --prefill ''
  python benchmarks/kernel_decode.py --smoke --out /tmp/smoke      # CPU cross-check, ~2.5 min on one core
  python benchmarks/kernel_decode.py --heads tp1,tp8 --bs 1,8,32 --ctx 32768 --prefill '' --page-size 128
The largest case (TP1, bs 128 x 128K) holds 36 GiB of caches; cases that do not fit are skipped with the reason.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    os.environ["SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX"] = "0"  # CUDA-only JIT kernel

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's sglang_m3, whatever the venv has registered
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's modules, however this file is run or imported

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from kernel_inputs import (HEADS, SMOKE_ATOL, SMOKE_BS, SMOKE_CTX, SMOKE_DECODE_LENS, SMOKE_HEADS,  # noqa: E402
                           SMOKE_PREFILL, cache_bytes, decode_bytes_needed, make_batch)
from kernel_intree import InTree  # noqa: E402
from kernel_ours import OursDecode, OursPrefill, reference_msa, sglang_kv_store  # noqa: E402
from kernel_report import markdown  # noqa: E402
from kernel_timing import Timer, capture, copy_bandwidth, fits, max_abs, sel_mismatch  # noqa: E402
from sglang_m3.attention.kernels import common  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark
# ----------------------------------------------------------------------------------------------------------------


def bench_decode(geo, bs, ctx, args, timer, intree, bandwidth, device):
    row = dict(heads=geo.name, hq=geo.hq, hkv=geo.hkv, bs=bs, context=ctx)
    nbytes = decode_bytes_needed(bs, ctx, geo)
    row.update(bytes_needed=nbytes, floor_us=nbytes / bandwidth * 1e6)
    ok, why = fits(cache_bytes(geo, [ctx] * bs, args.page_size), device)
    if not ok:
        row["skipped"] = why
        return row
    b = make_batch(geo, [ctx] * bs, [1] * bs, context_len=args.context_len, device=device, seed=args.seed,
                   page_size=args.page_size)

    ours = OursDecode(geo, b, sglang_kv_store())
    ours.prepare()
    g_meta = capture(ours.prepare)
    g_ours = capture(ours.layer)
    row["ours_us"] = timer.graph_us(g_ours)
    row["ours_kernels_us"] = timer.graph_kernels_us(g_ours)
    row["ours_meta_us"] = timer.graph_us(g_meta)
    # Where our step's time goes: each stage captured and timed alone (same L2 flush), so the stage sum also
    # shows what the boundaries between them cost.
    for stage, fn in ours.stages().items():
        g = capture(fn)
        row[f"ours_{stage}_us"] = timer.graph_us(g)
        del g
    out_ours, sel_ours = ours.out.clone(), ours.block_topk.clone()
    row["ours_indexer_variant"] = ours.indexer_variant
    del g_ours, g_meta
    # Both indexer variants, forced, each captured alone (where the shape rule should switch; same selection);
    # two-pass with each pass 2 ("rank", the default: all-pairs ranking of rows up to INDEXER_RANK_MAX_BLOCKS
    # blocks, INDEXER_LONG_ROW_SELECT above; "radix": the radix search for every row; "threshold": the group-maximum
    # threshold for every row). A column may set module constants for its capture only (the knobs; none now: the
    # 8-warp select column of session 10 decided its question, common.py).
    columns = (
        (True, "radix", "two_pass", {}), (True, "rank", "two_pass_rank", {}),
        (True, "threshold", "two_pass_threshold", {}),
        (False, "radix", "split", {}))
    saved = {k: getattr(common, k) for *_, knobs in columns for k in knobs}  # every constant a column sets
    for two_pass, select, name, knobs in columns:
        for k, v in knobs.items():
            setattr(common, k, v)
        try:
            alt = OursDecode(geo, b, sglang_kv_store(), two_pass=two_pass, select=select)
            alt.prepare()
            g = capture(alt.indexer)
        except Exception as e:  # noqa: BLE001 -- a measurement column that fails (a new knob value that does not
            row[f"ours_indexer_{name}_error"] = repr(e)[:500]  # compile) must not cost the rest of the run
            continue
        finally:
            for k, v in saved.items():
                setattr(common, k, v)
        row[f"ours_indexer_{name}_us"] = timer.graph_us(g)
        row[f"sel_mismatch_{name}_vs_ours"] = sel_mismatch(alt.block_topk, sel_ours)
        del g, alt

    if intree is not None:
        intree.reset_autotune()  # tune on this case's inputs (see the module docstring)
        g_in = capture(lambda: intree.decode_layer(geo, b, args.context_len))
        row["intree_us"] = timer.graph_us(g_in)
        row["intree_kernels_us"] = timer.graph_kernels_us(g_in)
        del g_in
        out_in, sel_in = intree.with_selection(lambda: intree.decode_layer(geo, b, args.context_len))
        row["max_abs_ours_vs_intree"] = max_abs(out_ours, out_in)
        row["sel_mismatch_rows"] = sel_mismatch(sel_ours, sel_in)
    _rates(row, nbytes)
    del ours, b
    torch.cuda.empty_cache()
    return row


def _rates(row, nbytes):
    for side in ("ours", "intree"):
        if f"{side}_us" in row:
            t = row[f"{side}_us"]
            row[f"{side}_bytes_per_s"] = nbytes / (t * 1e-6)
            row[f"{side}_over_floor"] = t / row["floor_us"]
    if "intree_us" in row:
        row["speedup"] = row["intree_us"] / row["ours_us"]


def bench_prefill(geo, L, args, timer, intree, device):
    row = dict(heads=geo.name, hq=geo.hq, hkv=geo.hkv, prompt=L)
    scores = 4 * geo.hkv * L * (L // geo.block + 1)  # the in-tree indexer's fp32 score buffer
    ok, why = fits(cache_bytes(geo, [L], args.page_size) + scores, device)
    if not ok:
        row["skipped"] = why
        return row
    b = make_batch(geo, [L], [L], context_len=max(args.context_len, L), device=device, seed=args.seed,
                   page_size=args.page_size)
    ours = OursPrefill(geo, b)
    out_ours = ours.layer()
    sel_ours = ours.block_topk
    torch.cuda.synchronize()
    row["ours_ms"] = timer.eager_us(ours.layer, args.prefill_iters) / 1e3
    if intree is not None:
        intree.reset_autotune()
        out_in, sel_in = intree.with_selection(lambda: intree.prefill_layer(geo, b))  # compiles + autotunes
        row["max_abs_ours_vs_intree"] = max_abs(out_ours, out_in)
        row["sel_mismatch_rows"] = sel_mismatch(sel_ours, sel_in)
        del out_in, sel_in
        torch.cuda.synchronize()
        row["intree_ms"] = timer.eager_us(lambda: intree.prefill_layer(geo, b), args.prefill_iters) / 1e3
        row["speedup"] = row["intree_ms"] / row["ours_ms"]
    for side in ("ours", "intree"):
        if f"{side}_ms" in row:
            row[f"{side}_tokens_per_s"] = L / (row[f"{side}_ms"] * 1e-3)
    del ours, b, out_ours, sel_ours
    torch.cuda.empty_cache()
    return row


def run_gpu(args, geos):
    device = torch.device("cuda", torch.cuda.current_device())
    intree = None if args.skip_intree else InTree(device, args.intree_topk)
    bandwidth = copy_bandwidth(device, args.copy_gib)
    print(f"device-to-device copy: {bandwidth / 1e12:.3f} TB/s ({args.copy_gib} GiB)", flush=True)
    timer = Timer(device, args.iters, not args.no_l2_flush)
    res = dict(copy_bandwidth_bytes_per_s=bandwidth, intree_paths=intree.paths if intree else None,
               decode=[], prefill=[])
    for geo in geos:
        for bs in args.bs:
            for ctx in args.ctx:
                row = bench_decode(geo, bs, ctx, args, timer, intree, bandwidth, device)
                res["decode"].append(row)
                print(_row_line(row), flush=True)
        for L in args.prefill:
            row = bench_prefill(geo, L, args, timer, intree, device)
            res["prefill"].append(row)
            print(_row_line(row), flush=True)
    return res


def _row_line(row) -> str:
    return "  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ----------------------------------------------------------------------------------------------------------------
# --smoke: CPU cross-check under the Triton interpreter
# ----------------------------------------------------------------------------------------------------------------


def _check(kind, geo, b, out_ours, sel_ours, out_in, sel_in, **extra):
    out_ref, sel_ref = reference_msa(geo, b)
    row = dict(kind=kind, heads=geo.name, seq_lens=b.seq_lens_list, new_tokens=b.ext_lens_list,
               sel_mismatch_ours_vs_intree=sel_mismatch(sel_ours, sel_in),
               sel_mismatch_ours_vs_ref=sel_mismatch(sel_ours, sel_ref),
               sel_mismatch_intree_vs_ref=sel_mismatch(sel_in, sel_ref),
               max_abs_ours_vs_intree=max_abs(out_ours, out_in),
               max_abs_ours_vs_ref=max_abs(out_ours, out_ref),
               max_abs_intree_vs_ref=max_abs(out_in, out_ref), **extra)
    row["ok"] = (all(v == 0 for k, v in row.items() if k.startswith("sel_mismatch"))
                 and all(v <= SMOKE_ATOL for k, v in row.items() if k.startswith("max_abs")))
    print(_row_line(row), flush=True)
    return row


def run_smoke(args, geos):
    import warnings

    # The in-tree kernels compute exp2(-inf - -inf) on fully masked lanes (then discard them); numpy warns.
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
    device = torch.device("cpu")
    intree = InTree(device)
    intree.pin_autotune_for_interpreter()
    rows = []
    for geo in geos:
        for bs in SMOKE_BS:
            for ctx in SMOKE_CTX:
                lens = list(SMOKE_DECODE_LENS[ctx][:bs])
                b = make_batch(geo, lens, [1] * bs, context_len=args.context_len, device=device, seed=args.seed + bs,
                               page_size=args.page_size)
                ours = OursDecode(geo, b, sglang_kv_store())
                ours.prepare()
                out_ours = ours.layer().clone()
                # our other indexer variant, forced, on the same (now written) caches: it must select the same
                alt = OursDecode(geo, b, sglang_kv_store(), two_pass=ours.indexer_variant != "two-pass")
                alt.prepare()
                alt.indexer()
                # the two-pass indexer with the radix pass 2 for every row, forced: the same selection again
                radix = OursDecode(geo, b, sglang_kv_store(), two_pass=True, select="radix")
                radix.prepare()
                radix.indexer()
                out_in, sel_in = intree.with_selection(lambda: intree.decode_layer(geo, b, args.context_len))
                rows.append(_check("decode", geo, b, out_ours, ours.block_topk, out_in, sel_in,
                                   indexer_variant=ours.indexer_variant,
                                   sel_mismatch_other_indexer_variant=sel_mismatch(alt.block_topk, ours.block_topk),
                                   sel_mismatch_two_pass_radix=sel_mismatch(radix.block_topk, ours.block_topk)))
        lens, ext = zip(*SMOKE_PREFILL)
        b = make_batch(geo, lens, ext, context_len=args.context_len, device=device, seed=args.seed,
                       page_size=args.page_size)
        ours = OursPrefill(geo, b)
        out_ours = ours.layer()
        out_in, sel_in = intree.with_selection(lambda: intree.prefill_layer(geo, b))
        rows.append(_check("prefill", geo, b, out_ours, ours.block_topk, out_in, sel_in))
    return dict(intree_paths=intree.paths, atol=SMOKE_ATOL, cases=rows, ok=all(r["ok"] for r in rows),
                max_abs_ours_vs_intree=max(r["max_abs_ours_vs_intree"] for r in rows),
                max_abs_ours_vs_ref=max(r["max_abs_ours_vs_ref"] for r in rows),
                max_abs_intree_vs_ref=max(r["max_abs_intree_vs_ref"] for r in rows),
                sel_mismatch_ours_vs_intree=sum(r["sel_mismatch_ours_vs_intree"] for r in rows))


def main(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="tp1,tp8", help="comma list of: " + ", ".join(HEADS))
    p.add_argument("--bs", type=ints, default=[1, 8, 32, 128])
    p.add_argument("--ctx", type=ints, default=[4096, 32768, 131072])
    p.add_argument("--prefill", type=ints, default=[32768, 131072], help="prompt lengths ('' for none)")
    p.add_argument("--skip-intree", action="store_true")
    p.add_argument("--iters", type=int, default=100, help="graph replays per decode case")
    p.add_argument("--prefill-iters", type=int, default=5)
    p.add_argument("--context-len", type=int, default=None,
                   help="server --context-length: req_to_token width and the in-tree's captured max_seqlen "
                        "(default: the largest --ctx)")
    p.add_argument("--page-size", type=int, default=1,
                   help="server --page-size: slots come in pages of this many contiguous slots (in-tree M3 on "
                        "Hopper defaults to 128; --smoke: 16 is a page per key block)")
    p.add_argument("--intree-topk", choices=("auto", "radix", "triton"), default="auto")
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--no-l2-flush", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU interpreter cross-check on tiny shapes (no timing)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = p.parse_args(argv)
    names = [h for h in args.heads.split(",") if h]
    geos = [(SMOKE_HEADS if args.smoke else HEADS)[h] for h in names]
    if args.context_len is None:
        args.context_len = max(SMOKE_CTX) if args.smoke else max(args.ctx)
    if args.page_size < 1:
        p.error("--page-size must be >= 1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke for the CPU cross-check")

    import sglang

    t0 = time.perf_counter()
    env = dict(device="cpu (TRITON_INTERPRET=1)" if args.smoke else torch.cuda.get_device_name(),
               torch=torch.__version__, triton=triton.__version__, sglang=sglang.__version__)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | sglang {env['sglang']}",
          flush=True)
    res = dict(env=env, smoke=args.smoke, args={k: v for k, v in vars(args).items()}, geometries=[
        {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(g).items()} for g in geos])
    if args.smoke:
        torch.manual_seed(args.seed)
        res["smoke_result"] = run_smoke(args, geos)
    else:
        res["gpu"] = run_gpu(args, geos)
    res["elapsed_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_decode_smoke" if args.smoke else "kernel_decode"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and .md ({res['elapsed_s']:.0f} s)")
    if args.smoke and not res["smoke_result"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
