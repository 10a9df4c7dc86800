"""--kv-cache-dtype fp8_e4m3: K/V stored in fp8 e4m3 (per-tensor scales), read back widened by the torch twin and
the Triton sparse-attention kernel; the index-key lane stays at the model dtype; the cell size counts each lane
at its dtype; the plugin serves fp8_e4m3 and refuses the KV dtypes it does not.

Oracles and tolerances.
  * Store: SGLang's pool casts K / k_scale to float8_e4m3fn (round to nearest, ties to even). The oracle builds
    the 254 finite e4m3 values from the format (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, subnormals
    m * 2^-9, max 448) and rounds in float64: the read-back must equal it exactly. The same check states the
    precision: |dequantized - x| <= 2^-4 |x| for |x / scale| >= 2^-6 (3 mantissa bits), <= 2^-10 * scale below.
  * Attention on an fp8 cache: the twin against a float64 softmax attention over the *dequantized* values (which
    fp32 holds exactly): fp32 arithmetic only, rtol/atol 1e-5.
  * Kernel (Triton interpreter on CPU, real Triton on GPU) against the twin on the same fp8 cache: fp32 q 1e-4;
    bf16 q atol 1e-2 / rtol 2e-2 (P rounded to bf16 for the P @ V dot), as in tests/test_kernels.py.
  * Served (SGLang's CPU engine): transformers fp32 with every K/V its attention reads rounded by the e4m3 oracle
    above (scale 1), prompt logprobs mean |Δ| < 2e-4 and the same greedy tokens; against plain fp32 the fp8 error
    itself (mean |Δ logprob| 0.124 measured, bound 0.25).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

if __name__ == "__main__" and "--worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from tests.test_layers import sglang_env  # noqa: E402,F401  (fixture; importing it also sets up SGLang on CPU)

FP8 = torch.float8_e4m3fn
SPARSE = (1, 2, 3)


# ---------------------------------------------------------------------------------------------------- oracle
def e4m3_values() -> torch.Tensor:
    """Every finite non-negative e4m3fn value in increasing order, from the format definition (float64)."""
    vals = [m * 2.0 ** -9 for m in range(8)]  # exponent field 0: subnormals (and 0)
    for e in range(1, 16):
        for m in range(8):
            if e == 15 and m == 7:  # S.1111.111 is NaN; no infinities in e4m3fn
                continue
            vals.append((1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (float64, |x| <= 448) rounded to the nearest e4m3 value, ties to the even mantissa."""
    table = e4m3_values()
    a = x.abs()
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - table[lo], table[hi] - a
    # code parity == mantissa parity (the table index is the 7-bit code of the magnitude)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return torch.where(pick_hi, table[hi], table[lo]) * x.sign()


