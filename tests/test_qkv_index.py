"""The fused q | k | v | index_q | index_k projection of the sparse layers (sglang_m3/layers/qkv_index.py).

Oracle: what each TP rank must hold, written here from M3_SPEC §2.4/§3.1 and SGLang's QKV sharding, by slicing the
separate (unfused) checkpoint tensors: rank r of TP t keeps q heads [r·HQ/t, (r+1)·HQ/t), the KV heads
[⌊r·KV/t⌋, ...] (kv_local = max(1, KV/t) of them, replicated when t > KV), the index heads of those same KV heads,
and the whole index-key head. Checked for tp 1, 2 and 8 with the release's 4 KV heads (8 > 4: each KV head on two
ranks), for bf16-style weights, 128×128 block-FP8 weights + scales (scale rows follow the fused layout) and native
MXFP8 (one uint8 scale row per weight row). The rank is faked with SGLang's parallel override; the layers and their
quant methods are SGLang's own, built on CPU. Loading is exact (copies), so comparisons are exact; the forward
check uses fp32 matmul against a float64 product (atol 1e-4 on O(1) outputs).
"""

from __future__ import annotations

import pytest
import torch

from tests.test_layers import sglang_env  # noqa: F401  (fixture; importing it also sets up SGLang on CPU)

H, D, HQ, KV, DI = 256, 128, 16, 4, 128
E4M3 = torch.float8_e4m3fn


