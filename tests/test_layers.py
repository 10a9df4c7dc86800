"""Layer tests: every M3 operator of M3_SPEC.md §2 against an independent torch formula written here.

The oracles below are spelled out from the spec in float64 and share no code with the module under test
(no sglang_m3 helper is called to build an expected value). The layers run in float32 on CPU through the
same SGLang classes the model uses (GemmaRMSNorm, get_rope, MergedColumnParallelLinear, FusedMoE, ...),
with weights put in place through the same weight loaders the checkpoint loader uses.

Tolerances (fp32 layer vs float64 oracle; each `_close` call states its own):
- elementwise ops (norms, swigluoai):          rtol 1e-5, atol 1e-6 (swigluoai atol 1e-12: tiny outputs matter)
- RoPE:                                        atol 1e-6 at positions < 20; 1e-5 + 4e-8·pos·max|z| elsewhere
                                               (fp32 cos/sin cache, see test_partial_neox_rope)
- small matmul chains (MLP, experts, MoE):      rtol 1e-5, atol 1e-5
- routing weights:                              rtol 1e-6, atol 1e-7; selections compared exactly
Each test also shows that a plausible wrong formula lands far outside these tolerances, so it can fail.

SGLang's CPU paths need the CPU `sgl_kernel` stand-in first on sys.path and the env below *before* sglang is
imported; building parallel layers needs a published ServerArgs and a single-process (gloo, world size 1)
distributed / model-parallel init, done once by the module-scoped `sglang_env` fixture.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and "--fused-moe-worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"  # (--fused-moe-worker-cuda: the same check on a GPU, compiled)

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# SGLang's CPU engine and the sgl_kernel stand-in, on CPU-only machines only: on a GPU host the stand-in would
# shadow the real sgl_kernel for every test module imported after this one.
_SHIM = str(REPO / "cpu_shim")
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    if _SHIM in sys.path:
        sys.path.remove(_SHIM)
    sys.path.insert(0, _SHIM)
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import torch  # noqa: E402

from sglang_m3.config import m3_text_view  # noqa: E402
from sglang_m3.tiny import build_text_config  # noqa: E402

EPS = 1e-6
ALPHA, LIMIT = 1.702, 7.0  # swiglu_alpha, swiglu_limit of the release (M3_SPEC §1.1)
MAX_ERR: dict[str, float] = {}  # observed max abs errors, printed at the end of the module (pytest -s)


# ------------------------------------------------------------------------------------------------ setup

@pytest.fixture(scope="module")
def sglang_env(tmp_path_factory):
    """Published ServerArgs + single-process gloo distributed and model-parallel groups (world size 1)."""
    import torch.distributed as dist
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy", device="cpu"), role="test")
    created_world = created_mp = False
    if not dist.is_initialized():
        init_file = tmp_path_factory.mktemp("dist") / "init"
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method=f"file://{init_file}")
        created_world = True
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        created_mp = True
    yield
    if MAX_ERR:
        print("\nobserved max abs errors:\n" + "\n".join(f"  {k:<48} {v:.3e}" for k, v in MAX_ERR.items()))
    if created_mp:
        ps.destroy_model_parallel()
    if created_world:
        ps.destroy_distributed_environment()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _close(label: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float) -> None:
    """assert |got - want| <= atol + rtol*|want| elementwise (want in float64); record the max abs error."""
    assert got.shape == want.shape, (label, got.shape, want.shape)
    assert got.dtype == torch.float32, (label, got.dtype)
    got = got.detach()
    err = (got.double() - want).abs()
    MAX_ERR[label] = max(MAX_ERR.get(label, 0.0), float(err.max()))
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (f"{label}: {int(bad.sum())}/{bad.numel()} elements out of tolerance "
                                 f"(rtol={rtol}, atol={atol}); max abs err {float(err.max()):.3e}")


def _far(label: str, a: torch.Tensor, b: torch.Tensor, min_diff: float) -> None:
    """A wrong formula must be clearly distinguishable from the right one on the same data."""
    diff = float((a.double() - b.double()).abs().max())
    assert diff > min_diff, f"{label}: the wrong formula is only {diff:.3e} away; the test could not fail"


def _load(param: torch.nn.Parameter, tensor: torch.Tensor, *args, **kwargs) -> None:
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    getattr(param, "weight_loader", default_weight_loader)(param, tensor.float(), *args, **kwargs)


# ------------------------------------------------------------------------------------------------ oracles (spec §2)

def ref_gemma_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """§2.2: x * rsqrt(mean(x²) + eps) * (1 + w), float64, over the last dim."""
    x, w = x.double(), w.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + w)


def ref_swigluoai(g: torch.Tensor, u: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT,
                  beta: float = 1.0) -> torch.Tensor:
    """§2.5: gate upper-clamped only, up clamped both sides, (u + beta), float64."""
    g, u = g.double(), u.double()
    g = torch.where(g > limit, torch.full_like(g, limit), g)
    u = torch.where(u > limit, torch.full_like(u, limit), torch.where(u < -limit, torch.full_like(u, -limit), u))
    return g / (1.0 + torch.exp(-alpha * g)) * (u + beta)


def ref_mlp(x, w_gate, w_up, w_down, **kw) -> torch.Tensor:
    """§2.6: down(swigluoai(gate x, up x)), float64, separate matrices (no fused layout involved)."""
    x = x.double()
    return ref_swigluoai(x @ w_gate.double().T, x @ w_up.double().T, **kw) @ w_down.double().T


def ref_rope_neox(z: torch.Tensor, pos: torch.Tensor, head_dim: int, rotary_dim: int, theta: float,
                  interleaved: bool = False, freq_exponent: float = 2.0) -> torch.Tensor:
    """§2.4 partial RoPE on [T, heads*head_dim], float64, explicit per-pair loop.

    NeoX (rotate-half) pairs channel i with i + r/2; `interleaved=True` is the GPT-J convention (2i, 2i+1),
    used only to show that the test tells the two apart.
    """
    T = z.shape[0]
    z = z.double().reshape(T, -1, head_dim)
    out = z.clone()
    half = rotary_dim // 2
    for i in range(half):
        inv_freq = theta ** (-freq_exponent * i / rotary_dim)
        a = pos.double() * inv_freq  # [T]
        c, s = torch.cos(a)[:, None], torch.sin(a)[:, None]
        lo, hi = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        out[:, :, lo] = z[:, :, lo] * c - z[:, :, hi] * s
        out[:, :, hi] = z[:, :, hi] * c + z[:, :, lo] * s
    return out.reshape(T, -1)


def ref_route(logits: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§2.7 routing, float64 → (dense weights [T, E], chosen [T, E] bool). Selection by sorting s + b."""
    s = 1.0 / (1.0 + torch.exp(-logits.double()))
    T, E = s.shape
    dense = torch.zeros(T, E, dtype=torch.float64)
    chosen = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        order = sorted(range(E), key=lambda e: -(float(s[t, e]) + float(bias[e])))[:k]
        total = sum(float(s[t, e]) for e in order)
        for e in order:
            dense[t, e] = float(s[t, e]) / total
            chosen[t, e] = True
    return dense, chosen


