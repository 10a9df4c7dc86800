"""Quantized MiniMax-M3: which SGLang quant config serves which checkpoint on which GPU, and what the loader does.

Served (anything else is refused: config.py names the checkpoint field, `check_quant_config` the method):

- the MXFP8 checkpoint (`quantization_config.quant_method: mxfp8`, e4m3 weights + UE8M0 scale per 1×32, M3_SPEC
  §4.3), chosen from the checkpoint, no flag needed:
  - sm90 (Hopper): `Mxfp8AsBlockFp8Config` (`--quantization m3_mxfp8_block`, declared by the plugin). The layers
    are SGLang's block-FP8 layers (Fp8Config with weight_block_size [128, 128]: Fp8LinearMethod → Triton/DeepGEMM
    block GEMM, Fp8MoEMethod → Triton fused MoE with the clamped SwiGLU), and the loader converts each MXFP8
    tensor to 128×128 block FP8 as it reads it (`mxfp8.mxfp8_to_block_fp8`). SGLang 0.5.17 itself refuses
    MXFP8 below sm100 (`Fp8Config.get_min_capability` → 100) and its MX kernels are sm100-only;
  - sm100 (Blackwell): SGLang's own MXFP8 path (`Fp8Config(use_mxfp8=True)`), weights loaded as shipped;
  - anything else: an error naming the GPU.
- online FP8 from the bf16 release (`--quantization fp8`): SGLang's `Fp8Config()`; the layers quantize their bf16
  weights after loading (per-channel linear, per-tensor per-expert MoE).

Which modules take the quant config (model.py): q/k/v/o and index_q/index_k projections, dense MLP, shared expert,
routed experts. Router gate + e_score_correction_bias (fp32), embeddings, lm_head and norms never do; within the
rest the checkpoint's `ignored_layers` decide (SGLang's `is_layer_skipped`; the VL packaging's `language_model.`
prefix is mapped away by the model's `hf_to_sglang_mapper`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from sglang.srt.layers.quantization.fp8 import Fp8Config

from sglang_m3.mxfp8 import check_mxfp8_pair, mxfp8_to_block_fp8

logger = logging.getLogger(__name__)

MXFP8_BLOCK_NAME = "m3_mxfp8_block"
SCALE_SUFFIX = "_scale_inv"      # checkpoint: `<module>.weight_scale_inv`; FusedMoE: `w13_weight_scale_inv`
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)


class Mxfp8AsBlockFp8Config(Fp8Config):
    """An MXFP8 checkpoint served on sm90 as 128×128 block FP8 (converted tensor by tensor by the loader).

    To SGLang's layers this is a plain block-FP8 `Fp8Config` (checkpoint fp8-serialized, dynamic activations,
    weight_block_size [128, 128], use_mxfp8 False), so they create fp8 `weight` [N, K] and fp32
    `weight_scale_inv` [N/128, K/128] and run the kernels DeepSeek-V3's FP8 checkpoints run on Hopper. Only the
    name and the capability gate (sm90 instead of SGLang's 100 for MXFP8) differ.
    """

    def __init__(self, ignored_layers: Optional[list[str]] = None, packed_modules_mapping: Optional[dict] = None):
        super().__init__(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                         ignored_layers=ignored_layers, weight_block_size=[128, 128],
                         packed_modules_mapping=packed_modules_mapping)

    def get_name(self) -> str:
        return MXFP8_BLOCK_NAME

    def get_min_capability(self) -> int:
        return 90

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Mxfp8AsBlockFp8Config":
        """From the checkpoint's quantization_config (SGLang adds packed_modules_mapping and hf_config to it)."""
        method = str(config.get("quant_method", "")).lower()
        if method != "mxfp8":
            raise ValueError(f"{MXFP8_BLOCK_NAME} serves MXFP8 checkpoints (quant_method mxfp8), got {method!r}")
        mx = Fp8Config.from_config(config)  # SGLang's reading of the MXFP8 fields (ignore list normalisation)
        return cls(ignored_layers=mx.ignored_layers, packed_modules_mapping=mx.packed_modules_mapping)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> Optional[str]:
        # Lets ModelConfig accept this method for a checkpoint that says "mxfp8" — only when it was asked for.
        if user_quant == MXFP8_BLOCK_NAME and str((hf_quant_cfg or {}).get("quant_method", "")).lower() == "mxfp8":
            return MXFP8_BLOCK_NAME
        return None


def checkpoint_quant_method(hf_config) -> Optional[str]:
    """`quant_method` of the checkpoint's quantization_config (top level or the VL packaging's text_config)."""
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        quant = getattr(cfg, "quantization_config", None) if cfg is not None else None
        if quant is not None:
            quant = quant if isinstance(quant, dict) else quant.to_dict()
            return str(quant.get("quant_method", "")).lower() or None
    return None


def server_quantization(requested: Optional[str], hf_config,
                        capability: Optional[tuple[int, int]]) -> dict:
    """ServerArgs declarations for the checkpoint's quantization on this GPU (`capability`: CUDA (major, minor),
    None without CUDA). `requested`: --quantization as given (None when absent).

    MXFP8 checkpoint: sm90 → {"quantization": "m3_mxfp8_block"}; sm100/sm103 → {} (SGLang's MXFP8; an explicit
    --quantization mxfp8 is refused there: SGLang would then pick a MoE runner without M3's clamped SwiGLU); other
    GPUs or no GPU → ValueError. Other checkpoints, or a --quantization other than mxfp8 for an MXFP8 checkpoint
    (SGLang then reports the mismatch itself) → {}.
    """
    if checkpoint_quant_method(hf_config) != "mxfp8" or requested not in (None, "mxfp8", MXFP8_BLOCK_NAME):
        return {}
    if capability is not None and capability[0] == 9:
        return {"quantization": MXFP8_BLOCK_NAME}
    if capability is not None and capability[0] == 10:
        if requested == "mxfp8":
            # SGLang then forces its flashinfer_trtllm MoE runner, which does not take M3's clamped SwiGLU.
            raise ValueError("sglang-m3: drop --quantization mxfp8 for MiniMax-M3 (the checkpoint declares it; the "
                             "flag would switch the MoE runner away from triton, which M3's clamped SwiGLU needs)")
        return {}  # SGLang's MXFP8 (or the conversion, when --quantization m3_mxfp8_block asks for it)
    where = "no CUDA device" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
    raise ValueError(f"sglang-m3: the MXFP8 MiniMax-M3 checkpoint is served on sm90 (Hopper, converted to 128x128 "
                     f"block FP8) or sm100 (Blackwell, SGLang's MXFP8 kernels); this machine has {where}. "
                     "Serve the bf16 release instead (optionally with --quantization fp8).")


def check_quant_config(quant_config) -> None:
    """Refuse quant methods the model was not built for (raises ValueError naming the method); log the one used."""
    if quant_config is None:
        return
    if isinstance(quant_config, Mxfp8AsBlockFp8Config) or (
            type(quant_config) is Fp8Config
            and (quant_config.use_mxfp8 or not quant_config.is_checkpoint_fp8_serialized)):
        # ours, SGLang's MXFP8 (checkpoint or online) or online FP8
        logger.info("sglang-m3: MiniMax-M3 quantization %s (checkpoint fp8: %s, weight blocks %s)",
                    quant_config.get_name(), quant_config.is_checkpoint_fp8_serialized,
                    quant_config.weight_block_size or "per channel/tensor")
        return
    raise ValueError(f"sglang-m3 serves MiniMax-M3 unquantized, from the MXFP8 checkpoint, or with --quantization fp8 "
                     f"(online); got quantization {quant_config.get_name()!r} ({type(quant_config).__name__})")


def pair_transform(quant_config) -> Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """How the loader turns a checkpoint (weight, weight_scale_inv) pair into the parameters' format:
    MXFP8 → 128×128 block FP8 for `Mxfp8AsBlockFp8Config`, None (as shipped) otherwise."""
    return mxfp8_to_block_fp8 if isinstance(quant_config, Mxfp8AsBlockFp8Config) else None


def check_checkpoint_pair(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """The only fp8-serialized format served is MXFP8: raise ValueError unless (weight, scale) is an MXFP8 pair."""
    check_mxfp8_pair(weight, scale)


def params_filled_after_loading(model) -> set[str]:
    """Parameters the quant method computes after loading instead of reading them from the checkpoint: the
    weight scales of online FP8 (the bf16 checkpoint has none)."""
    quant_config = getattr(model, "quant_config", None)
    if quant_config is None or getattr(quant_config, "is_checkpoint_fp8_serialized", True):
        return set()
    return {name for name, _ in model.named_parameters() if "weight_scale" in name or "input_scale" in name}


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def register() -> None:
    """Make `m3_mxfp8_block` a quantization method SGLang knows (config lookup and --quantization choices)."""
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS
    from sglang.srt.server_args import QUANTIZATION_CHOICES, add_quantization_method_choices

    QUANTIZATION_METHODS[MXFP8_BLOCK_NAME] = Mxfp8AsBlockFp8Config
    if MXFP8_BLOCK_NAME not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([MXFP8_BLOCK_NAME])