def _rows(tp: int, rank: int) -> dict[str, list[int]]:
    """Row indices of each checkpoint tensor that rank `rank` of TP `tp` must hold (the oracle)."""
    q_heads = range(rank * HQ // tp, (rank + 1) * HQ // tp)
    kv_local = max(1, KV // tp)
    kv_heads = range(rank * KV // tp, rank * KV // tp + kv_local)

    def heads(hs, dim):
        return [h * dim + i for h in hs for i in range(dim)]

    return {"q": heads(q_heads, D), "k": heads(kv_heads, D), "v": heads(kv_heads, D),
            "index_q": heads(kv_heads, DI), "index_k": list(range(DI))}


def _tensors(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = {"q": HQ * D, "k": KV * D, "v": KV * D, "index_q": KV * DI, "index_k": DI}
    return {p: torch.randn(n, H, generator=g).to(dtype) for p, n in full.items()}


def _build(tp: int, rank: int, quant_config=None, parts=None):
    from sglang.srt.runtime_context import get_parallel
    from sglang_m3.layers.qkv_index import PARTS, QKVIndexParallelLinear

    with get_parallel().override(tp_size=tp, tp_rank=rank):
        return QKVIndexParallelLinear(H, D, HQ, KV, DI, parts=parts or PARTS, quant_config=quant_config,
                                      prefix="model.layers.3.self_attn.qkv_proj")


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_each_rank_holds_its_heads_unquantized(sglang_env, tp):  # noqa: F811
    from sglang_m3.layers.qkv_index import PARTS

    w = _tensors(1)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    held_kv = set()
    for rank in range(tp):
        layer = _build(tp, rank)
        layer.weight.data.fill_(float("nan"))
        for part in PARTS:
            layer.weight.weight_loader(layer.weight, w[part], part)
        rows = _rows(tp, rank)
        want = torch.cat([w[p][rows[p]] for p in PARTS])
        assert torch.equal(layer.weight.data, want), f"tp{tp} rank {rank}"
        assert layer.part_sizes == [len(rows[p]) for p in PARTS]
        y, _ = layer(x.float())
        assert float((y.double() - x @ want.double().T).abs().max()) < 1e-4
        held_kv.update(row // D for row in rows["k"])
    assert held_kv == set(range(KV))  # every KV head (and its index head) lives on some rank


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_block_fp8_scales_follow_the_fused_layout(sglang_env, tp):  # noqa: F811
    """128×128 block FP8 (the MXFP8 release converted on sm90): weight rows as above, scale row b of a part on
    rank r = the checkpoint scale row (first held weight row)/128 + b, at the part's offset / 128."""
    from sglang.srt.layers.quantization.fp8 import Fp8LinearMethod
    from sglang_m3.layers.qkv_index import PARTS
    from sglang_m3.quant import Mxfp8AsBlockFp8Config

    w = _tensors(3, E4M3)
    g = torch.Generator().manual_seed(4)
    s = {p: torch.rand(t.shape[0] // 128, H // 128, generator=g) + 0.5 for p, t in w.items()}
    for rank in range(tp):
        layer = _build(tp, rank, Mxfp8AsBlockFp8Config())
        assert type(layer.quant_method) is Fp8LinearMethod and layer.weight.dtype == E4M3
        for part in PARTS:
            layer.weight.weight_loader(layer.weight, w[part], part)
            layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, s[part], part)
        rows = _rows(tp, rank)
        want_w = torch.cat([w[p][rows[p]] for p in PARTS])
        want_s = torch.cat([s[p][rows[p][0] // 128:rows[p][-1] // 128 + 1] for p in PARTS])
        assert torch.equal(layer.weight.data.view(torch.uint8), want_w.view(torch.uint8)), f"tp{tp} rank {rank}"
        assert torch.equal(layer.weight_scale_inv.data, want_s), f"tp{tp} rank {rank} scales"


@pytest.mark.parametrize("tp", [1, 8])
def test_native_mxfp8_scales_follow_the_fused_layout(sglang_env, tp):  # noqa: F811
    """sm100's MXFP8 as shipped: uint8 scales [rows, H/32], one row per weight row."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang_m3.layers.qkv_index import PARTS

    cfg = Fp8Config.from_config({"quant_method": "mxfp8", "activation_scheme": "dynamic",
                                 "weight_block_size": [1, 32]})
    w = _tensors(5, E4M3)
    g = torch.Generator().manual_seed(6)
    s = {p: torch.randint(100, 140, (t.shape[0], H // 32), generator=g, dtype=torch.uint8) for p, t in w.items()}
    for rank in range(tp):
        layer = _build(tp, rank, cfg)
        assert layer.weight_scale_inv.dtype == torch.uint8
        for part in PARTS:
            layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, s[part], part)
        rows = _rows(tp, rank)
        assert torch.equal(layer.weight_scale_inv.data, torch.cat([s[p][rows[p]] for p in PARTS]))


def test_index_pair_alone(sglang_env):  # noqa: F811
    """The split form (index projections quantized differently from q/k/v): [index_q of the rank's KV heads | index_k]."""
    from sglang_m3.layers.qkv_index import INDEX_PARTS

    w = _tensors(7)
    for rank in range(8):
        layer = _build(8, rank, parts=INDEX_PARTS)
        for part in INDEX_PARTS:
            layer.weight.weight_loader(layer.weight, w[part], part)
        rows = _rows(8, rank)
        assert torch.equal(layer.weight.data, torch.cat([w[p][rows[p]] for p in INDEX_PARTS]))


def test_errors_name_the_problem(sglang_env):  # noqa: F811
    from sglang_m3.layers.qkv_index import QKV_PARTS

    w = _tensors(8)
    layer = _build(2, 1)
    with pytest.raises(ValueError, match=r"qkv_proj: index_q tensor has shape \(384, 256\), expected \(512, 256\)"):
        layer.weight.weight_loader(layer.weight, w["index_q"][:384], "index_q")
    with pytest.raises(ValueError, match=r"qkv_proj: index_k tensor has shape \(128, 255\)"):
        layer.weight.weight_loader(layer.weight, w["index_k"][:, :255], "index_k")
    with pytest.raises(ValueError, match="no part 'index_q'"):
        _build(2, 0, parts=QKV_PARTS).weight.weight_loader(layer.weight, w["index_q"], "index_q")
    with pytest.raises(ValueError, match="subsequence"):
        _build(1, 0, parts=("k", "q"))
    with pytest.raises(ValueError, match="cannot be split over TP 3"):
        _build(3, 0)


def test_mixed_precision_groups(sglang_env):  # noqa: F811
    """The model asks the checkpoint's ignore list per group: same precision → one GEMM; q/k/v vs index pair
    differing → two layers; a group split by the list → an error naming the group."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang_m3.model import _projection_quant

    prefix = "model.layers.3.self_attn"
    cfg = Fp8Config.from_config({"quant_method": "mxfp8", "activation_scheme": "dynamic",
                                 "weight_block_size": [1, 32], "ignored_layers": ["lm_head"]})
    assert _projection_quant(cfg, prefix) == (cfg, cfg)
    assert _projection_quant(None, prefix) == (None, None)
    cfg.ignored_layers = ["self_attn.index_q_proj", "self_attn.index_k_proj"]
    assert _projection_quant(cfg, prefix) == (cfg, None)
    cfg.ignored_layers = ["model.layers.3.self_attn"]
    assert _projection_quant(cfg, prefix) == (None, None)
    cfg.ignored_layers = ["model.layers.3.self_attn.index_q_proj"]
    with pytest.raises(ValueError, match="index_k_proj"):
        _projection_quant(cfg, prefix)
