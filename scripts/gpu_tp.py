"""Tensor parallelism, served: the same small bf16 checkpoint at `--tp N` against `--tp 1`, teacher-forced (issue 12).

The checkpoint has M3's attention head layout (64 query / 4 KV / 4 index heads, head and index dim 128, rotary 64,
block 128) at small width (hidden 1024, 8 experts), with top-4 blocks so prompts past 512 tokens are sparse, and
one dense layer before the sparse ones. Per-rank heads (sglang_m3/model.py): at TP2 each rank has 32 query / 2 KV /
2 index heads (KV heads split); at TP8 8 query / 1 KV / 1 index head (each KV head and its index head replicated
on two ranks). The index-key projection (one shared head) is replicated on every rank.

Servers (same flags, gpu_e2e.py's COMMON_FLAGS, decode CUDA graphs on), one after the other:
  tp1   --tp 1
  tpN   --tp N
Checks (all mean |Δ logprob| <= MEAN_TOL of gpu_e2e.py, the bf16 bound; maxima reported, not judged):
  tpN vs tp1, per prompt: prompt positions and continuation positions of prompt + tp1's greedy continuation,
    each scored by one prefill on each server (gpu_e2e.logprobs);
  tpN against itself (gpu_e2e.consistency): its greedy decode vs its prefill of the same tokens; a radix hit
    (turn 2 re-uses turn 1 = prompt + 16 decoded tokens, a prefix ending mid-block) vs the same request after
    /flush_cache, new tokens and decoded tokens; the prefix must have been cached. tp1's own gaps are reported
    beside them as the yardstick.
Writes results.json and results.md (verdict PASS/FAIL) under --out.

With --quant mxfp8 (issue 10) both servers serve the MXFP8 checkpoint of the same source weights
(`sglang_m3.tiny --quant mxfp8`, flat; 128x128 block FP8 on sm90), and a third server, tp1_bf16 (the bf16
checkpoint at --tp 1), scores the same forced tokens. Δq = mean |Δ logprob| of tp1 (MXFP8) vs tp1_bf16 over all
positions, mean over prompts: the quantization's measured effect on this model. Every bound above becomes
MEAN_TOL + Δq/2: TP changes only the bf16 reduction order, which fp8 activation rounding may amplify where a
difference flips an fp8 rounding, while a mis-sharded scale or tile (the scale of another rank's rows) is an
error of the order of the quantization itself, Δq or more (see scripts/gpu_consistency.py for the same bar).
Batched greedy decoding (reported only) is skipped in this mode to keep the run within ~4-5 min.

    python scripts/gpu_tp.py --tp 2 --out $OUT        # bash scripts/gpu_tp.sh 2 (2-GPU host, ~3-4 min)
    python scripts/gpu_tp.py --tp 2 --quant mxfp8 --out $OUT   # bash scripts/gpu_tp.sh 2 --quant mxfp8 (~4-5 min)
    python scripts/gpu_tp.py --tp 8 --out $OUT        # bash scripts/gpu_tp.sh 8 (8-GPU host)
    python scripts/gpu_tp.py --smoke --out DIR        # CPU harness check: tp1 vs tp1, fp32, short prompts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_e2e import (COMMON_FLAGS, MEAN_TOL, batch_greedy, consistency, consistency_table, diff,  # noqa: E402
                     greedy, logprobs, prompt)

# M3's attention geometry (reference/m3_config_real.json) at small width. Every TP-sharded size divides by 8:
# query heads 64, KV/index heads 4 (replicated 2x at TP8), expert/shared/dense widths 512/512/1024.
CKPT_SHAPE = dict(hidden_size=1024, num_attention_heads=64, num_key_value_heads=4, sparse_num_index_heads=4,
                  head_dim=128, rotary_dim=64, sparse_index_dim=128, sparse_block_size=128, sparse_topk_blocks=4,
                  num_local_experts=8, num_experts_per_tok=2, intermediate_size=512, shared_intermediate_size=512,
                  dense_intermediate_size=1024, num_hidden_layers=3)
DENSE_LAYERS = 1
PROMPT_LENS = (300, 700, 1500, 3001)  # 300 dense (< top-4 · 128), the others sparse, none a multiple of 128
DECODE_TOKENS = 48
SMOKE_PROMPT_LENS, SMOKE_DECODE_TOKENS = (300, 600), 8
# NVLink multicast stays off on the lent hosts (a program using it can take the shared GPUs out of service):
# SGLang's all-reduce paths must not reach it even if the caller's environment lost these.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def write_checkpoint(work: Path, dtype: str = "bfloat16", quant: str | None = None) -> Path:
    """The flat checkpoint both servers serve (deterministic, seed 0; `quant` "mxfp8": the same source weights in
    the MXFP8 release's layout)."""
    from sglang_m3.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(work / f"ckpt_tp_{dtype}{'_' + quant if quant else ''}", flat=True, dtype=dtype,
                                 dense_layers=DENSE_LAYERS, quant=quant, **CKPT_SHAPE)


def start(name: str, ckpt: Path, tp: int, work: Path, port: int, smoke: bool):
    if smoke:
        from tests.conftest import Server as CpuServer  # the CPU flags the tests use (--dtype float32, ...)

        log_dir = work / name  # the CPU launcher names every log server_test.log
        log_dir.mkdir(exist_ok=True)
        return CpuServer(ckpt, "--tp", str(tp), "--context-length", "4096", log_dir=log_dir)
    from gpu_quant import ENV as QUANT_ENV  # the Triton block-FP8 GEMM (DeepGEMM's JIT is not installed)
    from servers import Server

    return Server(name, ckpt, [*COMMON_FLAGS, "--tp", str(tp)], log_dir=work, port=port,
                  env={**NO_MULTICAST, **QUANT_ENV})


def compare(prompts, forced, ref: list, other: list) -> list[dict]:
    """Per prompt: mean/max |Δ logprob| over the prompt's positions and over the continuation's."""
    return [{"len": len(p), "prompt": diff(a[: len(p) - 1], b[: len(p) - 1]), "decode": diff(a, b, start=len(p) - 1)}
            for p, a, b in zip(prompts, ref, other)]


def quant_effect(prompts, quantized: list, bf16: list) -> float:
    """Δq: mean over prompts of mean |Δ logprob| over all positions, quantized tp1 vs bf16 tp1 (same tokens)."""
    return sum(diff(a, b)["mean"] for a, b in zip(quantized, bf16)) / len(prompts)


def verdict(rows: list[dict], servers: dict, tp_name: str, tol: float = MEAN_TOL, required=("tp1",)) -> dict:
    """PASS when the servers ran, every tpN-vs-tp1 mean (prompt and continuation parts) is within `tol`
    (MEAN_TOL; MEAN_TOL + Δq/2 for a quantized checkpoint), and tpN's own decode-vs-prefill and radix-hit gaps are
    within `tol` with the radix prefix cached."""
    checks = {}
    for row in rows:
        for part in ("prompt", "decode"):
            checks[f"{tp_name} vs tp1 len {row['len']} {part}"] = row[part]["mean"] <= tol
    cons = servers.get(tp_name, {}).get("consistency")
    if cons:
        checks[f"{tp_name} radix prefix was cached"] = all(c > 0 for c in cons["cached_tokens"])
        for k in ("decode_vs_prefill", "radix_extend", "radix_decode"):
            checks[f"{tp_name} {k}"] = cons[k]["mean"] <= tol
    failed = [s for s in (*required, tp_name) if "error" in servers.get(s, {"error": 1})]
    return {"pass": bool(checks) and all(checks.values()) and not failed, "checks": checks,
            "servers_missing_or_failed": failed, "mean_tol": round(tol, 4)}


def markdown(results: dict) -> str:
    v, tp_name = results["verdict"], results["tp_name"]
    dq = results.get("quant_effect")
    tol = (f"{v['mean_tol']} = {MEAN_TOL} (bf16, gpu_e2e.MEAN_TOL) + Δq/2, Δq = {dq:.4f} ({results['quant']} tp1 vs "
           "bf16 tp1, all positions)" if dq is not None else f"{MEAN_TOL} (bf16, gpu_e2e.MEAN_TOL)")
    lines = [f"# --tp {results['tp']} vs --tp 1 ({results['mode']})", "",
             f"mean |Δ logprob| tolerance {tol}; verdict: **{'PASS' if v['pass'] else 'FAIL'}**", "",
             f"Checkpoint: {json.dumps(results['checkpoint'])}, {DENSE_LAYERS} dense layer. Flags: "
             f"`{' '.join(results['flags'])}`.", "",
             f"| prompt len | {tp_name} vs tp1 prompt mean / max | continuation mean / max |", "|---|---|---|"]
    for row in results["compare"]:
        p, d = row["prompt"], row["decode"]
        lines.append(f"| {row['len']} | {p['mean']:.3f} / {p['max']:.2f} | {d['mean']:.3f} / {d['max']:.2f} |")
    if "batch_greedy_tokens_equal" in results:
        lines += ["", f"Batched greedy tokens equal (reported, not judged): {results['batch_greedy_tokens_equal']}"]
    lines += ["", "Each server against itself (mean over sparse prompts of mean |Δ| / largest max; gpu_e2e.consistency):",
              "", *consistency_table(results["servers"])]
    failed = [k for k, ok in v["checks"].items() if not ok]
    lines += ["", f"Failed checks: {failed or 'none'}; servers missing or failed: {v['servers_missing_or_failed'] or 'none'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, help="tensor-parallel size compared with --tp 1 (2 or 8 on the H200 hosts); "
                    "required unless --smoke")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_tp"))
    ap.add_argument("--smoke", action="store_true",
                    help="CPU harness check: --tp 1 against --tp 1, fp32, short prompts (must give 0 differences)")
    ap.add_argument("--quant", choices=["mxfp8"], help="both servers serve the MXFP8 checkpoint of the same "
                    "weights; a bf16 tp1 server gives Δq (GPU only)")
    args = ap.parse_args(argv)
    if args.quant and args.smoke:
        ap.error("--quant needs a GPU (SGLang's CPU engine has no fp8 GEMMs); drop --smoke")
    if args.tp is None:
        if not args.smoke:
            ap.error("--tp N is required")
        args.tp = 1
    if args.tp < 1 or CKPT_SHAPE["num_attention_heads"] % args.tp:
        ap.error(f"--tp {args.tp} must be >= 1 and divide {CKPT_SHAPE['num_attention_heads']} query heads")
    if args.smoke and args.tp != 1:
        ap.error("--smoke runs on CPU, where only --tp 1 is served")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="m3_gpu_tp_"))  # not under --out: the device returns few files
    dtype = "float32" if args.smoke else "bfloat16"
    ckpt = write_checkpoint(work, dtype, args.quant)
    lens, n_decode = (SMOKE_PROMPT_LENS, SMOKE_DECODE_TOKENS) if args.smoke else (PROMPT_LENS, DECODE_TOKENS)
    prompts = [prompt(n, seed=i) for i, n in enumerate(lens)]  # gpu_e2e's seeds
    tp_name = f"tp{args.tp}" if args.tp != 1 else "tp1_again"

    runs = [("tp1", 1, ckpt), (tp_name, args.tp, ckpt)]
    if args.quant:  # the same weights in bf16 at tp1, for Δq (scores only)
        runs.append(("tp1_bf16", 1, write_checkpoint(work, dtype)))
    servers: dict = {}
    scores: dict = {}
    forced = None
    for i, (name, tp, path) in enumerate(runs):
        server = start(name, path, tp, work, 30300 + 10 * i, args.smoke)
        try:
            server.wait(timeout=900)
            info = {"startup_s": round(server.startup_s, 1)}
            if forced is None:  # tp1's greedy continuation: both servers score the same tokens
                forced = [p + greedy(server, p, n_decode)[0] for p in prompts]
            scores[name] = [logprobs(server, ids) for ids in forced]
            if name != "tp1_bf16":
                if not args.quant:
                    info["batch_greedy"] = [[t for t, _ in row] for row in batch_greedy(server, prompts, n_decode)]
                info["consistency"] = consistency(server, prompts[1:])  # sparse prompts only
            servers[name] = info
        except Exception as e:  # noqa: BLE001 -- record and go on: the other server's numbers still count
            servers[name] = {"error": repr(e)[:2000], "log_tail": server.log()[-3000:]}
        finally:
            server.stop()
            # after every server, so a run cut short by the device's time limit still leaves its numbers
            results = report(args, out, tp_name, prompts, lens, n_decode, servers, scores)
    print(markdown(results))
    return results


