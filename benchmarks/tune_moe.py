#!/usr/bin/env python
"""Tune SGLang's fused-MoE Triton kernel configs for MiniMax-M3's routed-expert shapes (issue 9 §3), on one GPU.

Shapes (M3_SPEC §1.1): E = 128 experts, hidden K = 6144, expert width 3072 split over TP ranks, top-4, the clamped
SwiGLU as M3MoE runs it (activation "silu", gemm1_alpha 1.702, gemm1_clamp_limit 7.0, gate/up not interleaved).
Per TP size: w13 [E, 2 * 3072 / TP, 6144], w2 [E, 6144, 3072 / TP]. Two MoE dtypes (``--dtype``):

- ``bf16``: the unquantized release. SGLang's config name ``E=128,N=<N>,device_name=<GPU>.json``.
- ``fp8_w8a8``: block FP8 as our MXFP8-on-Hopper path serves it (quant.Mxfp8AsBlockFp8Config = SGLang's
  Fp8Config with weight_block_size [128, 128] → Fp8MoEMethod → TritonMoeQuantInfo(use_fp8_w8a8=True,
  block_shape=[128, 128], w13_scale/w2_scale = w13_weight_scale_inv/w2_weight_scale_inv)): e4m3 weights, fp32
  scales w1_scale [E, ceil(2N/128), ceil(K/128)], w2_scale [E, ceil(K/128), ceil(N/128)] (Fp8MoEMethod.
  create_weights), activations quantized per token group of 128 inside ``invoke_fused_moe_kernel``. SGLang's
  name (``get_config_dtype_str`` → "fp8_w8a8", ``get_config_file_name(E, N, "fp8_w8a8", [128, 128])``):
  ``E=128,N=<N>,device_name=<GPU>,dtype=fp8_w8a8,block_shape=[128, 128].json``.
  NOT covered: online FP8 (``--quantization fp8`` on the bf16 release, SGLang's ``Fp8Config()`` without a
  weight block) runs per-tensor FP8 MoE (one scale per expert, block_shape None): its name is
  ``...,dtype=fp8_w8a8.json`` without a block shape, a different file.

N = w2.shape[2] = 3072 / TP. SGLang looks files up under ``configs/triton_<version>/`` (``get_moe_configs``, and
sglang_m3.moe_configs.lookup through plugin.py's hook, with the same name); a file maps a token count M to one
config, the nearest M wins.

Method (our own loop over SGLang's installed kernel, not SGLang's tuning script): for each (dtype, TP) shape and
M, every candidate config of a bounded space runs ``fused_experts`` under ``override_config`` -- the call the
Triton MoE runner makes -- on random weights and a random top-4 routing, timed as CUDA-graph replays (median of
``--iters``); the fastest is written. The config SGLang picks today without our files (a bundled file for that name,
possibly from another Triton version's folder, else ``get_default_config``) is timed the same way and recorded
with the gain; a config that fails (e.g. OutOfResources: shared memory) is skipped.

Budget (``--budget-s``, wall clock from the first shape's weights): shapes in serving order, TP8 first (default
``--tp 8,4,2,1``), both dtypes per TP. Pass 1 tunes the decode sizes (M ≤ 256, in increasing M) of every shape,
each shape getting an equal share of what is left (remaining / shapes left; a shape that finishes early passes
its time on); an M once started runs to the end of its candidates unless the whole budget is spent. Pass 2 gives
what is left to decode sizes a shape's share did not reach (shape order), pass 3 an equal share per shape to the
larger M. A cut run so covers decode sizes of every shape first; what is not reached is listed per shape.

Candidate space and cost: each distinct config compiles twice per dtype (gate-up and down kernels differ in
constexprs), and again where Triton's integer specialisation (value 1, multiple of 16) changes with M. Compiling
every candidate's gate-up kernel for sm90 with the installed Triton 3.6 on a shared 2-core CPU took 0.25 s (bf16)
and 0.30 s (fp8) per config on average, 3 s at most; the H200 host compiles at least as fast, so compiles cost
~1-2 min of the run. Timing dominates: ~100 ``fused_experts`` calls per config (warm-up, capture, 8 replays of
10), an estimated 0.1-0.5 s per config from TP8 decode to TP1 M=256 (not yet measured with graphs), so the
decode pass should take ~4-6 min for both dtypes.
bf16: block M by M (each expert sees ~M * 4 / 128 rows), block N 64/128/256, block K 64/128, 4/8 warps, 3 stages,
less tiles whose pipelined buffers exceed Hopper's 227 KB of shared memory (``pipelined_smem_bytes``): 19-20 configs
per M, 49 distinct. fp8_w8a8 (block [128, 128]): the kernel reads one activation and one weight
scale per K step (``offs_ks = k_start // group_k``), so BLOCK_SIZE_K must divide 128; for BLOCK_SIZE_N ≤ group_n
it reads one weight scale per N tile (``pid_n * BLOCK_SIZE_N // group_n``), so BLOCK_SIZE_N must divide 128, and
above 128 it indexes per column (any multiple works). SGLang's own default for block quant is BLOCK_SIZE_N =
BLOCK_SIZE_K = 128. We keep block K = 128 only (SGLang's bundled H200 block-FP8 files for E=128 use 128 at every
M; with 1-byte weights a 64-wide K step halves the bytes per load) and block N 64/128/256: 10-11 configs per M,
half of bf16's, so both dtypes × 4 TP shapes reach M = 1..256 within the default 420 s.

Outputs under --out: ``configs/triton_<ver>/<SGLang's name>`` (tuned M values only, written after every M) and
``tune_moe.json`` (per shape and M: best config and µs, SGLang's current config and µs, the gain; budget shares;
``not_reached``).

    python benchmarks/tune_moe.py --out $OUT                   # GPU (scripts/gpu_tune_moe.sh)
    python benchmarks/tune_moe.py --dry-run                    # any machine: shapes, file names, space, budget
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

E, HIDDEN, INTER, TOPK = 128, 6144, 3072, 4
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
GRAPH_CALLS = 10  # fused_experts calls per timed CUDA-graph replay
DECODE_MAX_M = 256
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = ("bf16", "fp8_w8a8")
HOPPER_SMEM_BYTES = 232448  # sm90 shared memory per block (opt-in), the "Hardware limit" of the H200 run
FP8_BLOCK = [128, 128]  # [block_n, block_k] of quant.Mxfp8AsBlockFp8Config (weight_block_size)


def candidates(m: int, dtype: str = "bf16") -> list[dict]:
    """Bounded search space per M and dtype (module docstring: why these, and the block-FP8 constraints)."""
    block_m = [16, 32] if m <= 64 else [32, 64] if m <= 512 else [64, 128]
    block_k = [128] if dtype == "fp8_w8a8" else [64, 128]
    out = []
    for bm, bn, bk, warps in itertools.product(block_m, [64, 128, 256], block_k, [4, 8]):
        if bm * bn >= 128 * 256 and warps == 4:  # large tiles need 8 warps
            continue
        if bm <= 32 and bn == 256 and warps == 8:
            continue
        if pipelined_smem_bytes(bm, bn, bk, 3, dtype) > HOPPER_SMEM_BYTES:  # OutOfResources at launch
            continue
        out.append(dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1 if m <= 64 else 16,
                        num_warps=warps, num_stages=3))
    if dtype == "fp8_w8a8":
        assert all(valid_for_block_fp8(c) for c in out)
    return out


def pipelined_smem_bytes(bm: int, bn: int, bk: int, stages: int, dtype: str) -> int:
    """Shared memory of fused_moe_kernel's pipelined A and B tiles, bytes: stages * (BM*BK + BK*BN) * element size
    (2 for bf16, 1 for fp8; block scales add ~1 KB). Matches what the H200 run reported for bf16 64x256x128, 3
    stages ("Required: 245760") and what Triton 3.6 computes when compiling the kernel for sm90."""
    return stages * (bm * bk + bk * bn) * (1 if dtype == "fp8_w8a8" else 2)


def valid_for_block_fp8(config: dict, block_shape=FP8_BLOCK) -> bool:
    """Whether fused_moe_kernel applies block scales correctly with this tile (see the module docstring)."""
    group_n, group_k = block_shape
    bn, bk = config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    return group_k % bk == 0 and (group_n % bn == 0 if bn <= group_n else True)


def sglang_dtype(dtype: str) -> tuple[str | None, list[int] | None]:
    """(SGLang's config dtype string, block_shape) for our dtype name, as fused_experts passes them to
    try_get_optimal_moe_config (get_config_dtype_str: None for bf16, "fp8_w8a8" for use_fp8_w8a8)."""
    if dtype == "bf16":
        return None, None
    if dtype == "fp8_w8a8":
        return "fp8_w8a8", list(FP8_BLOCK)
    raise ValueError(f"--dtype: unknown MoE dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def config_file_name(n: int, dtype: str = "bf16") -> str:
    """SGLang's file name for this shape, as get_moe_configs (and sglang_m3.moe_configs.lookup) compute it:
    get_config_file_name(E, N, dtype, [block_n, block_k]) -- block [0, 0] (no selector) for bf16."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import get_config_file_name

    sg_dtype, block = sglang_dtype(dtype)
    return get_config_file_name(E, n, sg_dtype, block or [0, 0])


def setup_sglang(device: str) -> None:
    """What SGLang's kernels read at run time: published ServerArgs (Triton MoE runner) and world-size-1 groups."""
    import tempfile

    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy", device=device, moe_runner_backend="triton"), role="tune_moe")
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                    distributed_init_method=f"file://{tempfile.mkdtemp()}/init")
    ps.initialize_model_parallel(tensor_model_parallel_size=1)


