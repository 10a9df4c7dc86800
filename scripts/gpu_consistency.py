"""Each server against itself on the SAME forced tokens: decode vs prefill, radix-hit decode, batch invariance.

`gpu_e2e.consistency()` lets every server decode its own greedy tokens, so two servers' gaps are measured on
different tokens. Here one continuation per prompt (ours' greedy tokens, fixed once) is forced on every server
through a custom logit processor (`--enable-custom-logit-processor`). The processor reads the log-probability of
the forced token from the logits the decode step produced, then masks every other token so the forced one is
sampled and becomes the next step's input. The decode path therefore runs exactly as in serving (CUDA graphs,
paged KV, radix cache), on identical tokens for every server, and the in-tree M3's gaps are the yardstick:

  decode_vs_prefill  forced decode of F after prompt P vs one prefill of P + F (cache flushed between);
  radix_decode       turn 2 = P + F[:16] + 333 new tokens served from the radix cache, then forced decode of G,
                     vs a flushed prefill of turn 2 + G;
  batch_b3 / b5      forced decode of each request alone vs inside 3 / 5 concurrent requests; with
                     `--cuda-graph-max-bs 4` batch 3 replays the graph padded to 4, batch 5 runs beyond it;
  oov (ours only)    a token id past the vocabulary gets HTTP 400 and the next request is served.

Bars (issue 8): ours <= in-tree + 0.02 mean |Δ logprob| on decode_vs_prefill and radix_decode; batch
invariance within the bf16 bound of gpu_e2e (MEAN_TOL), with the in-tree's numbers next to ours.

Quantized servers (issue 10), each measured exactly like ours on ours' forced tokens (ours must come first):
  ours_mxfp8   the MXFP8 checkpoint of the same source weights (`sglang_m3.tiny --quant mxfp8`, flat packaging),
               served as 128x128 block FP8 on sm90 (no flag: the plugin picks m3_mxfp8_block)
  ours_fp8     the bf16 checkpoint with --quantization fp8 (online FP8)
  ours_fp8kv   the bf16 checkpoint with --kv-cache-dtype fp8_e4m3
Their bar is derived from the measured quantization error. Δq = mean |Δ logprob| of the quantized server's prefill
vs ours' prefill of the same forced sequences over the same positions (decode steps 1..31): what the quantization
does to this model's logprobs. A quantized server's decode and prefill quantize the same weights with the same
scales, and (linear layers; block-FP8 MoE) each token's activations per token (group of 128) in both paths, so
consistent paths differ only by the bf16 rounding ours already shows, amplified where a rounding difference flips
an fp8 rounding. A path-dependent quantization (one path unquantized, another scale or layout, stale weights in
the decode graph) moves decode by the order of Δq itself. Bar: gap_q <= gap_ours + Δq / 2, for decode_vs_prefill
and radix_decode (and batch_b3/b5 when run): a discrepancy of half the quantization effect beyond ours' bf16 gap
fails. Known path dependences by design, stated not excused: SGLang's online-FP8 fused MoE quantizes its
activations per tensor over the whole batch (per-tensor weight scales: `scaled_fp8_quant` without per-token), so
a prefill and a decode step of the same token see different activation scales; with fp8 KV, SGLang's dense
(non-sparse) layers attend to the chunk's own tokens in bf16 during a prefill but read every token from the fp8
cache during decode (our sparse layers read the cache in both).

Ours' serving variants (`ours_fa3`: SGLang's fa3 for the dense layers; `ours_page128`: page size 128;
`ours_fa3_page128`: both, the in-tree's Hopper layout), measured on ours' forced tokens like the quantized servers
(ours first): the same bf16 model, so their prefill must agree with ours' within gpu_e2e's bf16 bound (MEAN_TOL)
and each gap may exceed ours' by MARGIN at most. `intree_fa3` is the
in-tree at its own Hopper default (fa3, page size 128), reported beside them.

    python scripts/gpu_consistency.py --out $OUT [--servers ours,intree]
    python scripts/gpu_consistency.py --out $OUT --servers ours,ours_mxfp8,ours_fp8,ours_fp8kv --checks decode,radix
    python scripts/gpu_consistency.py --out $OUT --servers ours,ours_fa3,ours_fa3_page128,intree_fa3 --checks decode,radix
    python scripts/gpu_consistency.py --cpu --out DIR --servers ours,ours_fp8kv --checks decode,radix   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import urllib.error
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_e2e import CKPT_SHAPE, COMMON_FLAGS, MEAN_TOL, diff, greedy, logprobs, prompt, write_checkpoint  # noqa: E402
from gpu_quant import ENV as QUANT_ENV  # noqa: E402
from servers import Server, flush, post  # noqa: E402

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor  # noqa: E402

PROMPT_LENS = (700, 1500, 3001)             # sparse regime (top-4 · 128 = 512), none a multiple of 128
BATCH_LENS = (600, 900, 1300, 2100, 3001)   # the five requests of the batch-invariance check
FORCED = 32
MARGIN = 0.02                               # ours may exceed the in-tree's gap by this much (issue 8)
FLAGS = [*COMMON_FLAGS, "--enable-custom-logit-processor", "--disable-overlap-schedule", "--chunked-prefill-size", "8192"]
FLAGS[FLAGS.index("--cuda-graph-max-bs") + 1] = "4"
# name: (checkpoint, extra flags, environment)
SERVERS = {"ours": ("bf16", [], {}), "intree": ("bf16", [], {"SGLANG_PLUGINS": "none"}),
           "ours_mxfp8": ("mxfp8", [], QUANT_ENV), "ours_fp8": ("bf16", ["--quantization", "fp8"], QUANT_ENV),
           "ours_fp8kv": ("bf16", ["--kv-cache-dtype", "fp8_e4m3"], {}),
           # SGLang's default on sm90 once sgl-deep-gemm imports (a standard install): DeepGEMM's JIT block-FP8 GEMM.
           # Its start-up precompile (every M up to the token budget) is switched off: kernels compile on first use
           # instead, which changes start-up time, not the numbers.
           "ours_mxfp8_deepgemm": ("mxfp8", [], {"SGLANG_JIT_DEEPGEMM_PRECOMPILE": "0"}),
           # Serving configurations other than the pinned Triton dense backend at page size 1 (the flags after FLAGS
           # win): ours over SGLang's fa3 for the dense layers, ours at page size 128, and the in-tree at its own
           # Hopper default (named fa3, it sets page size 128: sglang/srt/arg_groups/overrides.py, its M3 entry).
           "ours_fa3": ("bf16", ["--attention-backend", "fa3"], {}),
           "ours_page128": ("bf16", ["--page-size", "128"], {}),
           "ours_fa3_page128": ("bf16", ["--attention-backend", "fa3", "--page-size", "128"], {}),
           "intree_fa3": ("bf16", ["--attention-backend", "fa3"], {"SGLANG_PLUGINS": "none"})}
QUANTIZED = ("ours_mxfp8", "ours_fp8", "ours_fp8kv", "ours_mxfp8_deepgemm")
# Ours in another unquantized configuration: the same model in bf16, so its prefill must agree with ours' within the
# bf16 bound (MEAN_TOL) and each gap may exceed ours' by at most MARGIN (the bar ours has against the in-tree).
VARIANTS = ("ours_fa3", "ours_page128", "ours_fa3_page128")
CPU_SERVERS = ("ours", "ours_fp8kv")  # SGLang's CPU engine serves neither fp8 GEMMs nor the in-tree M3's kernels
CHECKS = ("decode", "radix", "batch", "oov")
QUANT_BAR_FRACTION = 0.5  # of Δq, added to ours' gap (see the module docstring)


class ForceTokens(CustomLogitProcessor):
    """Force `forced[step]` at each sampling step of a request and log the log-probability the model gave it.

    custom params: forced (list of token ids), tag (str), log (path of a JSON-lines file). The step is the
    number of tokens the request has output so far (exact with --disable-overlap-schedule; the overlap
    scheduler appends a step's token only after launching the next step). A non-final prefill chunk is sampled
    and discarded by SGLang with step 0; the reader keeps the last row of each step. The logged value is
    log_softmax(logits)[forced] in fp32, what SGLang itself returns for a greedy request's output token."""

    def __call__(self, logits, custom_param_list=None):
        import json as _json

        import torch as _torch

        for row, p in enumerate(custom_param_list or []):
            if not p or "forced" not in p:
                continue
            step = len(p["__req__"].output_ids)
            tok = p["forced"][min(step, len(p["forced"]) - 1)]
            lp = _torch.log_softmax(logits[row].float(), dim=-1)
            with open(p["log"], "a") as f:
                f.write(_json.dumps({"tag": p["tag"], "step": step, "lp": lp[tok].item(),
                                     "argmax": int(lp.argmax())}) + "\n")
            logits[row].fill_(float("-inf"))
            logits[row, tok] = 0.0
        return logits


class Forcer:
    """Sends forced-decode requests to one server and reads back what ForceTokens logged."""

    def __init__(self, server: Server, log: Path):
        self.server, self.log, self.n = server, log, 0
        log.unlink(missing_ok=True)  # tags restart at 1 with every server
        self.processor = ForceTokens.to_str()

    def run(self, ids: list[int], forced: list[int]) -> dict:
        self.n += 1
        tag = f"{self.server.name}-{self.n}"
        out = post(self.server.url + "/generate", {
            "input_ids": ids, "custom_logit_processor": self.processor, "return_logprob": True,
            "logprob_start_len": len(ids) - 1,
            "sampling_params": {"max_new_tokens": len(forced), "temperature": 0, "ignore_eos": True,
                                "custom_params": {"forced": forced, "tag": tag, "log": str(self.log)}}})
        got = [t for _, t, _ in out["meta_info"]["output_token_logprobs"]]
        assert got == forced, f"forcing failed on {self.server.name}: {got[:8]} vs {forced[:8]}"
        lp = {r["step"]: r["lp"] for r in map(json.loads, self.log.read_text().splitlines()) if r["tag"] == tag}
        assert sorted(lp) == list(range(len(forced))), f"steps logged for {tag}: {sorted(lp)}"
        return {"lp": [lp[i] for i in range(len(forced))], "cached": out["meta_info"]["cached_tokens"]}

    def concurrent(self, jobs: list[tuple[list[int], list[int]]]) -> list[dict]:
        results: list = [None] * len(jobs)

        def one(i):
            results[i] = self.run(*jobs[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def mean_of(rows: list[dict]) -> dict:
    return {"mean": sum(r["mean"] for r in rows) / len(rows), "max": max(r["max"] for r in rows),
            "per_prompt_mean": [round(r["mean"], 4) for r in rows]}


def checks(server: Server, forcer: Forcer, prompts, conts, batch_prompts, batch_conts,
           which=CHECKS) -> dict:
    """The checks named in `which` ("decode", "radix", "batch"; see the module docstring) on one server.
    With "decode", `prefill_lp` keeps the prefill's scores of each forced continuation (steps 0..F-1), from
    which a quantized server's distance from ours (Δq) is computed."""
    flush_ = lambda: flush(server)
    res: dict = {}
    rows: dict = {"decode_vs_prefill": [], "radix_decode": []}
    for p, f in zip(prompts, conts):
        if "decode" in which:
            flush_()
            dec = forcer.run(p, f)["lp"]
            flush_()
            pre = logprobs(server, p + f)[len(p) - 1:]  # pre[i] scores f[i]
            rows["decode_vs_prefill"].append(diff(dec, pre, start=1))  # step 0 is the prompt's own prefill
            res.setdefault("prefill_lp", []).append([round(x, 5) for x in pre])
        if "radix" in which:
            # Radix hit: turn 1 decodes f[:16] (ends mid-block), turn 2 extends it and decodes f again.
            flush_()
            forcer.run(p, f[:16])
            turn2 = p + f[:16] + prompt(333, seed=len(p))
            hit = forcer.run(turn2, f)
            res.setdefault("cached", []).append(hit["cached"])
            flush_()
            cold = logprobs(server, turn2 + f)[len(turn2) - 1:]
            rows["radix_decode"].append(diff(hit["lp"], cold, start=1))
    res.update({k: mean_of(v) for k, v in rows.items() if v})

    if "batch" in which:
        alone = []
        for p, f in zip(batch_prompts, batch_conts):
            flush_()
            alone.append(forcer.run(p, f)["lp"])
        for name, n in (("batch_b3", 3), ("batch_b5", 5)):
            flush_()
            got = forcer.concurrent(list(zip(batch_prompts[:n], batch_conts[:n])))
            res[name] = mean_of([diff(g["lp"], a, start=1) for g, a in zip(got, alone[:n])])
    return res


def quant_effect(q: dict, ours: dict) -> dict:
    """Δq: mean |Δ logprob| of a quantized server's prefill vs ours' over the forced continuations' positions
    1..F-1 (the positions the gaps are measured on), mean over prompts; per-prompt means and the largest max."""
    return mean_of([diff(a, b, start=1) for a, b in zip(q["prefill_lp"], ours["prefill_lp"])])


def oov_check(server: Server) -> dict:
    """A token id past the vocabulary: HTTP 400 naming it, and the server answers the next request."""
    rec: dict = {}
    try:
        post(server.url + "/generate", {"input_ids": [5, 999999], "sampling_params": {"max_new_tokens": 2}})
        rec["status"] = 200
    except urllib.error.HTTPError as e:
        rec["status"], rec["message"] = e.code, getattr(e, "body", b"").decode()[:300]  # servers.post read it
    except Exception as e:  # the server went away
        rec["status"], rec["message"] = None, repr(e)[:300]
    try:
        toks, _ = greedy(server, prompt(300, seed=99), 4)
        rec["next_request_tokens"] = len(toks)
    except Exception as e:
        rec["next_request_tokens"], rec["next_error"] = 0, repr(e)[:300]
    rec["pass"] = rec["status"] == 400 and rec["next_request_tokens"] == 4
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_consistency"))
    ap.add_argument("--servers", default="ours,intree", help=f"comma list of {', '.join(SERVERS)}; ours first "
                    "when a quantized server is named (its forced tokens and prefill are their reference)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)} (oov: ours only; "
                    "quantized servers need decode, which measures Δq)")
    ap.add_argument("--cpu", action="store_true", help="smoke run on CPU: tiny fp32 checkpoint, ours and ours_fp8kv "
                    "only (fp32: ours' gaps should be ~1e-5)")
    args = ap.parse_args()
    names, which = args.servers.split(","), tuple(args.checks.split(","))
    problems = [f"unknown server {n!r}" for n in names if n not in SERVERS]
    problems += [f"unknown check {c!r}" for c in which if c not in CHECKS]
    if any(n in QUANTIZED + VARIANTS for n in names):
        if names[0] != "ours":
            problems.append("quantized servers and ours' variants are measured against ours: name ours first")
        if "decode" not in which:
            problems.append("quantized servers and ours' variants need the decode check (it measures their prefill "
                            "against ours')")
    if args.cpu:
        problems += [f"{n} is not served on CPU" for n in names if n not in CPU_SERVERS]
    if problems:
        ap.error("; ".join(problems))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Not under --out (the device host returns few files); one per run, so two lanes of one host (gpu_round.sh)
    # never share a checkpoint or a forced-token log.
    work = Path(tempfile.mkdtemp(prefix="m3_gpu_consistency_"))
    if args.cpu:
        from sglang_m3.tiny import write_tiny_checkpoint
        from tests.conftest import Server as CpuServer  # the CPU flags the tests use (--dtype float32, ...)

        ckpts = {"bf16": write_tiny_checkpoint(work / "ckpt_cpu", flat=True, dtype="float32")}
        start = lambda name, port, ckpt, flags, env: CpuServer(  # noqa: E731
            ckpt, *FLAGS[FLAGS.index("--enable-custom-logit-processor"):], *flags, log_dir=work / name)
    else:
        ckpts = {"bf16": write_checkpoint(work)}
        if any(SERVERS[n][0] == "mxfp8" for n in names):  # the same source weights in the MXFP8 release's layout
            from sglang_m3.tiny import write_tiny_checkpoint

            ckpts["mxfp8"] = write_tiny_checkpoint(work / "ckpt_mxfp8", flat=True, dtype="bfloat16", quant="mxfp8",
                                                   **CKPT_SHAPE)
        start = lambda name, port, ckpt, flags, env: Server(  # noqa: E731
            name, ckpt, [*FLAGS, *flags], log_dir=work, port=port, env=env)
    prompts = [prompt(n, seed=10 + i) for i, n in enumerate(PROMPT_LENS)]
    batch_prompts = [prompt(n, seed=20 + i) for i, n in enumerate(BATCH_LENS)]
    flags_used = ["tests/conftest.py CPU flags", *FLAGS[FLAGS.index("--enable-custom-logit-processor"):]] \
        if args.cpu else FLAGS
    results: dict = {"flags": flags_used, "prompt_lens": PROMPT_LENS, "batch_lens": BATCH_LENS, "forced": FORCED,
                     "checks_run": which, "mode": "cpu fp32" if args.cpu else "gpu bf16", "servers": {}}
    conts = batch_conts = None
    for i, name in enumerate(names):
        ckpt, flags, env = SERVERS[name]
        (work / name).mkdir(exist_ok=True)
        server = start(name, 30300 + i, ckpts[ckpt], flags, env)
        server.name = name
        try:
            server.wait()
            info = {"startup_s": round(server.startup_s, 1), "flags": flags}
            if conts is None:  # the first server's greedy tokens are every server's forced continuation
                conts = [greedy(server, p, FORCED)[0] for p in prompts]
                batch_conts = [greedy(server, p, FORCED)[0] for p in batch_prompts] if "batch" in which else []
            info.update(checks(server, Forcer(server, work / f"forced_{name}.jsonl"), prompts, conts,
                               batch_prompts, batch_conts, which))
            if "oov" in which and name == "ours":
                info["oov"] = oov_check(server)
            results["servers"][name] = info
        except Exception as e:  # record and go on: one broken server must not hide the other's results
            results["servers"][name] = {"error": repr(e)[:2000], "log_tail": server.log()[-3000:]}
        finally:
            server.stop()
            # after every server (the servers not yet run count as failed), so a run cut short by the device's
            # time limit still leaves its numbers
            results["verdict"] = verdict(results["servers"], names)
            (out / "consistency.json").write_text(json.dumps(results, indent=1))
            (out / "consistency.md").write_text(markdown(results))
    print((out / "consistency.md").read_text())
    return results


GAPS = ("decode_vs_prefill", "radix_decode", "batch_b3", "batch_b5")


def verdict(servers: dict, requested=None) -> dict:
    """PASS when every requested server served and every check that the servers run allow holds: ours vs the
    in-tree (issue 8 bars), ours' radix prefix cached and OOV refusal, each quantized server's gaps within
    ours' + Δq/2 (adds `quant_effect` and `quant_bar` to that server's entry), each of ours' variants within the
    bf16 bound of ours' prefill and MARGIN of ours' gaps (adds `prefill_vs_ours`)."""
    ok = lambda name: name in servers and "error" not in servers[name]  # noqa: E731
    ours, intree = servers.get("ours", {}), servers.get("intree", {})
    c: dict = {}
    if ok("ours") and ok("intree"):
        for k in ("decode_vs_prefill", "radix_decode"):
            if k in ours and k in intree:
                c[f"{k}: ours <= in-tree + {MARGIN}"] = ours[k]["mean"] <= intree[k]["mean"] + MARGIN
        for k in ("batch_b3", "batch_b5"):
            if k in ours:
                c[f"{k}: ours <= {MEAN_TOL}"] = ours[k]["mean"] <= MEAN_TOL
    if ok("ours"):
        if ours.get("cached"):
            c["radix prefix cached"] = all(x > 0 for x in ours["cached"])
        if "oov" in ours:
            c["oov refused, server alive"] = ours["oov"]["pass"]
    for name in QUANTIZED + VARIANTS:
        if name not in servers:
            continue
        s = servers[name]
        if not (ok(name) and ok("ours") and "prefill_lp" in s and "prefill_lp" in ours):
            c[f"{name} served and measured against ours"] = False
            continue
        effect = quant_effect(s, ours)  # prefill vs ours' prefill: Δq for a quantized server
        if name in QUANTIZED:
            margin, why = QUANT_BAR_FRACTION * effect["mean"], f"{QUANT_BAR_FRACTION} x Δq {effect['mean']:.4f}"
        else:  # the same bf16 model served another way: its prefill is ours' up to bf16 rounding
            c[f"{name} prefill vs ours' {effect['mean']:.4f} <= {MEAN_TOL}"] = effect["mean"] <= MEAN_TOL
            margin, why = MARGIN, f"{MARGIN}"
        bars = {k: ours[k]["mean"] + margin for k in GAPS if k in s and k in ours}
        for k, bar in bars.items():
            c[f"{name} {k} {s[k]['mean']:.4f} <= ours {ours[k]['mean']:.4f} + {why} = {bar:.4f}"] = s[k]["mean"] <= bar
        if name in QUANTIZED:
            s["quant_effect"], s["quant_bar"] = effect, {k: round(b, 4) for k, b in bars.items()}
        else:
            s["prefill_vs_ours"] = effect
    failed = [n for n in (requested or servers) if not ok(n)]
    return {"pass": bool(c) and all(c.values()) and not failed, "checks": c, "servers_failed": failed}


def markdown(results: dict) -> str:
    v = results["verdict"]
    lines = [f"Forced-continuation consistency ({results.get('mode', 'gpu bf16')}, flags {' '.join(results['flags'])}); "
             f"verdict: {'PASS' if v['pass'] else 'FAIL'}", "",
             "| server | start s | decode vs prefill | radix-hit decode | batch 3 vs alone | batch 5 vs alone | "
             "cached | OOV | prefill vs ours' (Δq) | bar (ours + Δq/2) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results["servers"].items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error'][:200]} |")
            continue
        cell = lambda k: f"{s[k]['mean']:.4f} / {s[k]['max']:.2f} {s[k]['per_prompt_mean']}" if k in s else "—"  # noqa: E731
        oov = f"{s['oov']['status']} / next ok: {s['oov']['next_request_tokens'] == 4}" if "oov" in s else "—"
        dq = s.get("quant_effect") or s.get("prefill_vs_ours")  # (ours' variants: the same measure, no Δq bar)
        dq_cell = f"{dq['mean']:.4f} / {dq['max']:.2f} {dq['per_prompt_mean']}" if dq else "—"
        lines.append(f"| {name} | {s['startup_s']} | {cell('decode_vs_prefill')} | {cell('radix_decode')} | "
                     f"{cell('batch_b3')} | {cell('batch_b5')} | {s.get('cached', '—')} | {oov} | {dq_cell} | "
                     f"{s.get('quant_bar', '—')} |")
    lines += ["", "mean / max |Δ logprob| over decode steps 1..31 (step 0 is the prompt's prefill), per-prompt means "
              "in brackets; prefill vs ours': a server's prefill vs ours' on the same tokens and positions (Δq for a "
              "quantized server; for ours' variants bf16 rounding, bound MEAN_TOL)", "",
              "checks: " + json.dumps(v["checks"], indent=1), f"servers failed: {v['servers_failed'] or 'none'}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
