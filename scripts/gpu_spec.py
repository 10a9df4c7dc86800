"""Speculative decoding on the GPU: EAGLE3 (random tiny draft) and NGRAM against no speculation, ours and in-tree.

The tiny checkpoint of gpu_e2e.py with a 64K context (real attention geometry: head/index dim 128, block 128,
top-4, so prompts past 512 tokens are sparse) plus a random EAGLE3 draft (sglang_m3.tiny_eagle3). Servers, in
priority order (a time budget skips the tail, recorded as skipped):
  base            ours, no speculation, CUDA graphs on
  eagle3          ours, EAGLE3 chain (topk 1, 3 steps, 4 draft tokens), graphs on
  ngram           ours, NGRAM (8 draft tokens; its drafts are always a tree), graphs on
  eagle3_tree     ours, EAGLE3 tree (topk 2, 3 steps, 6 draft tokens), graphs on
  eagle3_eager / ngram_eager / eagle3_tree_eager      ours, the same, --disable-cuda-graph
  intree_eagle3   SGLang's own M3 with the eagle3 flags (SGLANG_PLUGINS=none): the yardstick, its failure
                  recorded as it is
  intree_ngram    the in-tree M3 with the ngram flags
Per server: greedy continuations of sparse prompts (tokens vs base's; decoded logprobs -- computed by the verify
forwards -- vs base's teacher-forced prefill scores of the same tokens), the gpu_e2e consistency checks (decode vs
prefill, radix-cache hit vs flushed, with the decode speculative), spec accept length, decode tok/s at concurrency
1 and 8 (wall time of a request with a short prefill; the same measure for base). The repetitive "code" prompts
(repeated lines) come at 2000 tokens and at LONG_LEN (~32K, the issue's long prompt; ends mid-block): the greedy
check on the first long one, and decode tok/s at concurrency 1 and 8 on long ones, timed after an untimed
max_new_tokens=1 request put the prompts in the radix cache (so the wall time is decode, not the 32K prefill;
the prefill wall is recorded too). Caveat for NGRAM: SGLang 0.5.17 puts only the last max-trie-depth (18)
tokens of prompt+output into its n-gram corpus per step (speculative/ngram_worker.py _update_ngram_corpus), so
the prompt's repeated lines feed drafts only through what the model itself repeats.
Each server logs to $OUT/logs/server_<name>.log. Writes spec_results.json / spec_results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_e2e import CKPT_SHAPE, COMMON_FLAGS, MEAN_TOL, consistency, diff, greedy, prompt  # noqa: E402
from servers import Server, flush, post  # noqa: E402

PROMPT_LENS = (700, 1500)  # sparse (> top-4 x 128), not multiples of 128
DECODE = 64
SPEED_TOKENS = 256
LONG_LEN = 32_700  # ~32K "code" tokens; not a multiple of the 128-token block (the prefix ends mid-block)
CONTEXT = 65_536  # the checkpoint's max_position_embeddings (gpu_e2e's tiny one has 8192: too short for LONG_LEN)
FLAGS = list(COMMON_FLAGS)
FLAGS[FLAGS.index("--cuda-graph-max-bs") + 1] = "8"  # fewer captures: faster start-up
FLAGS += ["--decode-log-interval", "10"]  # SGLang's "Decode batch" lines say whether each batch ran graphed


def repetitive_prompt(n: int, seed: int) -> list[int]:
    """'Code' with repeated lines: 24 distinct random lines of 40 tokens, drawn with repetition."""
    import random

    rnd = random.Random(seed)
    lines = [[rnd.randrange(32, 127) for _ in range(39)] + [10] for _ in range(24)]
    out: list[int] = []
    while len(out) < n:
        out += lines[rnd.randrange(len(lines))]
    return out[:n]


def speed(server: Server, prompts: list[list[int]], warm: bool = False) -> dict:
    """Decode tok/s at concurrency len(prompts): generated tokens / wall time of one batched request.
    warm: first an untimed max_new_tokens=1 request of the same prompts (its prefill wall time recorded as
    prefill_wall_s), so the timed request hits the radix cache and its wall time is decode."""
    flush(server)
    prefill_wall = None
    if warm:
        t0 = time.time()
        post(server.url + "/generate", {"input_ids": prompts, "sampling_params": {
            "max_new_tokens": 1, "temperature": 0}})
        prefill_wall = round(time.time() - t0, 3)
    t0 = time.time()
    out = post(server.url + "/generate", {"input_ids": prompts, "sampling_params": {
        "max_new_tokens": SPEED_TOKENS, "temperature": 0, "ignore_eos": True}})
    wall = time.time() - t0
    out = out if isinstance(out, list) else [out]
    toks = sum(o["meta_info"]["completion_tokens"] for o in out)
    acc = [o["meta_info"].get("spec_accept_length") for o in out]
    ver = [o["meta_info"].get("spec_verify_ct") for o in out]
    return {"concurrency": len(prompts), "prompt_len": len(prompts[0]), "prefill_wall_s": prefill_wall,
            "cached_tokens": [o["meta_info"].get("cached_tokens") for o in out],
            "tokens": toks, "wall_s": round(wall, 3), "tok_s": round(toks / wall, 1),
            "spec_accept_length": acc if any(a is not None for a in acc) else None,
            "spec_verify_ct": ver if any(v is not None for v in ver) else None}


def continuation_logprobs(server: Server, prompt_ids: list[int], toks: list[int]) -> list[float]:
    """Teacher-forced logprobs of `toks` after `prompt_ids`: a prefill of the whole sequence on a flushed cache
    (logprob_start_len only keeps a 32K prompt's own logprobs out of the reply)."""
    flush(server)
    out = post(server.url + "/generate", {"input_ids": prompt_ids + toks, "return_logprob": True,
                                          "logprob_start_len": len(prompt_ids) - 1,
                                          "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
    return lps[len(lps) - len(toks):]


def check_server(server: Server, prompts, base_ref) -> dict:
    info: dict = {"startup_s": round(server.startup_s, 1)}
    rows = []
    for p, ref in zip(prompts, base_ref or [None] * len(prompts)):
        flush(server)
        toks, meta = greedy(server, p, DECODE)
        row = {"len": len(p), "spec_accept_length": meta.get("spec_accept_length"),
               "spec_verify_ct": meta.get("spec_verify_ct"), "completion_tokens": meta.get("completion_tokens")}
        if ref is not None:
            ref_toks, ref_scores = ref
            same = 0
            while same < len(toks) and toks[same] == ref_toks[same]:
                same += 1
            row["tokens_equal_base"] = same == len(ref_toks)
            row["first_divergence"] = None if same == len(ref_toks) else same
            # decoded logprobs (from the verify forwards) vs base's teacher-forced prefill, on the common tokens
            lp = [x[0] for x in meta["output_token_logprobs"]]
            if same:
                row["decode_vs_base_prefill"] = diff(lp[:same], ref_scores[:same])
        rows.append(row)
    info["greedy"] = rows
    return info


LOG_HEAD, LOG_TAIL = 200_000, 800_000  # characters kept of a server log: start-up flags/config, then the end


def trim_log(server: Server) -> None:
    """Each server logs (stdout+stderr of launch_server and its scheduler/detokenizer children) straight into
    $OUT/logs/server_<name>.log, so a failure is diagnosable from the call's $OUT alone, even when the call is cut
    by its time limit. A huge log keeps its first LOG_HEAD and last LOG_TAIL characters (flags and config at the
    start, the dying scheduler's traceback at the end)."""
    if not server.log_path.exists():
        return
    text = server.log()
    if len(text) > LOG_HEAD + LOG_TAIL:
        server.log_path.write_text(text[:LOG_HEAD] + f"\n[... {len(text) - LOG_HEAD - LOG_TAIL} characters cut by "
                                   "gpu_spec.trim_log ...]\n" + text[-LOG_TAIL:])


def decode_graph_use(log: str) -> dict:
    """Per #running-req, how many of SGLang's periodic "Decode batch" log lines (0.5.17 metrics_reporter.py: one
    every --decode-log-interval steps, "..., cuda graph: True|False, ...") ran with the CUDA graph and how many
    eagerly: tells whether a slow concurrency fell back to eager."""
    import re

    use: dict = {}
    for m in re.finditer(r"Decode batch.*?#running-req: (\d+),.*?cuda graph: (True|False)", log):
        d = use.setdefault(m.group(1), {"graph": 0, "eager": 0})
        d["graph" if m.group(2) == "True" else "eager"] += 1
    return use


def stage(info: dict, key: str, fn):
    """Run one measurement; a failure is recorded under the key instead of hiding the other measurements."""
    try:
        info[key] = fn()
    except Exception as e:  # noqa: BLE001
        info[key] = {"error": repr(e)[:1000]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_spec"))
    ap.add_argument("--servers", default="base,eagle3,ngram,eagle3_tree,eagle3_eager,ngram_eager,eagle3_tree_eager,"
                                         "intree_eagle3,intree_ngram")
    ap.add_argument("--budget-s", type=float, default=330, help="skip servers that would start after this")
    args = ap.parse_args()
    # A step timeout (gpu_round.sh's `timeout`, via gpu_spec.sh) sends SIGTERM: unwind through the `finally` that
    # stops the running server (its own session, so nothing else would) and trims its log.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # checkpoint and draft per lane: gpu_round.sh's two lanes may run this script side by side
    work = Path(f"/tmp/m3_gpu_spec_lane{os.environ.get('SGLANG_M3_PORT_LANE', '0')}")
    work.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    from sglang_m3.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work / "ckpt", flat=True, dtype="bfloat16", **CKPT_SHAPE,
                                 max_position_embeddings=CONTEXT)
    from sglang_m3.tiny_eagle3 import write_tiny_eagle3

    draft = write_tiny_eagle3(work / "eagle3", ckpt)
    eagle = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(draft),
             "--speculative-num-steps", "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]
    eagle_tree = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(draft),
                  "--speculative-num-steps", "3", "--speculative-eagle-topk", "2",
                  "--speculative-num-draft-tokens", "6"]
    ngram = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8"]
    configs = {
        "base": ([], {}),
        "eagle3": (eagle, {}),
        "ngram": (ngram, {}),
        "eagle3_eager": (eagle + ["--disable-cuda-graph"], {}),
        "ngram_eager": (ngram + ["--disable-cuda-graph"], {}),
        "eagle3_tree": (eagle_tree, {}),
        "eagle3_tree_eager": (eagle_tree + ["--disable-cuda-graph"], {}),
        # in-tree: its draft backend is not forced by our plugin; pass the dense one explicitly, as a user would
        "intree_eagle3": (eagle + ["--speculative-draft-attention-backend", "triton"], {"SGLANG_PLUGINS": "none"}),
        "intree_ngram": (ngram, {"SGLANG_PLUGINS": "none"}),
    }
    prompts = [prompt(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
    rep = [repetitive_prompt(2000, seed=7)]
    long_rep = [repetitive_prompt(LONG_LEN, seed=200 + i) for i in range(8)]
    speed_prompts = [prompt(600, seed=100 + i) for i in range(8)]
    results: dict = {"flags": FLAGS, "configs": {k: v[0] for k, v in configs.items()}, "servers": {}}
    base_ref = None
    for k, name in enumerate(args.servers.split(",")):
        if time.time() - t_start > args.budget_s:
            results["servers"][name] = {"skipped": f"time budget {args.budget_s}s spent"}
            continue
        flags, env = configs[name]
        server = Server(name, ckpt, [*FLAGS, *flags], log_dir=out / "logs", port=30200 + k, env=env)
        info = None  # this server's measurements so far (kept if the run is interrupted)
        try:
            server.wait(timeout=240)
            use = prompts + rep + long_rep[:1]
            info = check_server(server, use, base_ref)
            if name == "base":
                base_ref = []
                for p in use:
                    flush(server)
                    toks, _ = greedy(server, p, DECODE)
                    base_ref.append((toks, continuation_logprobs(server, p, toks)))
            # decode (speculative here) vs prefill of the same tokens; radix-cache hit vs flushed
            stage(info, "consistency", lambda: consistency(server, prompts))
            if not name.endswith("_eager"):
                stage(info, "speed", lambda: [speed(server, speed_prompts[:1]), speed(server, speed_prompts)])
                stage(info, "speed_repetitive", lambda: speed(server, rep))
                stage(info, "speed_long", lambda: [speed(server, long_rep[:1], warm=True),
                                                   speed(server, long_rep, warm=True)])
            results["servers"][name] = info
        except Exception as e:  # noqa: BLE001 -- recorded; one broken server must not hide the others
            results["servers"][name] = {"error": repr(e)[:1500], "log_tail": server.log()[-4000:],
                                        "log": f"logs/server_{name}.log"}
        finally:
            server.stop()
            trim_log(server)
            results["servers"].setdefault(name, {"error": "interrupted (SIGTERM: the step's time limit)",
                                                 "partial": info,
                                                 "log": f"logs/server_{name}.log"})
            if server.log_path.exists():
                results["servers"][name]["decode_graph_use"] = decode_graph_use(server.log())
            (out / "spec_results.json").write_text(json.dumps(results, indent=1))
    results["verdict"] = verdict(results["servers"])
    results["elapsed_s"] = round(time.time() - t_start, 1)
    (out / "spec_results.json").write_text(json.dumps(results, indent=1))
    (out / "spec_results.md").write_text(markdown(results))
    print((out / "spec_results.md").read_text())


def verdict(servers: dict) -> dict:
    """Ours only: every speculative server's decoded logprobs within MEAN_TOL (mean) of base's teacher-forced
    scores and its own decode-vs-prefill / radix gaps within MEAN_TOL. Greedy token equality is reported, not
    judged (a bf16 near-tie may flip one token, after which the sequences legitimately differ)."""
    checks = {}
    for name, info in servers.items():
        if name == "base" or name.startswith("intree") or "greedy" not in info:
            continue
        for row in info["greedy"]:
            if "decode_vs_base_prefill" in row:
                checks[f"{name} len {row['len']} decode vs base"] = row["decode_vs_base_prefill"]["mean"] <= MEAN_TOL
        cons = info.get("consistency", {})
        if "error" in cons:
            checks[f"{name} consistency ran"] = False
            continue
        checks[f"{name} radix prefix cached"] = all(c > 0 for c in cons["cached_tokens"])
        for key in ("decode_vs_prefill", "radix_extend", "radix_decode"):
            checks[f"{name} {key}"] = cons[key]["mean"] <= MEAN_TOL
    failed = [n for n, i in servers.items() if not n.startswith("intree") and "error" in i]
    return {"pass": bool(checks) and all(checks.values()) and not failed, "checks": checks,
            "ours_failed": failed, "mean_tol": MEAN_TOL}


def _mean(xs):
    return None if not xs else round(sum(xs) / len(xs), 2)


def markdown(r: dict) -> str:
    v = r["verdict"]
    lines = [f"verdict (ours, mean |Δ logprob| <= {MEAN_TOL}): {'PASS' if v['pass'] else 'FAIL'}; "
             f"failed servers: {v['ours_failed']}; elapsed {r.get('elapsed_s')} s", "",
             f"| server | start s | greedy = base | decode vs base (mean/max) | accept len | decode vs prefill | "
             f"radix new / decode | cached | tok/s c1 | tok/s c8 | tok/s repetitive | {LONG_LEN} c1 tok/s (acc) | "
             f"{LONG_LEN} c8 tok/s (mean acc) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, i in r["servers"].items():
        if "error" in i or "skipped" in i:
            lines.append(f"| {name} | {(i.get('error') or i.get('skipped'))[:160]} |")
            continue
        g = i["greedy"]
        eq = [row.get("tokens_equal_base") for row in g]
        dv = "; ".join(f"{row['decode_vs_base_prefill']['mean']:.3f}/{row['decode_vs_base_prefill']['max']:.2f}"
                       for row in g if "decode_vs_base_prefill" in row)
        acc = [row.get("spec_accept_length") for row in g]
        c = i.get("consistency", {})
        sp = i.get("speed")
        sp = sp if isinstance(sp, list) else [sp or {}, {}]
        rp = i.get("speed_repetitive") or {}
        lg = i.get("speed_long")
        lg = lg if isinstance(lg, list) else [lg or {}, {}]
        cons = (f"{c['decode_vs_prefill']['mean']:.3f}/{c['decode_vs_prefill']['max']:.2f} | "
                f"{c['radix_extend']['mean']:.3f} / {c['radix_decode']['mean']:.3f} | {c['cached_tokens']}"
                if "decode_vs_prefill" in c else f"{str(c.get('error'))[:120]} | | ")
        lines.append(f"| {name} | {i['startup_s']} | {eq} | {dv} | {acc} | {cons} | "
                     f"{sp[0].get('tok_s', sp[0].get('error'))} | {sp[1].get('tok_s')} | "
                     f"{rp.get('tok_s', rp.get('error', ''))} (acc {rp.get('spec_accept_length')}) | "
                     f"{lg[0].get('tok_s', str(lg[0].get('error'))[:120])} "
                     f"({_mean(lg[0].get('spec_accept_length'))}) | "
                     f"{lg[1].get('tok_s')} ({_mean(lg[1].get('spec_accept_length'))}) |")
    lines += ["", "decode batches logged per #running-req, graphed / eager (SGLang's Decode batch lines):"]
    lines += [f"- {name}: " + ", ".join(f"{k}: {u['graph']}/{u['eager']}" for k, u in
                                          sorted(i.get("decode_graph_use", {}).items(), key=lambda kv: int(kv[0])))
              for name, i in r["servers"].items() if "skipped" not in i]
    lines += ["", "checks: " + json.dumps(v["checks"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
