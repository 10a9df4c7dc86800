"""Strict weight loading for MiniMax-M3 (M3_SPEC §4).

Maps the released tensor names onto the fused SGLang parameters (q/k/v → qkv_proj, gate/up → gate_up_proj,
per-expert w1/w3/w2 → FusedMoE's stacked w13/w2) and refuses to serve a checkpoint that does not fit: a
tensor that maps to nothing, or a parameter no tensor filled, is an error listing the names. The only
tensors skipped on purpose are the vision tower / projector of the VL packaging and MTP modules (the
BF16 release ships none; nothing here would use them).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Iterable

import torch
from sglang.srt.model_loader.weight_utils import default_weight_loader

logger = logging.getLogger(__name__)

# Top-level prefixes of the VL packaging that belong to the vision side.
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
_MTP = re.compile(r"^model\.mtp\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
# (checkpoint suffix, fused parameter suffix, shard id)
_STACKED = (
    (".self_attn.q_proj.weight", ".self_attn.qkv_proj.weight", "q"),
    (".self_attn.k_proj.weight", ".self_attn.qkv_proj.weight", "k"),
    (".self_attn.v_proj.weight", ".self_attn.qkv_proj.weight", "v"),
    (".gate_proj.weight", ".gate_up_proj.weight", 0),
    (".up_proj.weight", ".gate_up_proj.weight", 1),
)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def _required_shards(model) -> dict[str, set]:
    """Every shard each fused parameter needs before it is fully loaded."""
    required = {}
    for name, module in model.named_modules():
        if hasattr(module, "w13_weight") and hasattr(module, "num_experts"):  # FusedMoE
            experts = range(module.num_experts)
            required[f"{name}.w13_weight"] = {(e, s) for e in experts for s in ("w1", "w3")}
            required[f"{name}.w2_weight"] = {(e, "w2") for e in experts}
    for name, _ in model.named_parameters():
        if name.endswith("qkv_proj.weight"):
            required[name] = {"q", "k", "v"}
        elif name.endswith("gate_up_proj.weight"):
            required[name] = {0, 1}
    return required


def load_m3_weights(model, weights: Iterable[tuple[str, torch.Tensor]], checkpoint_prefix: str = "") -> None:
    params = dict(model.named_parameters())
    loaded: dict[str, set] = defaultdict(set)
    unexpected, skipped = [], 0

    for ckpt_name, tensor in weights:
        if checkpoint_prefix:
            if not ckpt_name.startswith(checkpoint_prefix):
                if ckpt_name.startswith(VISION_PREFIXES):
                    skipped += 1
                else:
                    unexpected.append(ckpt_name)
                continue
            name = ckpt_name[len(checkpoint_prefix):]
        else:
            name = ckpt_name
        if _MTP.match(name) or name.endswith("rotary_emb.inv_freq"):
            skipped += 1
            continue

        expert = _EXPERT.match(name)
        if expert:
            module, expert_id, shard = expert.group(1), int(expert.group(2)), expert.group(3)
            target = f"{module}.experts.{'w2' if shard == 'w2' else 'w13'}_weight"
            if target not in params or expert_id >= getattr(model.get_submodule(f"{module}.experts"), "num_experts", 0):
                unexpected.append(ckpt_name)
                continue
            param = params[target]
            param.weight_loader(param, tensor, target, shard_id=shard, expert_id=expert_id)
            loaded[target].add((expert_id, shard))
            continue

        for suffix, fused, shard in _STACKED:
            if name.endswith(suffix) and name[: -len(suffix)] + fused in params:
                target = name[: -len(suffix)] + fused
                params[target].weight_loader(params[target], tensor, shard)
                loaded[target].add(shard)
                break
        else:
            if name not in params:
                unexpected.append(ckpt_name)
                continue
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape) and not hasattr(param, "output_dim"):
                raise CheckpointMismatchError(
                    f"checkpoint tensor {ckpt_name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)} (does config.json match the weights?)")
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded[name].add(None)

    required = _required_shards(model)
    missing = sorted(name for name in params
                     if not loaded.get(name) or not required.get(name, set()) <= loaded[name])
    if unexpected or missing:
        raise CheckpointMismatchError(_mismatch_message(unexpected, missing))
    if skipped:
        logger.info("MiniMax-M3: skipped %d vision-tower/projector/MTP tensors (text model only).", skipped)


def _mismatch_message(unexpected: list[str], missing: list[str], show: int = 20) -> str:
    parts = ["MiniMax-M3 checkpoint does not match the model built from its config.json."]
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensor(s) map to no parameter: " + ", ".join(unexpected[:show])
                     + (" ..." if len(unexpected) > show else ""))
    if missing:
        parts.append(f"{len(missing)} parameter(s) were not (fully) loaded: " + ", ".join(missing[:show])
                     + (" ..." if len(missing) > show else ""))
    return "\n".join(parts)