def attention_f64(q, k, v, meta, sel, block_size, sm_scale, tok):
    """float64 block-sparse attention, one (token, q head) at a time, straight from the MSA definition."""
    T, hq, _ = q.shape
    hkv = k.shape[1]
    out = torch.zeros(T, hq, v.shape[2], dtype=torch.float64)
    for t, (req, pos) in enumerate(tok):
        slots = meta["req_to_token"][meta["req_pool_indices"][req], : pos + 1].long()
        for h in range(hq):
            g = h // (hq // hkv)
            blocks = {int(b) for b in sel[t, g] if 0 <= int(b) <= pos // block_size}
            keys = [j for j in range(pos + 1) if j // block_size in blocks]
            if not keys:
                continue
            kk, vv = k[slots[keys], g].double(), v[slots[keys], g].double()
            p = torch.softmax(kk @ q[t, h].double() * sm_scale, dim=0)
            out[t, h] = p @ vv
    return out


# ---------------------------------------------------------------------------------------------------- pool
def make_pool(dtype=FP8, index_dtype=torch.bfloat16, size=64):
    from sglang_m3.attention.pool import M3KVPool

    return M3KVPool(size, 1, dtype, 2, 8, 4, "cpu", False, start_layer=0, end_layer=4, enable_alt_stream=False,
                    enable_kv_cache_copy=True, sparse_layer_ids=SPARSE, index_dim=8, index_dtype=index_dtype)


def wide_range(*shape, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Values spanning e4m3's subnormal and normal ranges (|x| from ~2^-12 to ~2^7), signs mixed."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(*shape, generator=g, dtype=torch.float64) * 19 - 12)
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).to(dtype)


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.5, 4.0)])
def test_pool_stores_e4m3_and_reads_back_dequantized(sglang_env, k_scale, v_scale):  # noqa: F811
    pool = make_pool()
    assert pool.k_buffer[0].dtype == torch.uint8  # SGLang stores fp8 as bytes ...
    assert pool.get_key_buffer(1).dtype == FP8 and pool.get_value_buffer(1).dtype == FP8  # ... viewed as e4m3
    assert all(b.dtype == torch.bfloat16 for b in pool.index_k_buffer)  # the index lane keeps the model dtype

    loc = torch.tensor([3, 17, 40, 41, 64])
    k, v = wide_range(5, 2, 8, seed=1), wide_range(5, 2, 8, seed=2)
    layer = SimpleNamespace(layer_id=2)
    # SGLang divides in place (k / k_scale); power-of-two scales keep that division exact in bf16.
    pool.set_kv_buffer(layer, loc, k.clone(), v.clone(), k_scale, v_scale)
    for x, buf, scale in ((k, pool.get_key_buffer(2), k_scale), (v, pool.get_value_buffer(2), v_scale)):
        got = buf[loc].double() * scale
        want = round_e4m3(x.double() / scale) * scale
        assert torch.equal(got, want)
        err = (got - x.double()).abs()
        normal = (x.double() / scale).abs() >= 2.0 ** -6
        assert (err[normal] <= 2.0 ** -4 * x.double().abs()[normal]).all()
        assert (err[~normal] <= 2.0 ** -10 * scale).all()
        assert (err > 0).any()  # it really is quantized
    untouched = torch.ones(65, dtype=torch.bool)
    untouched[loc] = False
    assert (pool.k_buffer[2][untouched] == 0).all() and (pool.v_buffer[2][untouched] == 0).all()


def test_index_lane_keeps_model_dtype_and_fp8_rows_survive_pool_paths(sglang_env):  # noqa: F811
    from sglang_m3.attention import reference as ref

    pool = make_pool()
    loc = torch.tensor([5, 6, 9])
    ik = wide_range(3, 8, seed=3)
    ref.store_index_k(pool.get_index_k_buffer(1), loc, ik)
    assert torch.equal(pool.get_index_k_buffer(1)[loc], ik)  # bf16 in, bf16 stored: not quantized
    pool.set_kv_buffer(SimpleNamespace(layer_id=1), loc, wide_range(3, 2, 8, seed=4), wide_range(3, 2, 8, seed=5))
    before = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer, *pool.index_k_buffer)]
    pool.move_kv_cache(torch.tensor([30, 31, 32]), loc)
    saved = pool.get_cpu_copy(torch.tensor([30, 31, 32]))
    for b in (*pool.k_buffer, *pool.v_buffer, *pool.index_k_buffer):
        b[30:33] = 0
    pool.load_cpu_copy(saved, torch.tensor([30, 31, 32]))
    for old, new in zip(before, (*pool.k_buffer, *pool.v_buffer, *pool.index_k_buffer)):
        assert torch.equal(new[30:33], old[loc])


def test_pool_without_index_dtype_refuses_fp8(sglang_env):  # noqa: F811
    with pytest.raises(ValueError, match="index_dtype"):
        make_pool(index_dtype=None)