def report(args, out: Path, tp_name: str, prompts, lens, n_decode, servers: dict, scores: dict) -> dict:
    """Results (comparison, Δq and tolerance in --quant mode, verdict) from what has run so far; written to --out."""
    rows = compare(prompts, None, scores["tp1"], scores[tp_name]) if {"tp1", tp_name} <= set(scores) else []
    mode = "cpu fp32 smoke" if args.smoke else f"gpu {args.quant or 'bf16'}, decode graphs"
    results = {"tp": args.tp, "tp_name": tp_name, "mode": mode, "quant": args.quant,
               "checkpoint": {**CKPT_SHAPE, "dense_layers": DENSE_LAYERS}, "prompt_lens": list(lens),
               "decode_tokens": n_decode, "compare": rows,
               "flags": (["tests/conftest.py CPU flags", "--tp", "1", "--context-length", "4096"] if args.smoke
                         else [*COMMON_FLAGS, "--tp", str(args.tp)])}
    tol, required = MEAN_TOL, ("tp1",)
    if args.quant:
        required = ("tp1", "tp1_bf16")
        if {"tp1", "tp1_bf16"} <= set(scores):
            results["quant_effect"] = quant_effect(prompts, scores["tp1"], scores["tp1_bf16"])
            tol = MEAN_TOL + results["quant_effect"] / 2
    bg = [servers.get(n, {}).get("batch_greedy") for n in ("tp1", tp_name)]
    if all(bg):
        results["batch_greedy_tokens_equal"] = [a == b for a, b in zip(*bg)]
    results["servers"] = {k: {kk: vv for kk, vv in v.items() if kk != "batch_greedy"} for k, v in servers.items()}
    results["verdict"] = verdict(rows, servers, tp_name, tol, required)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["verdict"]["pass"] else 1)
