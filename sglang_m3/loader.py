"""Strict weight loading for MiniMax-M3 (M3_SPEC §4), unquantized or quantized (quant.py).

Maps the released tensor names onto the fused SGLang parameters (q/k/v → qkv_proj, on sparse layers index_q/index_k
too (or → index_proj, model.M3Attention), gate/up → gate_up_proj,
per-expert w1/w3/w2 → FusedMoE's stacked w13/w2), for weights and for their `weight_scale_inv` alike, and refuses
to serve a checkpoint that does not fit, naming the tensors:
- a tensor that maps to no parameter (including a scale of a module the model built unquantized);
- a parameter no tensor filled (including a missing scale);
- a quantized weight without its scale or a scale without its weight, or a pair that is not MXFP8
  (e4m3 [N, K] + uint8 [N, K/32]);
- an fp8 tensor for a module built unquantized (e.g. a layer missing from the checkpoint's ignored_layers
  list), or a non-fp8 weight for a quantized module.
The only tensors skipped on purpose are the vision tower / projector of the VL packaging and MTP modules (the
BF16 release ships none; nothing here would use them).

Quantized weights are loaded as (weight, scale) pairs: a half waits until its partner arrives (adjacent in the
release's files, so at most one tensor waits), then the pair is checked, converted when the quant config asks for
it (MXFP8 → 128×128 block FP8 on sm90, on the parameter's device, one tensor at a time) and loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from typing import Iterable, Optional

import torch
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from sglang.srt.model_loader.weight_utils import default_weight_loader

from sglang_m3 import quant
from sglang_m3.layers.qkv_index import QKVIndexParallelLinear

logger = logging.getLogger(__name__)

# Top-level prefixes of the VL packaging that belong to the vision side.
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
_MTP = re.compile(r"^model\.mtp\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3)$")
LEAVES = ("weight", "weight" + quant.SCALE_SUFFIX)
# (checkpoint module suffix, fused module suffix, shard id)
_STACKED = (
    (".self_attn.q_proj", ".self_attn.qkv_proj", "q"),
    (".self_attn.k_proj", ".self_attn.qkv_proj", "k"),
    (".self_attn.v_proj", ".self_attn.qkv_proj", "v"),
    (".self_attn.index_q_proj", ".self_attn.qkv_proj", "index_q"),  # sparse layers: one q/k/v/index GEMM
    (".self_attn.index_k_proj", ".self_attn.qkv_proj", "index_k"),
    (".self_attn.index_q_proj", ".self_attn.index_proj", "index_q"),  # ... or two (model.M3Attention)
    (".self_attn.index_k_proj", ".self_attn.index_proj", "index_k"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


class CheckpointFileError(ValueError):
    """A checkpoint file is not a complete safetensors file (truncated copy, interrupted download, corrupt header)."""


# safetensors' own limit on the JSON header (100 MB); a larger length field is garbage, not a header to read
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors_file(path) -> None:
    """Check that `path` is a complete safetensors file, reading only its header: an 8-byte little-endian header
    length n, n bytes of JSON {tensor name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__"?},
    then the tensor data, whose offsets must tile [0, D) with D = the largest end; the file must be exactly
    8 + n + D bytes long (safetensors itself refuses any other length).

    Raises CheckpointFileError naming the file and what is wrong with it (truncated: how many bytes are missing;
    header that is not a safetensors header). Why: safetensors refuses such a file with a bare SafetensorError
    ("incomplete metadata, file not fully covered") that names neither the file nor the cause, and SGLang reads
    the shards only after building the model, deep in its weight iterator."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    what = f"checkpoint file {path} ({size} bytes) is truncated or corrupt"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{what}: a safetensors file starts with an 8-byte header length "
                                      "(re-download or re-copy it)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CheckpointFileError(f"{what}: its header length field says {n} bytes, but {size - 8} bytes follow "
                                      "(a truncated file, or not a safetensors file; re-download or re-copy it)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        spans = sorted((int(start), int(stop)) for name, entry in header.items() if name != "__metadata__"
                       for start, stop in [entry["data_offsets"]])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointFileError(f"{what}: its {n}-byte safetensors header is not a JSON object of tensors with "
                                  f"data_offsets ({type(e).__name__}: {e})") from None
    end = 0
    for start, stop in spans:
        if start != end or stop < start:
            raise CheckpointFileError(f"{what}: its header's tensor data_offsets do not tile the data (a tensor "
                                      f"spans [{start}, {stop}) where the previous one ended at {end})")
        end = stop
    need = 8 + n + end
    if size < need:
        raise CheckpointFileError(f"{what}: it is truncated — its header places tensor data up to byte {need}, "
                                  f"{need - size} bytes past the end of the file (re-download or re-copy it)")
    if size > need:
        raise CheckpointFileError(f"{what}: it has {size - need} bytes after the last tensor's data (its header "
                                  f"ends the data at byte {need}; safetensors refuses such a file)")