# ---------------------------------------------------------------------------------------------------- twin
def fp8_batch(lens, ext, *, hq, hkv, d, dtype, seed, k_scale, v_scale, device="cpu"):
    """tests/test_kernels.py's paged batch with K/V quantized to e4m3 (cache = x / scale; NaN slots stay NaN)."""
    from tests.test_kernels import make_batch

    b = make_batch(lens, ext, hq=hq, hkv=hkv, d=d, di=d, dv=d, dtype=torch.float32, seed=seed, device=device)
    b["k_cache"] = (b["k_cache"] / k_scale).to(FP8)
    b["v_cache"] = (b["v_cache"] * 3 / v_scale).to(FP8)  # V wider than K: other exponents
    b["q"] = b["q"].to(dtype)
    return b


def select_blocks(b, block_size, topk):
    from sglang_m3.attention import reference as ref

    return ref.index_block_topk(b["index_q"], b["index_k_cache"], **b["meta"], block_size=block_size,
                                topk_blocks=topk)


def test_twin_attention_on_fp8_cache_matches_float64_of_dequantized_values():
    from sglang_m3.attention import reference as ref

    ks, vs, bsz = 0.25, 2.0, 8
    b = fp8_batch([40, 29, 17], [3, 1, 17], hq=4, hkv=2, d=16, dtype=torch.float32, seed=7, k_scale=ks, v_scale=vs)
    sel = select_blocks(b, bsz, 3)
    got = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=sel, block_size=bsz,
                               sm_scale=0.3, k_scale=ks, v_scale=vs)
    k_deq = b["k_cache"].double() * ks
    v_deq = b["v_cache"].double() * vs
    want = attention_f64(b["q"], k_deq, v_deq, b["meta"], sel, bsz, 0.3, b["tok"])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the scales are applied (ignoring them would be off by far more than the tolerance)
    unscaled = attention_f64(b["q"], b["k_cache"].double(), b["v_cache"].double(), b["meta"], sel, bsz, 0.3,
                             b["tok"])
    assert (got.double() - unscaled).abs().max() > 0.1
    with pytest.raises(ValueError, match="k_scale"):
        ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=sel, block_size=bsz,
                             sm_scale=0.3, k_scale=0.0)


