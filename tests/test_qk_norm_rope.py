"""Fused per-head Gemma norm + partial NeoX RoPE (sglang_m3/layers/qk_norm_rope*.py).

- The torch twin against a float64 oracle written here from M3_SPEC §2.2/§2.4 (norm over each head, (1 + w), then
  rotate pairs (i, i + R/2) for i < R/2 with the cache's cos/sin, channels ≥ R untouched), on a row laid out like a
  sparse layer's fused projection [q | k | v | index_q | index_k]: v must come back bit-identical. fp32 vs float64:
  atol 2e-5 on O(1) values.
- The Triton kernel under TRITON_INTERPRET=1 (a subprocess: the variable must be set before triton is imported)
  against the twin: fp32 within 2e-5 (different summation order), bf16 within one bf16 ulp of the twin's output
  (2^-7 · |value| + 1e-6: fp32 results a hair apart may round to neighbouring bf16 values); 4 groups and 2 groups, head dims 32 and 128, rows with a stride wider than the
  projection (a view into a larger buffer).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and "--worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sglang_m3.layers.qk_norm_rope import qk_norm_rope_torch  # noqa: E402

if __name__ != "__main__":  # (the interpreter worker needs no SGLang set-up)
    from tests.test_layers import sglang_env  # noqa: F401,E402  (fixture: published ServerArgs, for SGLang's layers)

EPS = 1e-6


def make_case(T: int, d: int, r: int, heads=(4, 2, 2, 2, 1), seed: int = 0, dtype=torch.float32):
    """A fused row [q | k | v | index_q | index_k] (head counts `heads`), positions, an fp32 cos/sin cache built
    here from θ = 5e6, and the four norm weights; returns (y, positions, cache, groups)."""
    g = torch.Generator().manual_seed(seed)
    hq, hk, hv, hiq, hik = heads
    head_scale = (torch.rand(sum(heads), generator=g) * 4 + 0.1).repeat_interleave(d)  # heads of unlike size
    y = (torch.randn(T, sum(heads) * d, generator=g) * torch.rand(T, 1, generator=g) * 3 * head_scale).to(dtype)
    positions = torch.randint(0, 4096, (T,), generator=g)
    inv = 5e6 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(4096, dtype=torch.float64)[:, None] * inv[None]
    cache = torch.cat([ang.cos(), ang.sin()], dim=-1).float()
    w = [torch.randn(d, generator=g) * 0.5 for _ in range(4)]
    starts = [0, hq * d, (hq + hk + hv) * d, (hq + hk + hv + hiq) * d]
    groups = [(starts[0], hq, w[0]), (starts[1], hk, w[1]), (starts[2], hiq, w[2]), (starts[3], hik, w[3])]
    return y, positions, cache, groups


def rotate(z, cs, r):
    """§2.4 partial NeoX RoPE of float64 head vectors z [T, D] with cos/sin rows cs [T, r] (cos | sin)."""
    half = r // 2
    o = z.clone()
    for i in range(half):
        c, s = cs[:, i], cs[:, half + i]
        o[:, i] = z[:, i] * c - z[:, i + half] * s
        o[:, i + half] = z[:, i + half] * c + z[:, i] * s
    return o


def oracle(y, positions, cache, groups, r):
    """float64, head by head, pair by pair (§2.2 per-head Gemma norm, then §2.4)."""
    out = y.double().clone()
    cs = cache.double()[positions]
    for start, heads, w in groups:
        d = w.numel()
        for h in range(heads):
            cols = slice(start + h * d, start + (h + 1) * d)
            z = y[:, cols].double()
            out[:, cols] = rotate(z / torch.sqrt((z * z).mean(-1, keepdim=True) + EPS) * (1.0 + w.double()), cs, r)
    return out


@pytest.mark.parametrize("d,r", [(32, 16), (128, 64)])
def test_twin_against_float64_oracle(d, r):
    y, pos, cache, groups = make_case(7, d, r, seed=d)
    want = oracle(y, pos, cache, groups, r)
    got = y.clone()
    qk_norm_rope_torch(got, pos, cache, groups, r, EPS)
    err = (got.double() - want).abs()
    assert float(err.max()) < 2e-5, float(err.max())
    v = slice(6 * d, 8 * d)  # v (2 heads after q's 4 and k's 2) is not a group: untouched, bit for bit
    assert torch.equal(got[:, v], y[:, v])
    # it can fail: the index-key weight used for the key heads, or rope before norm, is far outside 2e-5
    swapped = y.clone()
    qk_norm_rope_torch(swapped, pos, cache, [groups[0], (groups[1][0], 2, groups[3][2]), *groups[2:]], r, EPS)
    assert float((swapped.double() - want).abs().max()) > 0.05
    # per_layer (M2-style: one RMS over all of a group's heads) instead of per_head is far too
    start, heads, w = groups[0]
    q = y[:, start:start + heads * d].double()
    q = q / torch.sqrt((q * q).mean(-1, keepdim=True) + EPS) * (1.0 + w.double()).repeat(heads)
    cs = cache.double()[pos]
    per_layer = torch.cat([rotate(q[:, h * d:(h + 1) * d], cs, r) for h in range(heads)], dim=-1)
    assert float((per_layer - want[:, start:start + heads * d]).abs().max()) > 0.05


def test_twin_refuses_bad_groups():
    y, pos, cache, groups = make_case(3, 32, 16)
    with pytest.raises(ValueError, match="share the head dim"):
        qk_norm_rope_torch(y, pos, cache, [groups[0], (0, 1, torch.zeros(16))], 16, EPS)
    with pytest.raises(ValueError, match="exceeds the row width"):
        qk_norm_rope_torch(y, pos, cache, [(y.shape[1] - 32, 2, groups[0][2])], 16, EPS)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope_torch(y, pos[:2], cache, groups, 16, EPS)


# ------------------------------------------------------------------------------------------------ Triton (interpreted)

def _worker() -> None:
    from sglang_m3.layers import qk_norm_rope_triton

    results = {}
    for d, r in ((32, 16), (128, 64)):
        for dtype in (torch.float32, torch.bfloat16):
            for n_groups in (4, 2):
                y, pos, cache, groups = make_case(5, d, r, seed=d + n_groups, dtype=dtype)
                groups = groups[:n_groups]
                # rows inside a wider buffer (a view with row stride > width), as a split of a larger output
                wide = torch.zeros(y.shape[0], y.shape[1] + 3 * d, dtype=dtype)
                wide[:, d:d + y.shape[1]] = y
                view = wide[:, d:d + y.shape[1]]
                qk_norm_rope_triton.launch(view, pos, cache, groups, d, r, EPS)
                twin = y.clone()
                qk_norm_rope_torch(twin, pos, cache, groups, r, EPS)
                err = (view.double() - twin.double()).abs()
                bound = (2.0 ** -7 * twin.double().abs() + 1e-6) if dtype == torch.bfloat16 else 2e-5
                outside = bool(torch.equal(wide[:, :d], torch.zeros_like(wide[:, :d]))
                               and torch.equal(wide[:, d + y.shape[1]:], torch.zeros_like(wide[:, d + y.shape[1]:])))
                results[f"d{d}_{str(dtype)[6:]}_{n_groups}g"] = {
                    "max_err": float(err.max()), "ok": bool((err <= bound).all()), "outside_untouched": outside,
                    "changed": float((view.double() - y.double()).abs().max())}
    print("@@RESULT@@" + json.dumps(results), flush=True)


def test_triton_kernel_interpreted():
    from tests.conftest import interpreted_worker  # not at module level: the worker runs this file as a script

    results = interpreted_worker(__file__, "--worker", timeout=600)
    print(results)
    assert len(results) == 8
    for name, r in results.items():
        assert r["ok"] and r["outside_untouched"], (name, r)
        assert r["changed"] > 0.1, (name, r)  # the kernel did write (a no-op would equal y, not the twin)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
def test_kernel_on_gpu_real_dims(sglang_env):  # noqa: F811
    """On the GPU at the release's per-rank TP1 shapes (64 q, 4 k, 4 v, 4 index q, 1 index k heads of 128, RoPE on
    64 channels), bf16, positions up to 128K: the kernel within one bf16 ulp of the twin (the twin on the same GPU
    data), and within 2^-6 of each head's largest magnitude (a few bf16 ulps of it: the rotation mixes a head's
    channels, so errors scale with the head, not the element) of the path it replaces, SGLang's GemmaRMSNorm then its
    RoPE on the cos/sin cache, each rounding to bf16 (the unfused path rounds twice; SGLang's CUDA RoPE computes in
    fp32, so ~2^-8 is expected; even its CPU RoPE, which computes in bf16, stays inside: 0.0143 measured there)."""
    from sglang.srt.layers.layernorm import GemmaRMSNorm
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang_m3.layers.qk_norm_rope import qk_norm_rope_

    torch.manual_seed(0)
    d, r, T = 128, 64, 300
    heads = (64, 4, 4, 4, 1)
    y, _, _, groups = make_case(T, d, r, heads=heads, seed=1, dtype=torch.bfloat16)
    y = y.cuda()
    groups = [(s, h, w.cuda().to(torch.bfloat16)) for s, h, w in groups]
    pos = torch.randint(0, 1 << 17, (T,), device="cuda")
    rope = get_rope(d, rotary_dim=r, max_position=1 << 17, base=5e6, is_neox_style=True).cuda()
    got, twin = y.clone(), y.clone()
    qk_norm_rope_(got, pos, rope.cos_sin_cache, groups, r, EPS)
    qk_norm_rope_torch(twin, pos, rope.cos_sin_cache, groups, r, EPS)
    assert bool(((got.double() - twin.double()).abs() <= 2.0 ** -7 * twin.double().abs() + 1e-6).all())

    # the unfused path: per group GemmaRMSNorm (SGLang's CUDA kernel), then SGLang's rope on (q-like, k-like) pairs
    ref = y.clone()
    normed = []
    for s, h, w in groups:
        norm = GemmaRMSNorm(d, eps=EPS).cuda().to(torch.bfloat16)
        norm.weight.data.copy_(w)
        normed.append(norm(ref[:, s:s + h * d].reshape(-1, d)).reshape(T, -1))
    q, k = rope(pos, normed[0].clone(), normed[1].clone())
    iq, ik = rope(pos, normed[2].clone(), normed[3].clone())
    for (s, h, _), z in zip(groups, (q, k, iq, ik)):
        ref[:, s:s + h * d] = z
    err = (got.double() - ref.double()).abs().view(T, -1, d)
    scale = ref.double().abs().view(T, -1, d).amax(-1, keepdim=True)  # per head: rotation mixes its channels
    assert bool((err <= 2.0 ** -6 * scale).all()), f"max err / head max {float((err / scale).max()):.3e}"
    v = slice((64 + 4) * d, (64 + 8) * d)
    assert torch.equal(got[:, v], y[:, v])