def check_safetensors_files(paths: Iterable) -> None:
    """check_safetensors_file for every path ending in .safetensors (others are SGLang's business); raises
    CheckpointFileError for the first bad one."""
    for path in paths:
        if os.fspath(path).endswith(".safetensors"):
            check_safetensors_file(path)


def checkpoint_weight_shape(module: str, view) -> Optional[tuple[int, ...]]:
    """The full (unsharded) shape config.json implies for checkpoint tensor `<module>.weight` of a projection
    (M3_SPEC §4.1), or None for tensors whose parameter checks its own shape. Needed because SGLang's parallel
    linear weight loaders zero-pad a tensor that is too small along the TP-sharded dim instead of refusing it."""
    hidden, d, di = view.hidden_size, view.head_dim, view.sparse.index_dim
    # Vocabulary-parallel and router weights: SGLang's loaders refuse a wrong shape with a bare assert (or a
    # broadcast RuntimeError) that names neither the tensor nor config.json's value.
    if module in ("model.embed_tokens", "lm_head"):
        return (view.vocab_size, hidden)
    if module.endswith(".block_sparse_moe.gate"):
        return (view.num_experts, hidden)
    tail = module.rpartition(".self_attn.")[2] if ".self_attn." in module else None
    attn = {"q_proj": (view.num_heads * d, hidden), "k_proj": (view.num_kv_heads * d, hidden),
            "v_proj": (view.num_kv_heads * d, hidden), "o_proj": (hidden, view.num_heads * d),
            "index_q_proj": (view.sparse.num_index_heads * di, hidden), "index_k_proj": (di, hidden)}
    if tail is not None:
        return attn.get(tail)
    expert = _EXPERT.match(module)
    if expert:
        i = view.moe_intermediate_size
        return (hidden, i) if expert.group(3) == "w2" else (i, hidden)
    for part, i in ((".block_sparse_moe.shared_experts.", view.shared_intermediate_size),
                    (".mlp.", view.dense_intermediate_size)):
        if part in module:
            proj = module.rpartition(".")[2]
            return {"gate_proj": (i, hidden), "up_proj": (i, hidden), "down_proj": (hidden, i)}.get(proj)
    return None


def _target(name: str, params: dict, model) -> Optional[tuple[str, object, Optional[int]]]:
    """(parameter name, shard id, expert id) that checkpoint tensor `name` fills, or None if it maps to nothing."""
    module, _, leaf = name.rpartition(".")
    if leaf in LEAVES:
        expert = _EXPERT.match(module)
        if expert:
            moe, expert_id, shard = expert.group(1), int(expert.group(2)), expert.group(3)
            target = f"{moe}.experts.{'w2' if shard == 'w2' else 'w13'}_{leaf}"
            if target in params and expert_id < getattr(model.get_submodule(f"{moe}.experts"), "num_experts", 0):
                return target, shard, expert_id
            return None
        for suffix, fused, shard in _STACKED:
            target = module[: -len(suffix)] + fused
            if module.endswith(suffix) and target + "." + leaf in params and shard in _shard_ids(model, target):
                return target + "." + leaf, shard, None
    return (name, None, None) if name in params else None


def _required_shards(model, params: dict) -> dict[str, set]:
    """Every shard each fused parameter (weight or scale) needs before it is fully loaded."""
    required = {}
    for name, module in model.named_modules():
        if hasattr(module, "w13_weight") and hasattr(module, "num_experts"):  # FusedMoE
            experts = range(module.num_experts)
            for pname in params:
                if pname.startswith(f"{name}.w13_"):
                    required[pname] = {(e, s) for e in experts for s in ("w1", "w3")}
                elif pname.startswith(f"{name}.w2_"):
                    required[pname] = {(e, "w2") for e in experts}
    for name in params:
        shards = _shard_ids(model, name.rpartition(".")[0])
        if shards:
            required[name] = set(shards)
    return required