def _route_margin(logits: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the float64 gap between the k-th and (k+1)-th selection scores sigmoid(logit) + bias: how far
    the top-k is from a tie (an fp32 implementation may legitimately break a tie of ~1e-7 either way)."""
    s = torch.sort(1.0 / (1.0 + torch.exp(-logits.double())) + bias.double(), dim=-1, descending=True).values
    return s[:, k - 1] - s[:, k]


def ref_moe(x, gate_w, bias, w1, w3, w2, sh_gate, sh_up, sh_down, k, rsf) -> torch.Tensor:
    """§2.7: rsf · Σ_j ŵ_j E_j(x) + S(x), per token, float64, expert matrices kept separate."""
    x = x.double()
    dense, chosen = ref_route(x @ gate_w.double().T, bias, k)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in chosen[t].nonzero().flatten().tolist():
            out[t] += rsf * dense[t, e] * ref_mlp(x[t:t + 1], w1[e], w3[e], w2[e])[0]
    return out + ref_mlp(x, sh_gate, sh_up, sh_down)


# ------------------------------------------------------------------------------------------------ Gemma RMSNorm

def _norm_input(T: int, D: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitude, one so small that eps (inside the sqrt) matters."""
    x = _randn(T, D, seed=seed)
    scales = torch.tensor([1.0, 1e3, 1e-3, 0.5, 7.0, 1e-4, 30.0][:T], dtype=torch.float64)
    return x * scales[:, None]


@pytest.mark.parametrize("cls", ["sglang", "precompiled"])
def test_gemma_rmsnorm_plain_and_fused_residual(sglang_env, cls):
    """SGLang's GemmaRMSNorm and the model's subclass (layers/norm.py: CUDA kernels differ, this CPU path is
    SGLang's) against the §2.2 formula."""
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    from sglang_m3.layers.norm import PrecompiledGemmaRMSNorm

    D = 64
    w = _randn(D, seed=1, scale=0.5)  # checkpoint offset form (init 0); clearly nonzero
    norm = (GemmaRMSNorm if cls == "sglang" else PrecompiledGemmaRMSNorm)(D, eps=EPS)
    _load(norm.weight, w)
    x = _norm_input(7, D, seed=2)
    want = ref_gemma_rmsnorm(x, w)

    got = norm(x.float())
    _close("GemmaRMSNorm plain", got, want, rtol=1e-5, atol=1e-6)
    _far("GemmaRMSNorm: plain RMSNorm weight w instead of 1+w", ref_gemma_rmsnorm(x, w - 1.0), want, 0.1)
    _far("GemmaRMSNorm: eps outside the sqrt", x / (x.pow(2).mean(-1, keepdim=True).sqrt() + EPS) * (1 + w), want, 0.1)

    # fused form: s = x + residual; residual' = s; y = norm(s)
    r = _norm_input(7, D, seed=3).flip(0)
    s = x + r
    got_y, got_res = norm(x.float(), r.float())
    _close("GemmaRMSNorm fused: y", got_y, ref_gemma_rmsnorm(s, w), rtol=1e-5, atol=1e-6)
    assert torch.equal(got_res, x.float() + r.float()), "residual' must be x + residual (fp32 add)"
    _far("GemmaRMSNorm fused: norm of x instead of x+residual", ref_gemma_rmsnorm(x, w), ref_gemma_rmsnorm(s, w), 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
@pytest.mark.parametrize("D", [6144, 128])
def test_precompiled_gemma_rmsnorm_on_gpu(sglang_env, monkeypatch, D):
    """On CUDA, bf16 at M3's hidden and head sizes: the subclass (sgl_kernel's precompiled kernels) against the §2.2
    formula in float64 on the same bf16 data and bf16 weight, within 2^-7 · |y| + 1e-5 (one bf16 rounding of y; the
    fused form's residual' = x + residual within one bf16 rounding, the oracle normalising that rounded sum), plain
    and with the fused residual add, with flashinfer's norm module made to raise (the point of the subclass).
    SGLang's GemmaRMSNorm (flashinfer's JIT kernel) lands within the same bound."""
    import flashinfer.norm
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    from sglang_m3.layers.norm import PrecompiledGemmaRMSNorm

    w = _randn(D, seed=11, scale=0.5)
    x = (_randn(300, D, seed=12) * torch.logspace(-3, 2, 300, dtype=torch.float64)[:, None]).bfloat16().cuda()
    r = _randn(300, D, seed=13).bfloat16().cuda()
    s = (x.double() + r.double()).bfloat16()  # the residual add, rounded to bf16 as stored

    def check(norm):
        w_bf16 = norm.weight.detach().double().cpu()  # the model-dtype weight the kernel reads
        y = norm(x.clone())
        want = ref_gemma_rmsnorm(x.double().cpu(), w_bf16)
        assert bool(((y.double().cpu() - want).abs() <= 2.0 ** -7 * want.abs() + 1e-5).all())
        y2, res = norm(x.clone(), r.clone())
        assert bool(((res.double() - s.double()).abs() <= 2.0 ** -8 * s.double().abs()).all())
        want2 = ref_gemma_rmsnorm(s.double().cpu(), w_bf16)
        assert bool(((y2.double().cpu() - want2).abs() <= 2.0 ** -7 * want2.abs() + 1e-5).all())

    sglang_norm = GemmaRMSNorm(D, eps=EPS).cuda().to(torch.bfloat16)  # model-dtype weights, as served
    _load(sglang_norm.weight, w)
    check(sglang_norm)
    ours = PrecompiledGemmaRMSNorm(D, eps=EPS).cuda().to(torch.bfloat16)
    _load(ours.weight, w)

    def no_flashinfer(*args, **kwargs):
        raise AssertionError("flashinfer's norm module was called")

    monkeypatch.setattr(flashinfer.norm, "gemma_rmsnorm", no_flashinfer)
    monkeypatch.setattr(flashinfer.norm, "gemma_fused_add_rmsnorm", no_flashinfer)
    check(ours)


# ------------------------------------------------------------------------------------------------ RoPE

def test_partial_neox_rope(sglang_env):
    from sglang.srt.layers.rotary_embedding import get_rope

    head_dim, rotary_dim, theta, max_pos = 32, 16, 5e6, 4096
    rope = get_rope(head_dim, rotary_dim=rotary_dim, max_position=max_pos, base=theta, is_neox_style=True)
    pos = torch.tensor([0, 1, 2, 17, 1000, 1023, 2049, 3333, 4095, 5, 4094, 777])  # arbitrary, unsorted
    T, HQ, HK = pos.numel(), 4, 2
    q = _randn(T, HQ * head_dim, seed=6)
    k = _randn(T, HK * head_dim, seed=7)

    got_q, got_k = rope(pos, q.float().clone(), k.float().clone())
    want_q = ref_rope_neox(q, pos, head_dim, rotary_dim, theta)
    want_k = ref_rope_neox(k, pos, head_dim, rotary_dim, theta)
    # The cos/sin cache is fp32 (spec §2.4): inv_freq (≤ 1 ulp off) times pos, rounded to fp32, gives an angle
    # error ≤ ~1.5e-7 · angle; angles of the non-trivial frequencies are ≤ theta^(-2/r)·pos ≈ 0.145·pos, so
    # |Δangle| ≤ ~2.2e-8 rad per unit position (i=0 is exact). Allowed: 1e-5 + 4e-8 · pos · max|z|
    # (≈ 6e-4 at pos 4095); positions < 20 are checked at atol 1e-6 below.
    atol = (1e-5 + 4e-8 * pos.double() * torch.cat([q, k], -1).abs().max())[:, None]
    for name, got, want in (("q", got_q, want_q), ("k", got_k, want_k)):
        err = (got.double() - want).abs()
        MAX_ERR[f"RoPE {name}"] = float(err.max())
        assert bool((err <= atol).all()), f"RoPE {name}: max abs err {float(err.max()):.3e}"
        # channels >= rotary_dim pass through bit-exactly
        g3, z3 = got.reshape(T, -1, head_dim), (q if name == "q" else k).float().reshape(T, -1, head_dim)
        assert torch.equal(g3[..., rotary_dim:], z3[..., rotary_dim:]), f"RoPE {name}: pass-through channels changed"

    # position 0 is the identity; a tight check at small positions where the angle error is ~1e-7
    assert torch.equal(got_q[0], q[0].float())
    small = pos < 20
    _close("RoPE q (positions < 20)", got_q[small], want_q[small], rtol=0, atol=1e-6)

    # wrong conventions would fail by O(1)
    _far("RoPE: GPT-J interleaved pairs", ref_rope_neox(q, pos, head_dim, rotary_dim, theta, interleaved=True),
         want_q, 0.5)
    _far("RoPE: rotating all head_dim channels", ref_rope_neox(q, pos, head_dim, head_dim, theta), want_q, 0.5)
    _far("RoPE: theta 1e4", ref_rope_neox(q, pos, head_dim, rotary_dim, 1e4), want_q, 0.5)
    _far("RoPE: inv_freq theta^(-i/r)", ref_rope_neox(q, pos, head_dim, rotary_dim, theta, freq_exponent=1.0),
         want_q, 0.5)
    _far("RoPE: opposite rotation", ref_rope_neox(q, -pos, head_dim, rotary_dim, theta), want_q, 0.5)


class _CaptureAttention(torch.nn.Module):
    """Stands in for RadixAttention: records what the layer hands to the backend, returns a fixed output."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.seen = out, {}

    def forward(self, q, k, v, forward_batch, **extra):
        self.seen = {"q": q, "k": k, "v": v, **extra}
        return self.out


@pytest.mark.parametrize("layer_id", [0, 1], ids=["dense", "sparse"])
def test_m3attention_qk_norm_then_rope(sglang_env, layer_id):
    """§2.4/§3.1 as M3Attention wires it: projections → per-head Gemma norm → partial NeoX RoPE (norm before
    rope), v untouched; on sparse layers also the index query/key branch. Weights through the loaders."""
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang_m3.model import M3Attention

    view = m3_text_view(build_text_config(max_position_embeddings=4096))
    Hd, D, HQ, HK, r = view.hidden_size, view.head_dim, view.num_heads, view.num_kv_heads, view.rotary_dim
    attn = M3Attention(view, layer_id, prefix=f"model.layers.{layer_id}.self_attn")
    assert attn.rotary_emb is get_rope(D, rotary_dim=r, max_position=4096, base=5e6, is_neox_style=True)
    assert attn.is_sparse == bool(layer_id)

    w = {"q": _randn(HQ * D, Hd, seed=50, scale=0.1), "k": _randn(HK * D, Hd, seed=51, scale=0.1),
         "v": _randn(HK * D, Hd, seed=52, scale=0.1), "o": _randn(Hd, HQ * D, seed=53, scale=0.1),
         "qn": _randn(D, seed=54, scale=0.5), "kn": _randn(D, seed=55, scale=0.5)}
    for shard in "qkv":
        _load(attn.qkv_proj.weight, w[shard], shard)
    _load(attn.o_proj.weight, w["o"])
    _load(attn.q_norm.weight, w["qn"])
    _load(attn.k_norm.weight, w["kn"])
    if attn.is_sparse:
        Di, NI = view.sparse.index_dim, view.sparse.num_index_heads
        w |= {"iq": _randn(NI * Di, Hd, seed=56, scale=0.1), "ik": _randn(Di, Hd, seed=57, scale=0.1),
              "iqn": _randn(Di, seed=58, scale=0.5), "ikn": _randn(Di, seed=59, scale=0.5)}
        _load(attn.qkv_proj.weight, w["iq"], "index_q")  # sparse layers: one q/k/v/index projection
        _load(attn.qkv_proj.weight, w["ik"], "index_k")
        _load(attn.index_q_norm.weight, w["iqn"])
        _load(attn.index_k_norm.weight, w["ikn"])

    pos = torch.tensor([0, 3, 1500, 4000, 9, 2222])
    T = pos.numel()
    x = _randn(T, Hd, seed=60)
    o = _randn(T, HQ * D, seed=61)
    attn.attn = _CaptureAttention(o.float())
    with torch.no_grad():
        out = attn(pos, x.float(), None)
    seen = attn.attn.seen

    def normed_roped(proj, norm_w, heads, dim):
        z = (x @ proj.T).reshape(T, heads, dim)
        z = torch.stack([ref_gemma_rmsnorm(z[:, h], norm_w) for h in range(heads)], dim=1).reshape(T, -1)
        return ref_rope_neox(z, pos, dim, r, view.rope_theta)

    expected = {"q": normed_roped(w["q"], w["qn"], HQ, D), "k": normed_roped(w["k"], w["kn"], HK, D),
                "v": x @ w["v"].T}
    if attn.is_sparse:
        expected["index_q"] = normed_roped(w["iq"], w["iqn"], NI, Di).reshape(T, NI, Di)
        expected["index_k"] = normed_roped(w["ik"], w["ikn"], 1, Di).reshape(T, Di)
    assert set(seen) == set(expected) | {"q", "k", "v"}
    for name, want in expected.items():
        got = seen[name].reshape(want.shape)
        err = (got.double() - want).abs()
        MAX_ERR[f"M3Attention {name}"] = max(MAX_ERR.get(f"M3Attention {name}", 0.0), float(err.max()))
        tol = 1e-5 + 4e-8 * pos.double() * want.abs().max()  # fp32 cos/sin cache, see the RoPE test
        tol = tol.reshape(-1, *([1] * (want.dim() - 1)))
        assert bool((err <= tol).all()), f"M3Attention {name}: max abs err {float(err.max()):.3e}"
    _close("M3Attention o_proj", out, o @ w["o"].T, rtol=1e-5, atol=1e-5)
    # rope before norm would be a different function (norm is not rotation-invariant on a partial rotation)
    q_lin = (x @ w["q"].T)
    rope_first = ref_rope_neox(q_lin, pos, D, r, view.rope_theta).reshape(T, HQ, D)
    rope_first = torch.stack([ref_gemma_rmsnorm(rope_first[:, h], w["qn"]) for h in range(HQ)], 1).reshape(T, -1)
    _far("M3Attention: rope before norm", rope_first, expected["q"], 1e-2)


@pytest.mark.parametrize("tp_size,kv_heads", [(2, 2), (4, 2), (8, 4)], ids=["tp2-kv2", "tp4-kv2", "tp8-kv4"])
def test_tp_rank_keeps_the_index_heads_of_its_kv_heads(sglang_env, tp_size, kv_heads):
    """§3.1 selects per KV group, so each TP rank must compute the index queries of exactly the KV heads that
    it holds — also when TP exceeds the KV heads and they are replicated (the release at TP8: 4 KV heads, each on
    2 ranks). Each rank is built under SGLang's parallel override; which KV head it holds is read back from the K
    rows its weight loader kept; its index queries are compared with the float64 §3.1 formula for those heads."""
    from sglang.srt.runtime_context import get_parallel
    from sglang_m3.model import M3Attention

    view = m3_text_view(build_text_config(num_attention_heads=16, num_key_value_heads=kv_heads))
    Hd, D, Di, r = view.hidden_size, view.head_dim, view.sparse.index_dim, view.rotary_dim
    w_k = _randn(kv_heads * D, Hd, seed=80, scale=0.1)
    w_iq = _randn(kv_heads * Di, Hd, seed=81, scale=0.1)
    x, pos = _randn(5, Hd, seed=82), torch.tensor([0, 1, 2, 300, 301])
    # all index heads (norm weights 0: Gemma's 1 + w = 1), float64
    z = (x @ w_iq.T).reshape(5, kv_heads, Di)
    z = torch.stack([ref_gemma_rmsnorm(z[:, h], torch.zeros(Di)) for h in range(kv_heads)], dim=1).reshape(5, -1)
    full_index_q = ref_rope_neox(z, pos, Di, r, view.rope_theta).reshape(5, kv_heads, Di)
    for rank in range(tp_size):
        with get_parallel().override(tp_size=tp_size, tp_rank=rank):
            attn = M3Attention(view, 1, prefix="model.layers.1.self_attn")
            _load(attn.qkv_proj.weight, w_k, "k")
            _load(attn.qkv_proj.weight, w_iq, "index_q")
            for norm in (attn.index_q_norm, attn.index_k_norm):
                norm.weight.data.zero_()
            local_k = attn.qkv_proj.weight.data[attn.num_heads * D:(attn.num_heads + attn.num_kv_heads) * D]
            held = [h for h in range(kv_heads) for j in range(attn.num_kv_heads)
                    if torch.equal(local_k[j * D:(j + 1) * D], w_k[h * D:(h + 1) * D].float())]
            assert len(held) == attn.num_kv_heads == max(1, kv_heads // tp_size), (rank, held)
            attn.attn = _CaptureAttention(torch.zeros(5, attn.num_heads * D))
            with torch.no_grad():
                attn(pos, x.float(), None)
            # (fp32 projection + norm + rope vs float64; a wrong head is off by O(1))
            _close(f"TP{tp_size} rank {rank}: index queries of KV heads {held}", attn.attn.seen["index_q"],
                   full_index_q[:, held], rtol=1e-5, atol=2e-5)
            others = [h for h in range(kv_heads) if h not in held]
            if others:
                _far(f"TP{tp_size} rank {rank}: another KV head's index queries", full_index_q[:, others[:1]],
                     full_index_q[:, held[:1]], 0.1)


# ------------------------------------------------------------------------------------------------ swigluoai

def test_swigluoai_clamps(sglang_env):
    from sglang_m3.layers.swiglu import swigluoai

    gates = torch.tensor([-30.0, -10.0, -8.0, -7.5, -7.0, -1.0, -0.3, 0.0, 0.5, 3.0, 6.9, 7.0, 7.5, 10.0, 100.0],
                         dtype=torch.float64)
    ups = torch.tensor([-100.0, -8.0, -7.0, -1.5, -1.0, 0.0, 0.7, 6.99, 7.0, 7.01, 50.0], dtype=torch.float64)
    g, u = torch.meshgrid(gates, ups, indexing="ij")
    g, u = g.reshape(-1), u.reshape(-1)
    # layout [gate | up] along the last dim (not interleaved)
    gate_up = torch.cat([g[None], u[None]], dim=-1).reshape(1, -1)  # [1, 2N]: N gates then N ups
    got = swigluoai(gate_up.float(), ALPHA, LIMIT)[0]
    want = ref_swigluoai(g, u)
    _close("swigluoai", got, want, rtol=1e-5, atol=1e-12)

    _far("swigluoai: gate also lower-clamped", ref_swigluoai(g.clamp(min=-LIMIT), u), want, 1e-5)
    _far("swigluoai: no clamp on up", g.clamp(max=LIMIT) * torch.sigmoid(ALPHA * g.clamp(max=LIMIT)) * (u + 1), want, 1.0)
    _far("swigluoai: beta 0", ref_swigluoai(g, u, beta=0.0), want, 1.0)
    _far("swigluoai: alpha 1", ref_swigluoai(g, u, alpha=1.0), want, 0.1)
    # relative error at the large-negative-gate entries is what shows the missing lower clamp:
    neg = (g <= -8.0) & (u.abs() < 5) & (u != -1.0)  # u = -1 makes (u + 1) = 0
    rel = ((ref_swigluoai(g.clamp(min=-LIMIT), u) - want).abs() / want.abs().clamp_min(1e-300))[neg]
    assert float(rel.min()) > 1.0, "a lower gate clamp must change tiny negative-gate outputs by > 100 %"
    # interleaved layout (GPT-OSS) would read different halves
    inter = torch.stack([g, u], dim=-1).reshape(1, -1)
    _far("swigluoai: interleaved layout", swigluoai(inter.float(), ALPHA, LIMIT)[0], want, 1.0)


# ------------------------------------------------------------------------------------------------ dense MLP / shared expert

def test_swigluoai_mlp_through_fused_loader(sglang_env):
    from sglang_m3.layers.swiglu import SwiGLUOAIMLP

    Hd, I, T = 32, 24, 9
    w_gate, w_up = _randn(I, Hd, seed=8, scale=0.6), _randn(I, Hd, seed=9, scale=0.6)
    w_down = _randn(Hd, I, seed=10, scale=0.2)
    mlp = SwiGLUOAIMLP(Hd, I, ALPHA, LIMIT, prefix="model.layers.0.mlp")
    _load(mlp.gate_up_proj.weight, w_gate, 0)  # shard 0 = gate
    _load(mlp.gate_up_proj.weight, w_up, 1)  # shard 1 = up
    _load(mlp.down_proj.weight, w_down)
    x = _randn(T, Hd, seed=11, scale=1.5)
    g, u = x @ w_gate.T, x @ w_up.T
    assert bool((g > LIMIT).any() and (g < -LIMIT).any() and (u > LIMIT).any() and (u < -LIMIT).any()), \
        "inputs must hit every clamp"

    got = mlp(x.float())
    want = ref_mlp(x, w_gate, w_up, w_down)
    _close("SwiGLUOAIMLP", got, want, rtol=1e-5, atol=1e-5)
    _far("SwiGLUOAIMLP: gate/up swapped", ref_mlp(x, w_up, w_gate, w_down), want, 0.1)


# ------------------------------------------------------------------------------------------------ router

def test_route_bias_selects_but_does_not_weight(sglang_env):
    from sglang_m3.layers.moe import route

    # constructed row: without bias experts {0, 1} win; the bias pushes expert 7 in (and expert 1 out)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    weights, ids = route(logits, bias, 2)
    assert sorted(ids[0].tolist()) == [0, 7]
    s = 1.0 / (1.0 + torch.exp(-logits.double()[0]))
    want = {0: float(s[0] / (s[0] + s[7])), 7: float(s[7] / (s[0] + s[7]))}  # ≈ 0.980, 0.020
    got = {int(e): float(w) for e, w in zip(ids[0], weights[0])}
    for e in (0, 7):
        assert abs(got[e] - want[e]) <= 1e-6, (e, got[e], want[e])
    leaked = float((s[7] + 3.0) / (s[0] + s[7] + 3.0))  # ≈ 0.774 if the bias entered the weights
    assert abs(got[7] - leaked) > 0.5

    # random rows: E=16, k=4, a bias that changes the selection of many tokens
    T, E, k = 64, 16, 4
    logits = _randn(T, E, seed=12, scale=2.0).float()
    bias = _randn(E, seed=13, scale=0.5).float()
    weights, ids = route(logits, bias, k)
    assert weights.dtype == torch.float32 and ids.shape == (T, k)
    want_dense, want_chosen = ref_route(logits, bias.double(), k)
    got_chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
    # fp32 routing vs the float64 oracle: a token may only differ where its k-th and (k+1)-th scores s + b tie
    # within 1e-6 (none do on this data, which the margin check below makes explicit)
    margin = _route_margin(logits, bias, k)
    differ = (got_chosen != want_chosen).any(-1)
    assert bool((margin[differ] <= 1e-6).all()), "selection differs from top-k of sigmoid(logits) + bias"
    got_dense = torch.zeros(T, E, dtype=torch.float32).scatter_(1, ids, weights)
    _close("route weights", got_dense, want_dense, rtol=1e-6, atol=1e-7)
    _close("route weight sums", weights.sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-6)
    _, unbiased_chosen = ref_route(logits, torch.zeros(E, dtype=torch.float64), k)
    assert int((unbiased_chosen != want_chosen).any(-1).sum()) >= 10, "the bias must change many selections"


# ------------------------------------------------------------------------------------------------ routed experts

def test_routed_experts_torch_vs_token_loop(sglang_env):
    from sglang_m3.layers.moe import routed_experts_torch

    E, Hd, I, T, k = 6, 16, 12, 11, 2
    w1, w3 = _randn(E, I, Hd, seed=14, scale=0.7), _randn(E, I, Hd, seed=15, scale=0.7)
    w2 = _randn(E, Hd, I, seed=16, scale=0.3)
    x = _randn(T, Hd, seed=17, scale=1.5)
    gen = _gen(18)
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(T)])  # expert E-1 never chosen
    ids[:4, 0] = 2  # one expert taken by several tokens
    ids[:4, 1] = torch.tensor([0, 1, 3, 4])
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum(-1, keepdim=True)

    w13 = torch.cat([w1, w3], dim=1)  # documented layout: [E, 2I, H] = [gate rows ; up rows]
    got = routed_experts_torch(x.float(), w13.float(), w2.float(), weights.float(), ids, ALPHA, LIMIT)
    want = torch.zeros(T, Hd, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            want[t] += weights[t, j] * ref_mlp(x[t:t + 1], w1[e], w3[e], w2[e])[0]
    _close("routed_experts_torch", got, want, rtol=1e-5, atol=1e-5)
    # same data through the wrong stacking (up first) differs
    _far("routed experts: w1/w3 swapped", sum(weights[:, j:j + 1] * torch.stack(
        [ref_mlp(x[t:t + 1], w3[int(ids[t, j])], w1[int(ids[t, j])], w2[int(ids[t, j])])[0] for t in range(T)])
        for j in range(k)), want, 0.1)


# ------------------------------------------------------------------------------------------------ whole MoE block

MOE_DIMS = dict(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)


def _moe_weights(view, seed: int) -> dict[str, torch.Tensor]:
    Hd, E, I, Ish = view.hidden_size, view.num_experts, view.moe_intermediate_size, view.shared_intermediate_size
    return {
        "gate": _randn(E, Hd, seed=seed, scale=0.4),
        "bias": _randn(E, seed=seed + 1, scale=0.3),
        "w1": _randn(E, I, Hd, seed=seed + 2, scale=0.6),
        "w3": _randn(E, I, Hd, seed=seed + 3, scale=0.6),
        "w2": _randn(E, Hd, I, seed=seed + 4, scale=0.3),
        "sh_gate": _randn(Ish, Hd, seed=seed + 5, scale=0.6),
        "sh_up": _randn(Ish, Hd, seed=seed + 6, scale=0.6),
        "sh_down": _randn(Hd, Ish, seed=seed + 7, scale=0.3),
    }


def _build_moe(view, wts: dict[str, torch.Tensor], layer_id: int = 1):
    """M3MoE with weights put in place exactly as the checkpoint loader does (weight loaders, fp32 router)."""
    from sglang_m3.layers.moe import M3MoE

    moe = M3MoE(view, layer_id=layer_id, prefix=f"model.layers.{layer_id}.block_sparse_moe")
    assert moe.gate.weight.dtype == torch.float32 and moe.e_score_correction_bias.dtype == torch.float32
    _load(moe.gate.weight, wts["gate"])
    _load(moe.e_score_correction_bias, wts["bias"])
    w13, w2 = moe.experts.w13_weight, moe.experts.w2_weight
    for e in range(view.num_experts):
        w13.weight_loader(w13, wts["w1"][e].float(), "experts.w13_weight", shard_id="w1", expert_id=e)
        w13.weight_loader(w13, wts["w3"][e].float(), "experts.w13_weight", shard_id="w3", expert_id=e)
        w2.weight_loader(w2, wts["w2"][e].float(), "experts.w2_weight", shard_id="w2", expert_id=e)
    _load(moe.shared_experts.gate_up_proj.weight, wts["sh_gate"], 0)
    _load(moe.shared_experts.gate_up_proj.weight, wts["sh_up"], 1)
    _load(moe.shared_experts.down_proj.weight, wts["sh_down"])
    for module in moe.modules():  # what the model loader runs after load_weights
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    return moe


def _ref(view, wts, x, **over):
    w = {**wts, **over}
    return ref_moe(x, w["gate"], w["bias"], w["w1"], w["w3"], w["w2"], w["sh_gate"], w["sh_up"], w["sh_down"],
                   view.top_k, view.routed_scaling_factor)


@pytest.mark.parametrize("rsf", [2.0, 3.0])
def test_m3moe_block(sglang_env, rsf):
    view = m3_text_view(build_text_config(**MOE_DIMS, routed_scaling_factor=rsf))
    assert view.routed_scaling_factor == rsf and view.top_k == 2 and view.num_experts == 8
    wts = _moe_weights(view, seed=20)
    moe = _build_moe(view, wts)
    x = _randn(13, view.hidden_size, seed=30, scale=1.5)

    # the bias must matter for this data, or the test could not see it leak/vanish
    logits = x @ wts["gate"].T
    _, with_bias = ref_route(logits, wts["bias"], view.top_k)
    _, without = ref_route(logits, torch.zeros_like(wts["bias"]), view.top_k)
    assert bool((with_bias != without).any()), "bias changes no selection on this data"

    assert float(_route_margin(logits, wts["bias"], view.top_k).min()) > 1e-4  # no routing near-tie in the data
    with torch.no_grad():
        got = moe(x.float())
    want = _ref(view, wts, x)
    _close(f"M3MoE block (rsf={rsf})", got, want, rtol=1e-5, atol=1e-5)
    _far("M3MoE: selection without bias", _ref(view, wts, x, bias=torch.zeros_like(wts["bias"])), want, 1e-2)
    _far("M3MoE: bias in the weights", _biased_weight_moe(view, wts, x), want, 1e-2)


def _biased_weight_moe(view, wts, x):
    """The wrong variant: weights renormalised from sigmoid + bias (bias leaking into the weights)."""
    x = x.double()
    s = torch.sigmoid(x @ wts["gate"].T) + wts["bias"]
    _, chosen = ref_route(x @ wts["gate"].T, wts["bias"], view.top_k)
    dense = torch.where(chosen, s, torch.zeros_like(s))
    dense = dense / dense.sum(-1, keepdim=True)
    out = ref_mlp(x, wts["sh_gate"], wts["sh_up"], wts["sh_down"])
    for t in range(x.shape[0]):
        for e in chosen[t].nonzero().flatten().tolist():
            out[t] += view.routed_scaling_factor * dense[t, e] * ref_mlp(x[t:t + 1], wts["w1"][e], wts["w3"][e],
                                                                        wts["w2"][e])[0]
    return out


def test_m3moe_shared_expert_is_unscaled(sglang_env):
    """Zero the routed experts' down projections: the block must return exactly S(x), not rsf·S(x); zero the
    shared expert's down projection: the block must return rsf·Σŵ E(x)."""
    view = m3_text_view(build_text_config(**MOE_DIMS))
    assert view.routed_scaling_factor == 2.0
    wts = _moe_weights(view, seed=40)
    x = _randn(7, view.hidden_size, seed=41, scale=1.5)

    shared_only = {**wts, "w2": torch.zeros_like(wts["w2"])}
    with torch.no_grad():
        got = _build_moe(view, shared_only)(x.float())
    s = ref_mlp(x, wts["sh_gate"], wts["sh_up"], wts["sh_down"])
    _close("M3MoE shared expert only", got, s, rtol=1e-5, atol=1e-5)
    _far("M3MoE: shared expert scaled by rsf", view.routed_scaling_factor * s, s, 0.1)

    routed_only = {**wts, "sh_down": torch.zeros_like(wts["sh_down"])}
    with torch.no_grad():
        got = _build_moe(view, routed_only)(x.float())
    want = _ref(view, routed_only, x)
    _close("M3MoE routed experts only", got, want, rtol=1e-5, atol=1e-5)
    _far("M3MoE: routed output unscaled", want / view.routed_scaling_factor, want, 0.1)


def test_m3moe_cpu_path_refuses_amx_packed_experts(sglang_env):
    view = m3_text_view(build_text_config(**MOE_DIMS))
    moe = _build_moe(view, _moe_weights(view, seed=70))
    moe.experts.use_intel_amx_backend = True  # what SGLang's AMX repacking marks the layer with
    with pytest.raises(RuntimeError, match="packed them for Intel AMX"):
        moe(_randn(3, view.hidden_size, seed=71).float())


# ------------------------------------------------------------------------------------------------ the CUDA MoE path

# SGLang's Triton MoE kernels compute in fp16 when handed fp32 activations (`compute_type`), so this check
# works at fp16 resolution: |Δ| ≤ 1e-2·max|want|. Each wrong variant below is off by far more (0.5-1.2 on CPU).
FUSED_TOL = 1e-2
# On a GPU the served dtype, bf16 (8 mantissa bits, 3 fewer than fp16): the input, weights and each kernel's output
# are rounded to it, so the bound is 3× looser; the wrong variants stay > 5× beyond it.
FUSED_TOL_BF16 = 3e-2


def _align_block_size_torch(topk_ids, block_size, num_experts, ignore_invalid_expert=False):
    """The contract of sgl_kernel's `moe_align_block_size` (a CUDA-only op): flat (token, slot) indices grouped
    by expert, each group padded to a multiple of `block_size` with the sentinel `topk_ids.numel()`; one
    expert id per block; the padded total."""
    flat, ids, blocks = topk_ids.flatten(), [], []
    for e in range(num_experts):
        rows = (flat == e).nonzero().flatten().tolist()
        pad = -len(rows) % block_size
        ids += rows + [flat.numel()] * pad
        blocks += [e] * ((len(rows) + pad) // block_size)
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return as_i32(ids), as_i32(blocks), as_i32([len(ids)])


def _fused_moe_worker(device: str = "cpu") -> None:
    """M3MoE's CUDA composition — SGLang's TopK (biased grouped, one group) and FusedMoE's CUDA method with
    the Triton runner, in place on its input — against `ref_moe`: on CPU under Triton's interpreter (fp32 in,
    11 tokens), or on a GPU in bf16 at 11 and 40 tokens (SGLang sums the top-k outputs and applies
    routed_scaling_factor by a compiled torch op up to 32 tokens, by sgl_kernel's moe_sum_reduce above)."""
    import tempfile

    from sglang.srt.utils import common

    if device == "cpu":
        # SGLang registers its fused-experts ops for the CUDA dispatch key only; register them for CPU as well
        # (before the MoE module is imported, which registers them).
        cuda_only = common.direct_register_custom_op

        def also_on_cpu(op_name, op_func, mutates_args=None, fake_impl=None, target_lib=None):
            cuda_only(op_name, op_func, mutates_args, fake_impl, target_lib)
            (target_lib or common.sglang_lib).impl(op_name, op_func, "CPU")

        common.direct_register_custom_op = also_on_cpu
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe, override_config
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy", device=device, moe_runner_backend="triton"), role="test")
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                    distributed_init_method=f"file://{tempfile.mkdtemp()}/init")
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the activations' and experts' dtype
    if device == "cpu":
        fused_moe.moe_align_block_size = _align_block_size_torch

    view = m3_text_view(build_text_config(**MOE_DIMS))
    wts = _moe_weights(view, seed=60)
    torch.set_default_dtype(dtype)  # as SGLang's model loader does: experts and shared expert in the model dtype
    with torch.device(device):
        moe = _build_moe(view, wts)
    torch.set_default_dtype(torch.float32)
    moe.routed_experts = moe.routed_experts_fused
    moe.topk._forward_method = moe.topk.forward_cuda
    moe.experts.quant_method._forward_method = moe.experts.quant_method.forward_cuda
    runner_config = moe.experts.quant_method.runner.config
    # A fixed tile config under the interpreter (SGLang looks its tuned ones up by GPU name); its own on a GPU.
    tiles = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1} if device == "cpu" else None
    result = {}
    for n in (11,) if device == "cpu" else (11, 40):
        # the reference reads the activations as the module does: rounded to `dtype`
        x = _randn(n, view.hidden_size, seed=61, scale=1.5).to(dtype).double()
        want = _ref(view, wts, x)
        suffix = "" if n == 11 else f"_{n}"
        result.update({k + suffix: v for k, v in _fused_moe_errors(moe, runner_config, x, want, tiles, device,
                                                                   dtype, override_config).items()})
    print("@@RESULT@@" + json.dumps(result), flush=True)


def _fused_moe_errors(moe, runner_config, x, want, tiles, device, dtype, override_config) -> dict:
    """Max |Δ| / max|want| of the module and of three wrong variants of it, each on a fresh copy of `x`."""
    import contextlib

    def rel_err(forward) -> float:
        with torch.no_grad(), (override_config(tiles) if tiles else contextlib.nullcontext()):
            got = forward(x.to(device=device, dtype=dtype).contiguous())
        return (got.double().cpu() - want).abs().max().item() / want.abs().max().item()

    def shared_after_routed(x_in):  # the order that reads the overwritten input
        routed = moe.routed_experts(x_in, moe.router_logits(x_in))
        return routed + moe.shared_experts(x_in)  # (routed_experts applies routed_scaling_factor)

    def interleaved(x_in):  # GPT-OSS's [g0, u0, g1, u1, ...] layout instead of M3's [gate | up]
        runner_config.gate_up_interleaved = True
        try:
            return moe(x_in)
        finally:
            runner_config.gate_up_interleaved = False

    def unbiased_selection(x_in):  # TopK choosing without the correction bias
        bias = moe.e_score_correction_bias.data.clone()
        moe.e_score_correction_bias.data.zero_()
        try:
            return moe(x_in)
        finally:
            moe.e_score_correction_bias.data.copy_(bias)

    return {"rel_err": rel_err(moe), "rel_err_shared_after_routed": rel_err(shared_after_routed),
            "rel_err_interleaved": rel_err(interleaved), "rel_err_unbiased_selection": rel_err(unbiased_selection),
            "rel_err_again": rel_err(moe)}


def test_m3moe_cuda_path_interpreted():
    from tests.conftest import interpreted_worker  # not at module level: the worker runs this file as a script

    r = interpreted_worker(__file__, "--fused-moe-worker", timeout=900)
    print(r)
    assert r["rel_err"] < FUSED_TOL and r["rel_err_again"] < FUSED_TOL, r
    # The check can see the bugs it exists for: reading the input after the in-place kernel, the wrong
    # gate/up layout, routing that drops the selection bias.
    for variant in ("shared_after_routed", "interleaved", "unbiased_selection"):
        assert r[f"rel_err_{variant}"] > 5 * FUSED_TOL, (variant, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
def test_m3moe_cuda_path_on_gpu():
    """The same check compiled on a GPU in bf16, at 11 and 40 tokens (SGLang's two top-k sum paths, each applying
    routed_scaling_factor), in a process of its own (SGLang's distributed state)."""
    from tests.conftest import script_worker  # not at module level: the worker runs this file as a script

    r = script_worker(__file__, "--fused-moe-worker-cuda", timeout=900)
    print(r)
    for n in ("", "_40"):
        assert r[f"rel_err{n}"] < FUSED_TOL_BF16 and r[f"rel_err_again{n}"] < FUSED_TOL_BF16, r
        for variant in ("shared_after_routed", "interleaved", "unbiased_selection"):
            assert r[f"rel_err_{variant}{n}"] > 5 * FUSED_TOL_BF16, (variant, n, r)


# ------------------------------------------------------------------------------------------------ torch twins

def test_torch_twins_setting_is_parsed_and_refused_by_name(monkeypatch):
    from sglang_m3.torch_twins import ENV, PARTS, torch_twins, use_torch_twin

    assert torch_twins(" msa, moe ") == {"msa", "moe"}
    assert torch_twins("all") == set(PARTS) and torch_twins("") == set()
    with pytest.raises(ValueError, match="bogus"):
        torch_twins("msa,bogus")
    with pytest.raises(ValueError, match="bogus"):  # "all" does not hide a typo beside it
        torch_twins("all,bogus")
    monkeypatch.setenv(ENV, "swiglu")
    assert use_torch_twin("swiglu") and not use_torch_twin("msa")
    with pytest.raises(ValueError, match="swigglu"):
        use_torch_twin("swigglu")


def test_layers_take_their_torch_twin_when_asked(sglang_env, monkeypatch):
    """The switch reaches the layers it names (on CUDA these would otherwise launch the Triton kernels), and only
    those."""
    from sglang_m3.layers.qk_norm_rope import qk_norm_rope_, qk_norm_rope_torch
    from sglang_m3.layers.swiglu import SwiGLUOAIMLP
    from sglang_m3.model import M3Attention
    from sglang_m3.torch_twins import ENV

    view = m3_text_view(build_text_config(max_position_embeddings=4096))
    built = {}
    for setting in ("", "swiglu", "qk_norm_rope", "all"):
        monkeypatch.setenv(ENV, setting)
        built[setting] = (SwiGLUOAIMLP(32, 24, ALPHA, LIMIT, prefix="model.layers.0.mlp").fused,
                          M3Attention(view, 1, prefix="model.layers.1.self_attn")._norm_rope)
    assert built[""] == (True, qk_norm_rope_)
    assert built["swiglu"] == (False, qk_norm_rope_)
    assert built["qk_norm_rope"] == (True, qk_norm_rope_torch)
    assert built["all"] == (False, qk_norm_rope_torch)


def test_backend_refuses_graph_capture_with_host_syncing_twins(monkeypatch):
    """The msa and moe twins call .tolist(): decode-graph capture with them is refused up front, naming the setting
    (on CUDA; this CPU run gives the backend a CUDA device attribute, nothing else of it is touched)."""
    import torch as _torch

    from sglang_m3.attention.backend import M3SparseAttnBackend
    from sglang_m3.torch_twins import ENV

    backend = object.__new__(M3SparseAttnBackend)
    backend.__dict__["device"] = _torch.device("cuda")
    for setting, refused in (("moe", True), ("all", True), ("qk_norm_rope,swiglu", False)):
        monkeypatch.setenv(ENV, setting)
        if refused:
            with pytest.raises(ValueError, match=f"{ENV}.*--disable-cuda-graph"):
                backend.init_cuda_graph_state(4, 4)
        else:  # graph-safe twins pass the check and reach the dense backend (absent here)
            with pytest.raises(AttributeError, match="dense"):
                backend.init_cuda_graph_state(4, 4)


# (config validation: tests/test_config.py)


if __name__ == "__main__" and "--fused-moe-worker" in sys.argv:
    _fused_moe_worker()
if __name__ == "__main__" and "--fused-moe-worker-cuda" in sys.argv:
    _fused_moe_worker("cuda")