class Case:
    """Random weights for one (dtype, TP) shape; inputs and routing per M.

    bf16: w1 [E, 2N, K], w2 [E, K, N] bf16. fp8_w8a8: the same shapes in float8_e4m3fn, with fp32 block scales
    w1_scale [E, ceil(2N/128), ceil(K/128)] and w2_scale [E, ceil(K/128), ceil(N/128)] (positive; values do not
    change the kernel's time). N = 3072 / tp, K = 6144. Raises ValueError for an unknown dtype."""

    def __init__(self, tp: int, device, dtype: str = "bf16"):
        import torch

        self.dtype, self.n, self.device = dtype, INTER // tp, device
        self.sglang_dtype, self.block_shape = sglang_dtype(dtype)
        g = torch.Generator(device=device).manual_seed(tp) if torch.device(device).type != "meta" else None
        self.w1 = torch.randn(E, 2 * self.n, HIDDEN, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        self.w2 = torch.randn(E, HIDDEN, self.n, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        self.w1_scale = self.w2_scale = None
        if self.block_shape is not None:
            bn, bk = self.block_shape
            # e4m3 weights of about unit size, scales restoring the bf16 magnitude (0.02)
            self.w1, self.w2 = (self.w1 * 50).to(torch.float8_e4m3fn), (self.w2 * 50).to(torch.float8_e4m3fn)
            self.w1_scale = torch.full((E, -(-2 * self.n // bn), -(-HIDDEN // bk)), 0.02, device=device)
            self.w2_scale = torch.full((E, -(-HIDDEN // bn), -(-self.n // bk)), 0.02, device=device)

    def inputs(self, m: int):
        import torch
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        g = torch.Generator(device=self.device).manual_seed(m)
        x = torch.randn(m, HIDDEN, device=self.device, dtype=torch.bfloat16, generator=g)
        logits = torch.randn(m, E, device=self.device, generator=g)
        w, ids = torch.topk(torch.sigmoid(logits), TOPK, dim=-1)
        return x, StandardTopKOutput(w.float(), ids.to(torch.int32), logits)

    def quant_kwargs(self) -> dict:
        """fused_experts' quantization arguments, as the Triton runner passes TritonMoeQuantInfo's fields."""
        if self.block_shape is None:
            return {}
        return dict(use_fp8_w8a8=True, w1_scale=self.w1_scale, w2_scale=self.w2_scale,
                    block_shape=list(self.block_shape))

    def sglang_current_config(self, m: int) -> dict:
        """What SGLang uses for this shape and M today without our files (bundled JSON if any, else default)."""
        from sglang.srt.layers.moe.moe_runner.triton_utils import try_get_optimal_moe_config

        return dict(try_get_optimal_moe_config(self.w1.shape, self.w2.shape, TOPK, self.sglang_dtype, m,
                                               block_shape=self.block_shape))

    def time_us(self, m: int, config: dict | None, warmup: int, iters: int) -> float:
        import torch
        from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
        from sglang.srt.layers.moe.moe_runner.triton_utils import fused_experts, override_config

        x, topk = self.inputs(m)
        rc = MoeRunnerConfig(num_experts=E, num_local_experts=E, top_k=TOPK, activation="silu", inplace=False,
                             gemm1_alpha=SWIGLU_ALPHA, gemm1_clamp_limit=SWIGLU_LIMIT, gate_up_interleaved=False)
        quant = self.quant_kwargs()

        def call():
            if config is None:
                return fused_experts(x, self.w1, self.w2, topk, rc, **quant)
            with override_config(config):
                return fused_experts(x, self.w1, self.w2, topk, rc, **quant)

        from kernel_timing import graph_replay_us

        for _ in range(warmup):  # compiles this config outside the graph
            call()
        return graph_replay_us(call, GRAPH_CALLS, iters)  # as the server's decode graph runs it


def plan(tps: list[int], dtypes: list[str], ms: list[int]):
    """Shapes in serving order (TP as given, both dtypes per TP) and the passes over their M values:
    [(name, Ms of this pass, fair share per shape?)] (module docstring: the budget)."""
    shapes = [(dtype, tp) for tp in tps for dtype in dtypes]
    decode = [m for m in ms if m <= DECODE_MAX_M]
    large = [m for m in ms if m > DECODE_MAX_M]
    passes = [("decode", decode, True), ("decode, rest of budget", decode, False), ("large M", large, True)]
    return shapes, [p for p in passes if p[1]]


def parse_list(text: str, what: str, conv=int) -> list:
    try:
        out = [conv(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise SystemExit(f"{what}: expected a comma list, got {text!r} ({e})")
    if not out:
        raise SystemExit(f"{what}: empty list")
    return out


def dry_run(shapes, passes, ms, budget_s: float) -> None:
    import torch
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config as sglang_cfg

    if not torch.cuda.is_available():  # SGLang names the GPU in the file; without one, show the pattern
        sglang_cfg.get_device_name = lambda: "<GPU>"
    dtypes = list(dict.fromkeys(d for d, _ in shapes))
    for dtype in dtypes:
        distinct = {json.dumps(c, sort_keys=True) for m in ms for c in candidates(m, dtype)}
        print(f"{dtype}: candidates per M " + ", ".join(f"{m}:{len(candidates(m, dtype))}" for m in ms)
              + f"; {len(distinct)} distinct configs")
    for dtype, tp in shapes:
        n = INTER // tp
        print(f"TP{tp} {dtype}: N={n} w13 [{E}, {2 * n}, {HIDDEN}] w2 [{E}, {HIDDEN}, {n}] -> "
              f"{config_file_name(n, dtype)}")
    for name, pass_ms, fair in passes:
        share = (f"each shape an equal share of what is left (remaining / shapes left; {budget_s / len(shapes):.0f} s "
                 f"for the first shape of the first pass)") if fair else "whatever is left, in shape order"
        print(f"pass {name}: M {pass_ms}; {share}")


def fill_untuned(out: Path, report: dict) -> None:
    """Complete each written config file with SGLang's own choice (its bundled file's nearest entry, else
    get_default_config) at every M the budget did not reach, so that shipping the file changes nothing at those M:
    SGLang takes the nearest M of a file, and without these entries a large prefill chunk would run the config
    tuned for the largest M reached. Records the entries as report["shapes"][i]["filled"] and rewrites the files
    and tune_moe.json. Needs SGLang's published config and, off the GPU, its device name patched to
    report["device"] (what main(--fill-untuned) does); the values equal what the tuner recorded as
    "sglang_config" on the GPU (checked for every tuned M of the 2026-11-30 H200 run)."""
    version_dir = f"triton_{report['triton'].replace('.', '_')}"
    for shape in report["shapes"]:
        path = out / "configs" / version_dir / shape["file"]
        # The M grid asked for minus the M values tuned (keys are str after a JSON round trip): also right for a
        # report written mid-run, before "not_reached" was set.
        tuned = {int(m) for m in shape["m"]}
        shape["not_reached"] = [m for m in report.get("m_grid", shape["not_reached"]) if m not in tuned]
        if not shape["not_reached"] or not path.is_file():
            continue
        case = Case(shape["tp"], "meta", shape["dtype"])  # shapes only: nothing is allocated
        configs = json.loads(path.read_text())
        shape["filled"] = {m: case.sglang_current_config(m) for m in shape["not_reached"]}
        configs.update({str(m): cfg for m, cfg in shape["filled"].items()})
        path.write_text(json.dumps({k: configs[k] for k in sorted(configs, key=int)}, indent=4))
    (out / "tune_moe.json").write_text(json.dumps(report, indent=1, default=str))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", default="8,4,2,1", help="TP sizes in priority order (N = 3072 / TP)")
    ap.add_argument("--dtype", default=",".join(DTYPES), help=f"MoE dtypes, comma list of {', '.join(DTYPES)}")
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="token counts to tune")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop tuning after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT") or "tune_moe_out")
    ap.add_argument("--dry-run", action="store_true", help="print shapes, file names, space and budget; run nothing")
    ap.add_argument("--fill-untuned", metavar="DIR", default=None,
                    help="complete an earlier run's files under DIR (its tune_moe.json) with SGLang's choice at the "
                         "M values it did not reach (any machine; a GPU run does this itself at the end)")
    args = ap.parse_args(argv)
    tps = parse_list(args.tp, "--tp")
    dtypes = parse_list(args.dtype, "--dtype", str.strip)
    for d in dtypes:
        try:
            sglang_dtype(d)
        except ValueError as e:
            raise SystemExit(str(e))
    ms = sorted(set(parse_list(args.m, "--m")))
    shapes, passes = plan(tps, dtypes, ms)
    if args.fill_untuned:
        from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config as sglang_cfg
        from sglang.srt.runtime_context import publish
        from sglang.srt.server_args import ServerArgs

        report = json.loads((Path(args.fill_untuned) / "tune_moe.json").read_text())
        publish(ServerArgs(model_path="dummy", device="cpu", moe_runner_backend="triton"), role="tune_moe")
        sglang_cfg.get_device_name = lambda: report["device"]  # the tuned GPU's files, looked up from any machine
        fill_untuned(Path(args.fill_untuned), report)
        return
    if args.dry_run:
        dry_run(shapes, passes, ms, args.budget_s)
        return

    import torch
    import triton

    device = torch.device("cuda")
    setup_sglang("cuda")
    t_end = time.monotonic() + args.budget_s
    version_dir = f"triton_{triton.__version__.replace('.', '_')}"
    out = Path(args.out)
    (out / "configs" / version_dir).mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, budget_s=args.budget_s,
                  m_grid=ms, shares=[], shapes=[])
    entries = {key: dict(dtype=key[0], tp=key[1], n=INTER // key[1], file=config_file_name(INTER // key[1], key[0]),
                         m={}, not_reached=[]) for key in shapes}
    report["shapes"] = list(entries.values())
    best_by = {key: {} for key in shapes}
    cases: dict = {}

    def tune(key, m, case) -> None:
        dtype, tp = key
        current = case.sglang_current_config(m)
        try:
            cur_us = case.time_us(m, current, args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001 -- seen on an H200: SGLang's default at M=256 needs 240 KB smem
            print(f"  TP{tp} {dtype} M={m} SGLang's config {current}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            cur_us = float("inf")
        best, best_us = current, cur_us
        for cfg in candidates(m, dtype):
            if time.monotonic() > t_end:
                break
            try:
                us = case.time_us(m, cfg, args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 -- a config the kernel rejects (e.g. out of shared memory)
                print(f"  TP{tp} {dtype} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if us < best_us:
                best, best_us = cfg, us
        if best_us == float("inf"):
            print(f"TP{tp} {dtype} M={m}: no config ran", flush=True)
            return
        best_by[key][m] = best
        entries[key]["m"][m] = dict(best=best, best_us=best_us, sglang_config=current,
                                    sglang_us=cur_us if cur_us < float("inf") else None,
                                    gain=cur_us / best_us if cur_us < float("inf") else None)
        print(f"TP{tp} {dtype} N={case.n} M={m}: SGLang {cur_us:.1f} us -> tuned {best_us:.1f} us "
              f"(x{cur_us / best_us:.2f}) {best}", flush=True)
        # written after every M: a run stopped by the step's time limit keeps what it tuned
        (out / "configs" / version_dir / entries[key]["file"]).write_text(
            json.dumps({str(k): best_by[key][k] for k in sorted(best_by[key])}, indent=4))
        (out / "tune_moe.json").write_text(json.dumps(report, indent=1, default=str))

    for name, pass_ms, fair in passes:
        for i, key in enumerate(shapes):
            now = time.monotonic()
            todo = [m for m in pass_ms if m not in entries[key]["m"]]
            if not todo or now > t_end:
                continue
            shape_end = now + (t_end - now) / (len(shapes) - i) if fair else t_end
            report["shares"].append(dict(pass_name=name, dtype=key[0], tp=key[1], share_s=round(shape_end - now, 1)))
            print(f"budget: pass '{name}' TP{key[1]} {key[0]}: {shape_end - now:.0f} s of {t_end - now:.0f} s left",
                  flush=True)
            if key not in cases:
                cases[key] = Case(key[1], device, key[0])
            for m in todo:
                if time.monotonic() > shape_end:
                    break
                tune(key, m, cases[key])
    fill_untuned(out, report)  # also sets each shape's not_reached (from m_grid)
    print(f"wrote {out}/configs/{version_dir}/ and tune_moe.json")


if __name__ == "__main__":
    main()