def _shard_ids(model, module_name: str) -> tuple:
    """The shard ids a fused linear module is loaded with (one per checkpoint tensor), () for other modules."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return ()
    if isinstance(module, QKVIndexParallelLinear):
        return module.parts
    if isinstance(module, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(module, MergedColumnParallelLinear):
        return tuple(range(len(module.output_sizes)))
    return ()


class _Loader:
    def __init__(self, model, checkpoint_prefix: str):
        self.model, self.prefix = model, checkpoint_prefix
        self.params = dict(model.named_parameters())
        self.view = getattr(model, "view", None)  # M3TextView of the model's config
        self.expected = set(self.params) - quant.params_filled_after_loading(model)
        self.transform = quant.pair_transform(getattr(model, "quant_config", None))
        self.loaded: dict[str, set] = defaultdict(set)
        self.unexpected: list[str] = []
        self.skipped = 0
        # checkpoint module name -> {leaf: (checkpoint name, tensor, target)} for quantized weights awaiting a partner
        self.pending: dict[str, dict] = {}
        self.max_pending = 0  # largest number of tensors held at once (tests read it)

    def feed(self, ckpt_name: str, tensor: torch.Tensor) -> None:
        name = self._strip(ckpt_name)
        if name is None:
            return
        target = _target(name, self.params, self.model)
        if target is None:
            self.unexpected.append(ckpt_name)
            return
        module, _, leaf = name.rpartition(".")
        param_name = target[0]
        want = checkpoint_weight_shape(module, self.view) if leaf == "weight" and self.view is not None else None
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointMismatchError(
                f"checkpoint tensor {ckpt_name} has shape {tuple(tensor.shape)}, config.json implies {want} "
                "(does config.json match the weights?)")
        is_scale = leaf.endswith(quant.SCALE_SUFFIX)
        if not is_scale and not tensor.is_floating_point():
            # SGLang's loaders copy_() an integer or bool tensor into the float parameter without a word
            raise CheckpointMismatchError(
                f"checkpoint tensor {ckpt_name} is {tensor.dtype}: a weight must be a floating-point tensor "
                "(corrupt or mislabelled checkpoint?)")
        if is_scale or param_name + quant.SCALE_SUFFIX in self.params:
            self._pair(module, leaf, ckpt_name, tensor, target)
            return
        if quant.is_fp8(tensor) and not quant.is_fp8(self.params[param_name]):
            raise CheckpointMismatchError(
                f"checkpoint tensor {ckpt_name} is {tensor.dtype}, but the model built "
                f"{param_name.rpartition('.')[0]} unquantized (listed in quantization_config.ignored_layers, or "
                "no quantization_config in config.json?)")
        self._load(ckpt_name, tensor, target)

    def _strip(self, ckpt_name: str) -> Optional[str]:
        name = ckpt_name
        if self.prefix:
            if not ckpt_name.startswith(self.prefix):
                if ckpt_name.startswith(VISION_PREFIXES):
                    self.skipped += 1
                else:
                    self.unexpected.append(ckpt_name)
                return None
            name = ckpt_name[len(self.prefix):]
        if _MTP.match(name) or name.endswith("rotary_emb.inv_freq"):
            self.skipped += 1
            return None
        return name

    def _pair(self, module: str, leaf: str, ckpt_name: str, tensor: torch.Tensor, target) -> None:
        """Hold one half of a quantized module's (weight, weight_scale_inv) until the other arrives, then load both."""
        entry = self.pending.setdefault(module, {})
        entry[leaf] = (ckpt_name, tensor, target)
        if len(entry) == 2:
            del self.pending[module]
            (w_name, weight, w_target), (s_name, scale, s_target) = entry["weight"], entry[LEAVES[1]]
            try:
                quant.check_checkpoint_pair(weight, scale)
            except ValueError as e:
                raise CheckpointMismatchError(f"checkpoint tensors {w_name} / {s_name}: {e}") from None
            if self.transform is not None:
                device = self.params[w_target[0]].device
                weight, scale = self.transform(weight.to(device), scale.to(device))
            self._load(w_name, weight, w_target)
            self._load(s_name, scale, s_target)
        self.max_pending = max(self.max_pending, sum(len(e) for e in self.pending.values()))

    def _load(self, ckpt_name: str, tensor: torch.Tensor, target) -> None:
        param_name, shard, expert_id = target
        param = self.params[param_name]
        if quant.is_fp8(param) and tensor.dtype != param.dtype:
            raise CheckpointMismatchError(f"checkpoint tensor {ckpt_name} is {tensor.dtype}, the model expects "
                                          f"{param.dtype} for {param_name}")
        if expert_id is not None:
            param.weight_loader(param, tensor, param_name, shard_id=shard, expert_id=expert_id)
            self.loaded[param_name].add((expert_id, shard))
        elif shard is not None:
            try:
                param.weight_loader(param, tensor, shard)
            except ValueError as e:  # QKVIndexParallelLinear's shape/layout checks
                raise CheckpointMismatchError(f"checkpoint tensor {ckpt_name}: {e}") from None
            self.loaded[param_name].add(shard)
        else:
            if tuple(param.shape) != tuple(tensor.shape) and not hasattr(param, "output_dim"):
                raise CheckpointMismatchError(
                    f"checkpoint tensor {ckpt_name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)} (does config.json match the weights?)")
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            self.loaded[param_name].add(None)

    def finish(self) -> None:
        unpaired = [f"{ckpt_name} (no {ckpt_name.rpartition('.')[0]}.{LEAVES[1] if leaf == 'weight' else 'weight'})"
                    for entry in self.pending.values() for leaf, (ckpt_name, _, _) in entry.items()]
        required = _required_shards(self.model, self.params)
        missing = sorted(name + self._no_tensors(name, required.get(name, set()) - self.loaded.get(name, set()))
                         for name in self.expected
                         if not self.loaded.get(name) or not required.get(name, set()) <= self.loaded[name])
        if self.unexpected or missing or unpaired:
            raise CheckpointMismatchError(_mismatch_message(self.unexpected, missing, unpaired))
        if self.skipped:
            logger.info("MiniMax-M3: skipped %d vision-tower/projector/MTP tensors (text model only).", self.skipped)


    def _no_tensors(self, param_name: str, shards: set, show: int = 4) -> str:
        """' (no <checkpoint tensors>)': the tensors that would have filled the missing `shards` of a fused
        parameter (q/k/v/index, gate/up, experts), so the error names what the checkpoint lacks; '' for none."""
        module, _, leaf = param_name.rpartition(".")
        names = []
        for shard in shards:
            if isinstance(shard, tuple):  # FusedMoE: (expert id, w1/w2/w3) of `w13_<leaf>` / `w2_<leaf>`
                names.append(f"{module}.{shard[0]}.{shard[1]}.{leaf.partition('_')[2]}")
            else:
                names += [module[: -len(fused)] + suffix + "." + leaf
                          for suffix, fused, s in _STACKED if s == shard and module.endswith(fused)]
        if not names:
            return ""
        names = sorted(self.prefix + n for n in names)
        more = f" and {len(names) - show} more" if len(names) > show else ""
        return f" (no {', '.join(names[:show])}{more})"


def load_m3_weights(model, weights: Iterable[tuple[str, torch.Tensor]], checkpoint_prefix: str = "") -> _Loader:
    """Load every tensor of `weights` into `model` (raises CheckpointMismatchError naming the offending tensors).
    Returns the loader state (tests read `max_pending`)."""
    loader = _Loader(model, checkpoint_prefix)
    for ckpt_name, tensor in weights:
        loader.feed(ckpt_name, tensor)
    loader.finish()
    return loader


def _mismatch_message(unexpected: list[str], missing: list[str], unpaired: list[str], show: int = 20) -> str:
    parts = ["MiniMax-M3 checkpoint does not match the model built from its config.json."]
    for names, what in ((unexpected, "checkpoint tensor(s) map to no parameter"),
                        (unpaired, "quantized checkpoint tensor(s) lack their partner"),
                        (missing, "parameter(s) were not (fully) loaded")):
        if names:
            parts.append(f"{len(names)} {what}: " + ", ".join(names[:show]) + (" ..." if len(names) > show else ""))
    return "\n".join(parts)
