"""Sparse-layer projections before and after the q/k/v/index fusion (issue 9 item 2), at M3's real dimensions.

    python3 benchmarks/proj_bench.py --out $OUT            # GPU: bf16 and 128x128 block FP8, TP1 and TP8 shapes
    python3 benchmarks/proj_bench.py --out /tmp/pb --smoke # CPU: tiny shapes, eager, bf16 only (checks it runs)

Variants, built from the same SGLang layers a server builds (dummy weights; the rank's shapes under SGLang's
parallel override, so TP8's per-rank GEMMs run on one GPU):
- `separate`: what sparse layers ran before fe0e998: QKVParallelLinear for q/k/v, a ReplicatedLinear computing ALL
  index heads then sliced to the rank's, a ReplicatedLinear for the index key (3 GEMMs);
- `fused`: sglang_m3.layers.qkv_index.QKVIndexParallelLinear, one GEMM with [q | k | v | index_q | index_k].
Each is timed alone (`gemm`) and followed by what the attention layer does next with the outputs (`+norm_rope`:
per-head Gemma norms of q, k, index q, index k and the partial NeoX RoPE, SGLang's GemmaRMSNorm and get_rope, as
sparse layers ran them before item 2; `fused_kernel_norm_rope`: the fused GEMM then sglang_m3's one-launch
qk_norm_rope_ on its output row, what M3Attention runs now),
captured in a CUDA graph, median replay time over --iters replays (L2 not flushed: weights of one layer at
decode sizes stay L2-resident on an H200 only for TP8; the figure is the steady-state per-layer cost).
Outputs are not compared here (the variants hold different random weights): tests/test_qkv_index.py checks the
fused layout against the separate tensors. Writes proj_bench.json and proj_bench.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import capture  # noqa: E402

REAL = dict(hidden=6144, head_dim=128, num_heads=64, num_kv_heads=4, index_dim=128, rotary_dim=64)
TINY = dict(hidden=256, head_dim=128, num_heads=16, num_kv_heads=4, index_dim=128, rotary_dim=64)


def setup_sglang(device: str) -> None:
    import torch.distributed as dist
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy", device=device), role="test")
    if not dist.is_initialized():
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method=f"file://{tempfile.mkdtemp()}/init")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)


def build(variant: str, dims: dict, tp: int, quant_config, device: str):
    """(module list, forward(x) -> (q, k, v, index_q, index_k) flat per-rank tensors)."""
    from sglang.srt.layers.linear import QKVParallelLinear, ReplicatedLinear
    from sglang.srt.runtime_context import get_parallel
    from sglang_m3.layers.qkv_index import QKVIndexParallelLinear

    H, D, HQ, KV, DI = (dims[k] for k in ("hidden", "head_dim", "num_heads", "num_kv_heads", "index_dim"))
    hq, kv = HQ // tp, max(1, KV // tp)
    start = 0  # rank 0's first KV head (every rank does the same amount of work)
    with get_parallel().override(tp_size=tp, tp_rank=0):
        if variant == "fused":
            layer = QKVIndexParallelLinear(H, D, HQ, KV, DI, quant_config=quant_config, prefix="p.qkv_proj")
            mods = [layer]

            def fwd(x):
                y, _ = layer(x)
                fwd.y = y  # for the fused norm + RoPE, which works on the whole row
                return y.split(layer.part_sizes, dim=-1)
        else:
            qkv = QKVParallelLinear(H, D, HQ, KV, bias=False, quant_config=quant_config, prefix="p.qkv_proj")
            iq = ReplicatedLinear(H, KV * DI, bias=False, quant_config=quant_config, prefix="p.index_q_proj")
            ik = ReplicatedLinear(H, DI, bias=False, quant_config=quant_config, prefix="p.index_k_proj")
            mods = [qkv, iq, ik]

            def fwd(x):
                y, _ = qkv(x)
                q, k, v = y.split([hq * D, kv * D, kv * D], dim=-1)
                a, _ = iq(x)
                b, _ = ik(x)
                return q, k, v, a[:, start * DI:(start + kv) * DI], b
    for m in mods:
        for name, p in m.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                p.data.copy_((torch.randn(p.shape, device=device) * 0.5).to(torch.float8_e4m3fn))
            elif "scale" in name:
                p.data.fill_(2.0 ** -8)
            else:
                p.data.normal_(0, 0.02)
        if hasattr(m.quant_method, "process_weights_after_loading"):
            m.quant_method.process_weights_after_loading(m)
    return mods, fwd, (hq, kv)


def norm_rope(dims: dict, heads: tuple[int, int], device: str):
    from sglang.srt.layers.layernorm import GemmaRMSNorm
    from sglang.srt.layers.rotary_embedding import get_rope

    D, DI = dims["head_dim"], dims["index_dim"]
    hq, kv = heads
    norms = [GemmaRMSNorm(d, eps=1e-6).to(device) for d in (D, D, DI, DI)]
    rope = get_rope(D, rotary_dim=dims["rotary_dim"], max_position=1 << 20, base=5e6, is_neox_style=True)
    rope = rope.to(device)

    def apply(pos, q, k, v, iq, ik):
        T = q.shape[0]
        q = norms[0](q.reshape(-1, D)).reshape(T, -1)
        k = norms[1](k.reshape(-1, D)).reshape(T, -1)
        q, k = rope(pos, q, k)
        iq = norms[2](iq.reshape(-1, DI)).reshape(T, -1)
        ik = norms[3](ik.contiguous())
        iq, ik = rope(pos, iq, ik)
        return q, k, v, iq, ik
    return apply


def fused_norm_rope(dims: dict, heads: tuple[int, int], device: str):
    """sglang_m3.layers.qk_norm_rope_ on the fused row (what M3Attention runs now): one launch, in place."""
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang_m3.layers.qk_norm_rope import qk_norm_rope_

    D, DI, R = dims["head_dim"], dims["index_dim"], dims["rotary_dim"]
    hq, kv = heads
    rope = get_rope(D, rotary_dim=R, max_position=1 << 20, base=5e6, is_neox_style=True).to(device)
    w = [torch.zeros(D, device=device) for _ in range(4)]
    iq0 = (hq + 2 * kv) * D
    groups = [(0, hq, w[0]), (hq * D, kv, w[1]), (iq0, kv, w[2]), (iq0 + kv * DI, 1, w[3])]

    def apply(pos, y):
        qk_norm_rope_(y, pos, rope.cos_sin_cache, groups, R, 1e-6)
    return apply


def time_us(fn, iters: int, cuda: bool) -> float:
    if not cuda:
        fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6
    g = capture(fn)  # kernel_timing's: warm-up on a side stream, then one captured call
    for _ in range(3):
        g.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for a, b in zip(starts, ends):
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager, bf16 only")
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    ap.add_argument("--tp", default="1,8")
    ap.add_argument("--iters", type=int, default=100)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.smoke
    device = "cuda" if cuda else "cpu"
    dims = TINY if a.smoke else REAL
    setup_sglang(device)
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    torch.set_default_device(device)
    from sglang_m3.quant import Mxfp8AsBlockFp8Config

    quants = {"bf16": None} if not cuda else {"bf16": None, "block_fp8": Mxfp8AsBlockFp8Config()}
    rows = []
    a.out.mkdir(parents=True, exist_ok=True)
    for qname, qcfg in quants.items():
        for tp in [int(t) for t in a.tp.split(",")]:
            built = {v: build(v, dims, tp, qcfg, device) for v in ("separate", "fused")}
            nr = norm_rope(dims, built["fused"][2], device)
            fnr = fused_norm_rope(dims, built["fused"][2], device)
            fused_fwd = built["fused"][1]
            for T in [int(t) for t in a.tokens.split(",")]:
                x = torch.randn(T, dims["hidden"], device=device) * 0.5
                pos = torch.randint(0, 1 << 17, (T,), device=device)
                row = {"quant": qname, "tp": tp, "tokens": T}
                for v, (_, fwd, _) in built.items():
                    row[f"{v}_gemm_us"] = round(time_us(lambda: fwd(x), a.iters, cuda), 2)
                    row[f"{v}_norm_rope_us"] = round(time_us(lambda: nr(pos, *fwd(x)), a.iters, cuda), 2)

                def fused_all():
                    fused_fwd(x)
                    fnr(pos, fused_fwd.y)
                row["fused_kernel_norm_rope_us"] = round(time_us(fused_all, a.iters, cuda), 2)
                row["gemm_speedup"] = round(row["separate_gemm_us"] / row["fused_gemm_us"], 3)
                row["norm_rope_speedup"] = round(row["separate_norm_rope_us"] / row["fused_norm_rope_us"], 3)
                row["total_speedup"] = round(row["separate_norm_rope_us"] / row["fused_kernel_norm_rope_us"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dims": dims, "iters": a.iters,
            "graphs": cuda}
    (a.out / "proj_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Sparse-layer projections, separate (3 GEMMs) vs fused (1 GEMM) — {meta['device']}", "",
             "GEMM alone; then GEMM + per-head norms + RoPE: SGLang's GemmaRMSNorm/rope per tensor (before: separate, "
             "after item 2.1: fused GEMM) and sglang-m3's one-launch qk_norm_rope_ (now). × = before ÷ after.", "",
             "| quant | TP | tokens | separate µs | fused µs | × | separate +norm/rope µs | fused +norm/rope µs | × "
             "| fused + qk_norm_rope_ µs | × vs before |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quant']} | {r['tp']} | {r['tokens']} | {r['separate_gemm_us']} | {r['fused_gemm_us']} | "
                     f"{r['gemm_speedup']} | {r['separate_norm_rope_us']} | {r['fused_norm_rope_us']} | "
                     f"{r['norm_rope_speedup']} | {r['fused_kernel_norm_rope_us']} | {r['total_speedup']} |")
    (a.out / "proj_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