def test_backend_stores_scaled_and_reads_with_the_same_scales(sglang_env):  # noqa: F811
    """The sparse layer path of M3SparseAttnBackend (CPU: the twins) on an fp8 pool, scales from the layer."""
    from sglang_m3.attention import reference as ref
    from sglang_m3.attention.backend import M3SparseAttnBackend

    pool = make_pool(index_dtype=torch.float32)
    be = object.__new__(M3SparseAttnBackend)  # only what _forward_sparse reads (no model runner on CPU tests)
    be.token_to_kv_pool, be.impl, be._workspace = pool, ref, None
    be.sparse = SimpleNamespace(block_size=4, topk_blocks=2, init_blocks=0, local_blocks=1)
    r2t = torch.arange(1, 33, dtype=torch.int32).view(2, 16)
    seq, ext = torch.tensor([11, 6]), torch.tensor([11, 6], dtype=torch.int32)
    meta = dict(req_to_token=r2t, req_pool_indices=torch.tensor([0, 1]), seq_lens=seq, extend_seq_lens=ext,
                extend_start_loc=torch.tensor([0, 11], dtype=torch.int32))
    be._meta = (meta, {})
    loc = torch.cat([r2t[0, :11], r2t[1, :6]]).long()
    T = 17
    g = torch.Generator().manual_seed(11)
    q = torch.randn(T, 4 * 8, generator=g)
    k, v = torch.randn(T, 2, 8, generator=g), torch.randn(T, 2, 8, generator=g)  # as RadixAttention hands them
    index_q, index_k = torch.randn(T, 2, 8, generator=g), torch.randn(T, 8, generator=g)
    fb = SimpleNamespace(out_cache_loc=loc)
    for k_scale_float, v_scale_float in ((None, None), (0.5, 2.0)):
        layer = SimpleNamespace(layer_id=3, tp_q_head_num=4, qk_head_dim=8, v_head_dim=8, scaling=0.35,
                                k_scale=None if k_scale_float is None else torch.tensor(k_scale_float),
                                v_scale=None if v_scale_float is None else torch.tensor(v_scale_float),
                                k_scale_float=k_scale_float, v_scale_float=v_scale_float)
        k_in, v_in = k.clone(), v.clone()
        out = be._forward_sparse(q, k_in, v_in, layer, fb, index_q, index_k)
        assert torch.equal(k_in, k) and torch.equal(v_in, v)  # the caller's K/V are not divided in place
        ks, vs = k_scale_float or 1.0, v_scale_float or 1.0
        k_deq = pool.get_key_buffer(3).double() * ks
        assert torch.equal(k_deq[loc], round_e4m3(k.double() / ks) * ks)
        sel = ref.index_block_topk(index_q, pool.get_index_k_buffer(3), **meta, block_size=4, topk_blocks=2)
        tok = [(0, p) for p in range(11)] + [(1, p) for p in range(6)]
        want = attention_f64(q.view(T, 4, 8), k_deq, pool.get_value_buffer(3).double() * vs, meta, sel, 4, 0.35,
                             tok)
        torch.testing.assert_close(out.view(T, 4, 8).double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- cell size
def test_cell_size_counts_kv_at_fp8_and_the_index_lane_at_model_dtype(sglang_env, monkeypatch):  # noqa: F811
    """Per-token bytes from SGLang's cell size + our hook equal what an M3KVPool of those dims allocates per slot."""
    from sglang.srt.model_executor import pool_configurator as pc

    from sglang_m3 import plugin
    from sglang_m3.attention.pool import M3KVPool
    from sglang_m3.config import MiniMaxM3Config, m3_text_view
    from sglang_m3.tiny import build_text_config

    monkeypatch.setattr(pc, "is_minimax_sparse", plugin._never)  # what the plugin's REPLACE hook does
    hf = MiniMaxM3Config(**{**build_text_config(), "architectures": ["MiniMaxM3SparseForCausalLM"]})
    view = m3_text_view(hf)
    layers, hkv, d, di = view.num_layers, view.num_kv_heads, view.head_dim, view.sparse.index_dim
    assert 0 < len(view.sparse_layers) < layers
    original = getattr(pc.DefaultPoolConfigurator._compute_cell_size, "__wrapped__",
                       pc.DefaultPoolConfigurator._compute_cell_size)
    for kv_dtype in (FP8, torch.bfloat16):
        kvc = SimpleNamespace(
            model_config=SimpleNamespace(hf_config=hf, get_num_kv_heads=lambda tp: hkv, head_dim=d, v_head_dim=d),
            kv_cache_dtype=kv_dtype, model_dtype=torch.bfloat16, use_mla_backend=False, is_draft_worker=False,
            server_args=SimpleNamespace(enable_dsa_cache_layer_split=False),
            layer_info=SimpleNamespace(start_layer=0, end_layer=layers))
        cell = plugin._cell_size_with_index_k(original, SimpleNamespace(kv_cache_dtype_str=None), kvc, layers)
        pool = M3KVPool(64, 1, kv_dtype, hkv, d, layers, "cpu", False, start_layer=0, end_layer=layers,
                        enable_alt_stream=False, sparse_layer_ids=view.sparse_layers, index_dim=di,
                        index_dtype=torch.bfloat16)
        assert cell * 65 == sum(pool.get_kv_size_bytes()), kv_dtype
        # K/V at 1 byte per element with fp8, 2 with bf16; the index lane at 2 in both
        assert cell == layers * 2 * hkv * d * kv_dtype.itemsize + len(view.sparse_layers) * di * 2


# ---------------------------------------------------------------------------------------------------- plugin
def test_plugin_serves_fp8_e4m3_and_refuses_other_quantized_kv_dtypes():
    from sglang_m3 import plugin
    from sglang_m3.config import MiniMaxM3Config
    from sglang_m3.tiny import build_text_config

    hf = MiniMaxM3Config(**{**build_text_config(), "architectures": ["MiniMaxM3SparseForCausalLM"]})
    hf.dtype = torch.bfloat16  # as the release: --dtype auto resolves to bf16, so a bf16 cache is the model dtype

    def args(kv):
        from sglang.srt.server_args import ServerArgs

        return ServerArgs(model_path="dummy", device="cpu", kv_cache_dtype=kv)

    for ok in ("auto", "bf16", "bfloat16", "fp8_e4m3"):
        assert plugin._m3_server_overrides(args(ok), hf)["attention_backend"] == plugin.BACKEND_NAME
    for bad in ("fp8_e5m2", "mxfp8", "nvfp4", "fp4_mx_block16"):
        with pytest.raises(ValueError, match=f"--kv-cache-dtype {bad} is not supported.*fp8_e4m3"):
            plugin._m3_server_overrides(args(bad), hf)


# ---------------------------------------------------------------------------------------------------- served, CPU
# fp8 vs fp32 K/V, measured (tiny one-KV checkpoint, fp32 model, CPU engine; transformers fp32 as the reference):
# mean |Δ logprob| 0.124 over this 700-token prompt (0.196 / 0.152 on 450 / 1000-token prompts; maxima 5.9-8.3 at
# positions where a rounded key flips a near-tied choice downstream). Bound: twice the measured mean. The fp32 server
# is within 2e-4 of the same reference (tests/test_server.py), so a floor of 0.01 shows the cache really is fp8.
SERVED_MEAN_TOL, SERVED_MEAN_FLOOR = 0.25, 0.01


@pytest.mark.server
def test_served_fp8_kv_close_to_fp32_reference_and_self_consistent(start_server, tiny_dir):
    """SGLang's CPU engine with --kv-cache-dtype fp8_e4m3 (torch_native dense layers, the torch MSA twins), sparse
    regime: the pool is fp8, prompt logprobs are within the measured fp8 error of transformers fp32, and decode steps
    equal one prefill of the same tokens at fp32 precision (both read the same rounded K/V; measured 6e-6)."""
    from tests.test_server import hf_input_logprobs, input_logprobs, post, prompt_ids

    ckpt = tiny_dir(flat=True, num_key_value_heads=1)  # one KV head: HF's selection is exact MSA
    server = start_server(ckpt, "--kv-cache-dtype", "fp8_e4m3")
    assert "KV Cache is allocated. dtype: torch.float8_e4m3fn" in server.log()
    ids = prompt_ids(700, seed=5)
    ours, ref = input_logprobs(server, ids), hf_input_logprobs(ckpt, ids)
    d = [abs(a - b) for a, b in zip(ours, ref)]
    mean = sum(d) / len(d)
    print(f"fp8 KV vs transformers fp32, 700 tokens: mean |Δ logprob| {mean:.4f}, max {max(d):.3f}")
    assert SERVED_MEAN_FLOOR < mean <= SERVED_MEAN_TOL
    out = post(server, "/generate", {"input_ids": ids, "return_logprob": True,
                                     "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}})
    decoded = out["meta_info"]["output_token_logprobs"]
    post(server, "/flush_cache")
    scored = input_logprobs(server, ids + [t for _, t, _ in decoded])[len(ids) - 1:]
    assert max(abs(lp - s) for (lp, _, _), s in zip(decoded, scored)) < 1e-4


def hf_with_e4m3_kv(monkeypatch):
    """transformers' M3 with every K and V its attention reads rounded to e4m3 (round_e4m3, scale 1: a checkpoint
    without KV scales, as the tiny one, is cached at scale 1.0 by SGLang and by _kv_scales) — what an fp8 K/V cache
    holds, with everything else (the index keys included) in fp32. Patches the module's eager_attention_forward,
    which MiniMaxM3VLAttention looks up at each call (attn_implementation "eager", tests/hf_oracle.py)."""
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf

    eager = hf.eager_attention_forward

    def rounded(module, query, key, value, *args, **kwargs):
        return eager(module, query, round_e4m3(key.double()).float(), round_e4m3(value.double()).float(), *args,
                     **kwargs)

    monkeypatch.setattr(hf, "eager_attention_forward", rounded)


# Served fp8 cache vs transformers reading the same e4m3-rounded K/V, measured on this 700-token prompt: mean
# |Δ logprob| 5.4e-5, max 1.1e-3 (fp32 arithmetic on both sides over the same rounded values; the maximum is where the
# two sides' fp32 differences put a value across an e4m3 rounding boundary). Bound: about 4x the measured mean, three
# orders below the fp8-vs-fp32 gap above (0.124). The oracle misses any other cache by far: with K left unrounded
# the same comparison gives mean 0.10, V unrounded 0.098, e5m2 instead of e4m3 0.28 (transformers against itself).
ROUNDED_MEAN_TOL, ROUNDED_MAX_TOL = 2e-4, 1e-2


@pytest.mark.server
def test_served_fp8_kv_equals_transformers_with_e4m3_rounded_kv(start_server, tiny_dir, monkeypatch):
    """SGLang's CPU engine with --kv-cache-dtype fp8_e4m3 computes what an fp8 cache means, not merely something
    close to fp32: its prompt logprobs equal transformers' with K/V rounded to e4m3 at fp32 precision, and its greedy
    continuation equals that model's greedy continuation (HF's own incremental decode), in the sparse regime."""
    from tests.hf_oracle import hf_greedy
    from tests.test_server import flush, hf_input_logprobs, input_logprobs, post, prompt_ids

    ckpt = tiny_dir(flat=True, num_key_value_heads=1)  # one KV head: HF's selection is exact MSA
    server = start_server(ckpt, "--kv-cache-dtype", "fp8_e4m3")
    ids = prompt_ids(700, seed=5)
    flush(server)  # both from scratch (the test above leaves this prompt in the radix cache)
    ours = input_logprobs(server, ids)
    flush(server)
    out = post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 24, "temperature": 0,
                                                                          "ignore_eos": True}})
    hf_with_e4m3_kv(monkeypatch)
    ref = hf_input_logprobs(ckpt, ids)
    d = [abs(a - b) for a, b in zip(ours, ref)]
    print(f"fp8 KV vs transformers with e4m3-rounded K/V, 700 tokens: mean |Δ logprob| {sum(d) / len(d):.2e}, "
          f"max {max(d):.2e}")
    assert sum(d) / len(d) < ROUNDED_MEAN_TOL and max(d) < ROUNDED_MAX_TOL
    assert out["output_ids"] == hf_greedy(ckpt, ids, 24)


