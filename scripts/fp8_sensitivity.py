"""CPU test of the hypothesis behind the quantized servers' decode-vs-prefill gap (GPU_RESULTS.md, "Quantized
decode vs prefill"): decode and prefill run different GEMM kernels, so their bf16 outputs differ by ~1 ulp in a few
elements, and fp8 weights + dynamic fp8 activation quantization amplify that far more than bf16 does.

Model: the tiny checkpoint of scripts/gpu_consistency.py (gpu_e2e.CKPT_SHAPE: hidden 1024, 16 q / 2 KV heads, top-4
blocks, 4 layers), forward = transformers 5.12.1 MiniMaxM3VLForCausalLM via tests/hf_oracle.py (per-KV-group MSA),
cast to bf16 (router fp32, as served). Every nn.Linear and the routed experts' two matmuls are replaced by one GEMM:
(optionally fp8-quantized input) @ weight in fp32, output rounded to bf16 (what the GPU kernels do). Conditions:
  bf16    bf16 weights;
  fp8w    weights of the quantized linears rounded to fp8 e4m3 with 128x128 block scales (amax/448) and dequantized
          to bf16 ("fp8-valued weights"), unquantized activations. amax/448 is the DeepSeek-style block scale; the
          served MXFP8 conversion (sglang_m3.mxfp8.block_fp8_quantize) uses power-of-two tile scales instead, and
          the MXFP8 twin's weights had 1x32 scales first, so this condition approximates either server's weights;
  fp8wa   fp8w + dynamic activation quantization of each quantized linear's input to e4m3 with per-token 1x128-group
          scales max(amax, 1e-10)/448 (SGLang 0.5.17 per_token_group_quant_fp8, the w8a8 block-FP8 path of
          Fp8LinearMethod / Fp8MoEMethod with weight_block_size [128, 128]).
Quantized: q/k/v/o, indexer q/k, dense MLP, shared expert, routed experts (sglang_m3/quant.py); router, embeddings,
lm_head stay unquantized (lm_head is still perturbed below: it is a GEMM that differs between the paths too).
Perturbations ("a different GEMM kernel" on the decoded rows only, i.e. rows of positions >= len(prompt), as a decode
step's rows are the only ones computed by other kernels than the prefill's):
  ulp<p>   each bf16 GEMM output element nudged by +-1 bf16 ulp with probability p (3 seeds, mean/max over them);
  splitk   the fp32 accumulation redone as a sequential sum over 128-wide K chunks, then rounded to bf16;
  decode   no emulation: real CPU incremental decode (HF KV cache, M=1 GEMMs) vs the one-pass forward.
Each is scored against the unperturbed one-pass forward of the same condition on the same forced tokens (the bf16
condition's greedy continuation, 32 tokens); |Δ logprob| over forced tokens 1..31 (token 0 is predicted by a prompt
row). Attention itself (QK/softmax/PV) and the router are never perturbed.

    source scripts/env.sh
    flock /tmp/m3-heavy.lock python scripts/fp8_sensitivity.py --out benchmarks/results/2026-12-01-cpu-s14 \
        --lens 700,1500          # gpu_consistency.py's first two prompts; 3001 also works (~15 min/condition, 2 cores)
    python scripts/fp8_sensitivity.py --out DIR --render   # only rewrite DIR/fp8_sensitivity.md from its .json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from gpu_e2e import CKPT_SHAPE, prompt  # noqa: E402 -- the GPU consistency checks' checkpoint shape and prompts
FORCED, FP8, FP8_MAX = 32, torch.float8_e4m3fn, 448.0
S = types.SimpleNamespace(act=False, mode="none", p=0.0, gen=None, p0=10**9, offset=0, flips=[0, 0])


def fp8_block_weight(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> e4m3 with one amax/448 scale per 128x128 block, dequantized (fp32 math) back to w's dtype."""
    *b, n, k = w.shape
    wp = torch.nn.functional.pad(w.float(), (0, -k % 128, 0, -n % 128))
    blk = wp.reshape(*b, wp.shape[-2] // 128, 128, wp.shape[-1] // 128, 128)
    s = blk.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (blk / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s
    return q.reshape(wp.shape)[..., :n, :k].to(w.dtype)


def fp8_act(x: torch.Tensor) -> torch.Tensor:
    """[M, K] bf16 -> fp32 dequantized e4m3, per-token 1x128 groups (SGLang per_token_group_quant_fp8)."""
    m, k = x.shape
    g = torch.nn.functional.pad(x.float(), (0, -k % 128)).reshape(m, -1, 128)
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    return ((g / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s).reshape(m, -1)[:, :k]


def gemm(x: torch.Tensor, w: torch.Tensor, quant: bool, pos: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xf = fp8_act(x2) if (quant and S.act) else x2.float()
    wf = w.float()
    y = xf @ wf.t()
    sel = (pos >= S.p0).nonzero().flatten()
    if S.mode == "splitk" and len(sel):
        alt = torch.zeros(len(sel), wf.shape[0])
        for k in range(0, xf.shape[1], 128):
            alt += xf[sel, k:k + 128] @ wf[:, k:k + 128].t()
        S.flips[0] += int((alt.bfloat16() != y[sel].bfloat16()).sum())
        S.flips[1] += alt.numel()
        y[sel] = alt
    y = y.to(torch.bfloat16)
    if S.mode == "ulp" and len(sel):
        ys = y[sel]
        hit = (torch.rand(ys.shape, generator=S.gen) < S.p) & (ys != 0)
        step = torch.randint(0, 2, ys.shape, generator=S.gen, dtype=torch.int16) * 2 - 1
        y[sel] = (ys.view(torch.int16) + step * hit).view(torch.bfloat16)
        S.flips[0] += int(hit.sum())
        S.flips[1] += ys.numel()
    return y.reshape(*shape[:-1], -1)


def linear_forward(mod, x):
    return gemm(x, mod.weight, mod.quant, S.offset + torch.arange(x.shape[-2]))


def experts_forward(self, hidden_states, top_k_index, top_k_weights):  # HF MiniMaxM3VLExperts.forward, via gemm()
    final = torch.zeros_like(hidden_states)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        top_k_pos, token_idx = torch.where(mask[e])
        pos = S.offset + token_idx
        cur = self._apply_gate(gemm(hidden_states[token_idx], self.w13[e], True, pos))
        cur = gemm(cur, self.w2[e], True, pos) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, cur.to(final.dtype))
    return final


def build(ckpt: Path):
    from tests.hf_oracle import hf_model

    model = hf_model(ckpt, per_kv_group=True)
    model.to(torch.bfloat16)
    bf16, fp8 = {}, {}
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind == "MiniMaxM3VLTopKRouter":
            mod.float()  # router weight + bias fp32, as served
        elif kind == "Linear":
            mod.quant = name != "lm_head"
            mod.forward = types.MethodType(linear_forward, mod)
            bf16[name] = mod.weight.data.clone()
            fp8[name] = fp8_block_weight(bf16[name]) if mod.quant else bf16[name]
        elif kind == "MiniMaxM3VLExperts":
            mod.forward = types.MethodType(experts_forward, mod)
            for p in ("gate_up_proj", "down_proj"):
                bf16[f"{name}.{p}"] = getattr(mod, p).data.clone()
                fp8[f"{name}.{p}"] = fp8_block_weight(bf16[f"{name}.{p}"])
    mods = dict(model.named_modules())

    def set_weights(table):
        for key, w in table.items():
            if key in mods:
                mods[key].weight.data = w
            else:
                mod, p = key.rsplit(".", 1)
                setattr(mods[mod], "w13" if p == "gate_up_proj" else "w2", w)
    return model, {"bf16": lambda: set_weights(bf16), "fp8w": lambda: set_weights(fp8), "fp8wa": lambda: set_weights(fp8)}


@torch.no_grad()
def one_pass(model, ids, n_forced):
    """log p(ids[t]) for the last n_forced tokens from one forward over the whole sequence."""
    S.offset = 0
    lp = torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float(), -1)
    t = torch.arange(len(ids) - n_forced, len(ids))
    return lp[t - 1, torch.tensor(ids)[t]].tolist()


@torch.no_grad()
def decode(model, prompt_ids, forced, greedy=False):
    """Incremental decode through HF's cache: logprobs of `forced` (or greedy tokens when greedy=True)."""
    S.offset = 0
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    toks, lps = [], []
    for i in range(FORCED):
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        tok = int(lp.argmax()) if greedy else forced[i]
        toks.append(tok)
        lps.append(float(lp[tok]))
        if i + 1 < FORCED:
            S.offset = len(prompt_ids) + i
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return toks, lps


def stats(a, b):
    d = [abs(x - y) for x, y in zip(a[1:], b[1:])]  # forced tokens 1..31
    return {"mean": sum(d) / len(d), "max": max(d), "n": len(d)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lens", default="700,1500")
    ap.add_argument("--ckpt", default="/tmp/fp8_sensitivity/ckpt")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the --out folder's .json")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.out))
    torch.manual_seed(0)
    from sglang_m3.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(args.ckpt, flat=True, dtype="bfloat16", **CKPT_SHAPE)
    model, conds = build(ckpt)
    perts = [*[(f"ulp{p}", "ulp", p, seed) for p in (0.01, 0.05) for seed in (1, 2, 3)],
             ("splitk", "splitk", 0, 0), ("decode", "decode", 0, 0)]
    res = {"checkpoint": CKPT_SHAPE, "forced": FORCED, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "results": {}}
    lens, out = [int(x) for x in args.lens.split(",")], Path(args.out)
    res["prompt_lens"] = lens
    for i, n in enumerate(lens):
        ids = prompt(n, seed=10 + i)  # gpu_consistency.py's prompts
        conds["bf16"]()
        S.act, S.mode, S.p0 = False, "none", 10**9
        forced, _ = decode(model, ids, None, greedy=True)
        for cond, setw in conds.items():
            t0 = time.time()
            setw()
            S.act, S.mode, S.p0 = cond == "fp8wa", "none", 10**9
            ref = one_pass(model, ids + forced, FORCED)
            row = res["results"].setdefault(f"{cond}/{n}", {})
            for label, mode, p, seed in perts:
                S.mode, S.p, S.gen, S.p0, S.flips = mode, p, torch.Generator().manual_seed(seed), n, [0, 0]
                if mode == "decode":
                    S.mode = "none"
                    lp = decode(model, ids, forced)[1]
                else:
                    lp = one_pass(model, ids + forced, FORCED)
                st = stats(ref, lp)
                st["elem_frac"] = S.flips[0] / max(S.flips[1], 1)
                row.setdefault(label, []).append(st)
            out.mkdir(parents=True, exist_ok=True)  # written after every condition: a long run keeps what it did
            (out / "fp8_sensitivity.json").write_text(json.dumps(res, indent=1))
            print(f"{cond}/{n}: {time.time() - t0:.0f}s " + " ".join(
                f"{k}={sum(s['mean'] for s in v) / len(v):.4f}" for k, v in row.items()),
                flush=True)
    render(out)


def render(out: Path):
    """fp8_sensitivity.md from fp8_sensitivity.json: per prompt, and pooled over prompts (cond/all)."""
    res = json.loads((out / "fp8_sensitivity.json").read_text())
    pooled: dict = {}
    for key, row in res["results"].items():
        for k, v in row.items():
            pooled.setdefault(key.split("/")[0] + "/all", {}).setdefault(k, []).extend(v)
    table = {key: {k: {"mean": sum(s["mean"] for s in v) / len(v), "max": max(s["max"] for s in v),
                       "elem_frac": sum(s["elem_frac"] for s in v) / len(v)} for k, v in row.items()}
             for key, row in {**res["results"], **pooled}.items()}
    labels = list(next(iter(table.values())))
    md = ["# fp8 sensitivity (scripts/fp8_sensitivity.py): mean / max |Δ logprob| over forced tokens 1..31 "
          "(ratio of mean to bf16's)", "", "| condition/prompt | " + " | ".join(labels) + " |",
          "|---|" + "---|" * len(labels)]
    for key, row in table.items():
        base = table["bf16/" + key.split("/")[1]]
        md.append(f"| {key} | " + " | ".join(
            f"{row[l]['mean']:.4f} / {row[l]['max']:.3f} ({row[l]['mean'] / max(base[l]['mean'], 1e-9):.1f}x)"
            for l in labels) + " |")
    md += ["", "Fraction of decoded-row GEMM output elements changed (mean over conditions/prompts): " + ", ".join(
        f"{l} {table[c + '/all'][l]['elem_frac']:.5f} ({c})" for l in labels if l != "decode" for c in ("bf16", "fp8wa"))]
    (out / "fp8_sensitivity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
