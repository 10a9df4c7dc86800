"""FP8 weight formats of MiniMax-M3 checkpoints and the conversion between them (pure torch, any device).

MXFP8 — the MXFP8 release (OCP Microscaling v1.0; M3_SPEC §4.3): e4m3 elements, one UE8M0 scale per 1×32 run
along the input dimension K:

    w[n, k] = e4m3[n, k] · 2^(s[n, k // 32] − 127)        s: uint8 `weight_scale_inv` [N, K/32]

Block FP8 — SGLang's DeepSeek-V3 format, which its sm90 kernels (Triton / DeepGEMM block-FP8 GEMM and fused MoE)
run: e4m3 elements, one fp32 scale per 128×128 tile:

    w[n, k] = e4m3[n, k] · scale_inv[n // 128, k // 128]    scale_inv = 2^ceil(log2(amax(|tile|) / 448))

Hopper has no MX-scaled matmul, so sglang-m3 converts each MXFP8 tensor to block FP8 while loading it
(`mxfp8_to_block_fp8`): dequantize in fp32, requantize per 128×128 tile, one tensor and within it one stripe of
1024 rows at a time: the transient is ~0.1 GB of fp32, never a tensor (let alone the model) in bf16.

Why a power-of-two tile scale (DeepSeek-V3 uses amax/448): an MX element is e4m3 · 2^k, so dividing it by 2^t
moves it along e4m3's own grid, exactly, as long as it stays in e4m3's normal range (≥ 2^-6 after scaling, i.e.
within ~2^14 of the tile's largest magnitude); only smaller elements round, to the subnormal step 2^-9 · scale.
With amax/448 every element would be rounded a second time (measured on the tiny checkpoint: relative weight
error 0.040 instead of MXFP8's own 0.027). tests/test_quant.py checks exactness against a float64 oracle.
"""

from __future__ import annotations

import torch

MX_BLOCK = 32          # elements per UE8M0 scale (OCP MX)
E4M3_MAX = 448.0       # largest finite float8_e4m3fn
UE8M0_BIAS = 127
UE8M0_NAN = 255        # the one UE8M0 code that is not a power of two


def mxfp8_dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`weight` float8_e4m3fn [N, K], `scale` uint8 [N, K/32] → fp32 [N, K] (exact: e4m3 · 2^e fits fp32).

    Raises ValueError when dtypes or shapes do not form an MXFP8 pair, or a scale is the UE8M0 NaN code.
    """
    check_mxfp8_pair(weight, scale)
    if bool((scale == UE8M0_NAN).any()):
        raise ValueError("MXFP8 scale holds the UE8M0 NaN code 255")
    n, k = weight.shape
    factor = torch.exp2(scale.to(torch.float32) - UE8M0_BIAS)
    return (weight.to(torch.float32).view(n, k // MX_BLOCK, MX_BLOCK) * factor.unsqueeze(-1)).view(n, k)


def check_mxfp8_pair(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Raise ValueError unless `weight` is float8_e4m3fn [N, K] with K % 32 == 0 and `scale` uint8 [N, K/32]."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"MXFP8 weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if k % MX_BLOCK:
        raise ValueError(f"MXFP8 weight has K={k}, not a multiple of the MX block {MX_BLOCK}")
    if scale.dtype != torch.uint8 or tuple(scale.shape) != (n, k // MX_BLOCK):
        raise ValueError(f"MXFP8 scale must be uint8 of shape {(n, k // MX_BLOCK)} for a weight of shape {(n, k)}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")


def block_fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [N, K] (any float dtype) → (float8_e4m3fn [N, K], fp32 `scale_inv` [ceil(N/block), ceil(K/block)]).

    Per tile: scale_inv = 2^ceil(log2(amax / 448)) (all-zero tiles: 1.0), element = round-to-nearest-even
    e4m3(w / scale_inv), the largest magnitude landing in (224, 448]. Partial edge tiles use their own amax.
    """
    n, k = w.shape
    bn, bk = -(-n // block), -(-k // block)
    padded = torch.zeros(bn * block, bk * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w
    tiles = padded.view(bn, block, bk, block)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX))), torch.ones_like(amax))
    # |w / scale| <= 448 (the division by a power of two is exact); the clamp is a guard against e4m3's NaN.
    q = (tiles / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(bn * block, bk * block)[:n, :k].contiguous(), scale.view(bn, bk).contiguous()


def mxfp8_to_block_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = 128,
                       stripe_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 pair (see `mxfp8_dequantize`) → block-FP8 pair (see `block_fp8_quantize`), on `weight`'s device.

    Converted `stripe_rows` rows (a multiple of `block`) at a time, so the fp32 transient is a few times
    stripe_rows × K × 4 bytes (≈ 0.1 GB at K = 6144), whatever the tensor's size.
    """
    check_mxfp8_pair(weight, scale)
    if stripe_rows % block:
        raise ValueError(f"stripe_rows={stripe_rows} must be a multiple of the block {block}")
    n, k = weight.shape
    q = torch.empty_like(weight)
    out_scale = torch.empty(-(-n // block), -(-k // block), dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, stripe_rows):
        rows = slice(r0, min(n, r0 + stripe_rows))
        q[rows], out_scale[r0 // block:-(-rows.stop // block)] = block_fp8_quantize(
            mxfp8_dequantize(weight[rows], scale[rows]), block)
    return q, out_scale


def mxfp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [N, K] float, K % 32 == 0 → MXFP8 (float8_e4m3fn [N, K], uint8 [N, K/32]); the tiny writer's quantizer.

    Scale exponent per 32-run: e = ceil(log2(amax / 448)) (the smallest power of two that keeps the run in
    e4m3's range, so nothing saturates), clamped to UE8M0's [-127, 127]; all-zero runs get e = -127.
    Which rounding of the exponent the release used is not known (OCP's reference rounds down and saturates);
    the loader reads either.
    """
    n, k = w.shape
    if k % MX_BLOCK:
        raise ValueError(f"MXFP8 needs K % {MX_BLOCK} == 0, got K={k}")
    runs = w.to(torch.float32).reshape(n, k // MX_BLOCK, MX_BLOCK)
    amax = runs.abs().amax(dim=-1, keepdim=True)
    exp = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp(-UE8M0_BIAS, UE8M0_BIAS)
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -UE8M0_BIAS))
    q = (runs / torch.exp2(exp)).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(n, k), (exp.squeeze(-1) + UE8M0_BIAS).to(torch.uint8)