# ---------------------------------------------------------------------------------------------------- kernel, CPU
def kernel_cases():
    """(name, q dtype, fp32-style tolerance?) cases run by the interpreter worker."""
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref
    from sglang_m3.attention.kernels import common

    common._DEFAULT_SMS = 8  # tiny batches still take the split (+ merge) path
    results = {}
    for name, dtype, tol in (("fp32_q", torch.float32, dict(rtol=1e-4, atol=1e-4)),
                             ("bf16_q", torch.bfloat16, dict(rtol=2e-2, atol=1e-2))):
        try:
            ks, vs, bsz = 0.5, 2.0, 16
            b = fp8_batch([70, 37, 21], [4, 1, 3], hq=4, hkv=2, d=16, dtype=dtype, seed=3, k_scale=ks, v_scale=vs)
            sel = select_blocks(b, bsz, 3)
            want = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=sel,
                                        block_size=bsz, sm_scale=0.25, k_scale=ks, v_scale=vs)
            worst = 0.0
            for ns in (1, 2):
                got = K.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], block_topk=sel,
                                         block_size=bsz, sm_scale=0.25, k_scale=ks, v_scale=vs, num_splits=ns)
                assert got.dtype == dtype
                torch.testing.assert_close(got.float(), want.float(), **tol)
                worst = max(worst, float((got.float() - want.float()).abs().max()))
            # decode form of the kernel on a decode batch
            d = fp8_batch([50, 90], [1, 1], hq=2, hkv=1, d=16, dtype=dtype, seed=4, k_scale=ks, v_scale=vs)
            sel = select_blocks(d, bsz, 3)
            want = ref.sparse_attention(d["q"], d["k_cache"], d["v_cache"], **d["meta"], block_topk=sel,
                                        block_size=bsz, sm_scale=0.25, k_scale=ks, v_scale=vs)
            dm = {**d["meta"], "extend_seq_lens": None, "extend_start_loc": None}
            got = K.sparse_attention(d["q"], d["k_cache"], d["v_cache"], **dm, block_topk=sel, block_size=bsz,
                                     sm_scale=0.25, k_scale=ks, v_scale=vs)
            torch.testing.assert_close(got.float(), want.float(), **tol)
            results[name] = {"ok": True, "max_abs_diff": worst}
        except BaseException:  # noqa: BLE001 -- reported to the parent test
            results[name] = {"ok": False, "error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p))
    out = subprocess.run([sys.executable, __file__, "--worker"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("@@RESULTS@@")]
    if not line:
        raise RuntimeError(f"interpreter worker died (rc={out.returncode}):\n{(out.stdout + out.stderr)[-6000:]}")
    return json.loads(line[-1][len("@@RESULTS@@"):])


@pytest.mark.parametrize("case", ["fp32_q", "bf16_q"])
def test_kernel_on_fp8_cache_matches_twin_interpreted(case, interpreter_results):
    r = interpreter_results[case]
    assert r["ok"], r.get("error")


# ---------------------------------------------------------------------------------------------------- kernel, GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA (and compiled Triton)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv", [pytest.param(64, 4, id="tp1-64q-4kv"), pytest.param(8, 1, id="tp8-8q-1kv")])
def test_gpu_kernel_on_fp8_cache_matches_twin(hq, hkv, capsys):
    """Real shapes (D 128, block 128, top-16), decode rows up to 128K and an extend chunk, fp8 K/V with non-unit
    scales: kernel vs twin on the same fp8 cache (bf16 tolerance); prints the fp8-vs-bf16-cache output gap."""
    from sglang_m3.attention import kernels as K
    from sglang_m3.attention import reference as ref
    from tests.test_kernels import make_batch

    lens, ext = [131072 + 77, 2049, 40053, 100], [1, 1, 2053, 1]
    b = make_batch(lens, ext, hq=hq, hkv=hkv, d=128, di=128, dv=128, dtype=torch.bfloat16, seed=5, device="cuda")
    sel = ref.index_block_topk(b["index_q"], b["index_k_cache"], **b["meta"], block_size=128, topk_blocks=16)
    ks, vs = 0.5, 0.25
    k8, v8 = (b["k_cache"].float() / ks).to(FP8), (b["v_cache"].float() / vs).to(FP8)
    kw = dict(block_topk=sel, block_size=128, sm_scale=128 ** -0.5)
    got = K.sparse_attention(b["q"], k8, v8, **b["meta"], k_scale=ks, v_scale=vs, **kw)
    want = ref.sparse_attention(b["q"], k8, v8, **b["meta"], k_scale=ks, v_scale=vs, **kw)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)
    bf16 = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **b["meta"], **kw)
    gap = (got.float() - bf16.float()).abs()
    with capsys.disabled():
        print(f"\nfp8 vs bf16 cache, {hq}q/{hkv}kv: attention output |diff| max {gap.max():.3e} "
              f"mean {gap.mean():.3e} (|out| mean {bf16.float().abs().mean():.3e})")


if __name__ == "__main__" and "--worker" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print("@@RESULTS@@" + json.dumps(kernel_cases()), flush=True)
