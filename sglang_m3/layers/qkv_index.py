"""One column-parallel GEMM for the projections of an MSA layer: q, k, v, index_q and index_k (M3_SPEC §2.4, §3.1).

Per TP rank the output is the concatenation, in this order, of

    q        [num_heads/tp · head_dim]           rank r holds q heads r·num_heads/tp ...      (split like SGLang's QKV)
    k, v     [kv_local · head_dim]  each         the KV heads of this rank (replicated when tp > num_kv_heads)
    index_q  [kv_local · index_dim]              the index heads of those same KV heads (one index head per KV
                                                 head, §3.1/§3.5: selection is per KV group)
    index_k  [index_dim]                         the single shared index-key head, on every rank

with kv_local = max(1, num_kv_heads / tp). The checkpoint keeps the five as separate tensors
(`q_proj`, `k_proj`, `v_proj`, `index_q_proj`, `index_k_proj`, §4.1); the loader feeds each with its shard id
(the part name) and `weight_loader` copies this rank's rows of it into the part's rows of the fused parameter.

Quantized weights take the same layout row for row: SGLang's quant method creates the fused `weight` (and, for
block FP8, `weight_scale_inv` with one row per 128 weight rows; for native MXFP8 one row per weight row), and the
loader puts each part's scale rows at the part's offset divided by the block height. Every part of M3's layout is a
multiple of 128 rows, so blocks never straddle two parts (SGLang's `validate_block_quant_shapes` refuses a layout
where they would). Per-tensor scales (one per checkpoint tensor) are not supported: no served checkpoint has them.

`parts` may be a subset (in this order): the model builds q/k/v and the index pair as two layers when the
checkpoint's ignore list quantizes one and not the other (model.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from sglang.srt.layers.linear import ColumnParallelLinear
from sglang.srt.layers.parameter import BlockQuantScaleParameter
from sglang.srt.runtime_context import get_parallel

PARTS = ("q", "k", "v", "index_q", "index_k")
QKV_PARTS, INDEX_PARTS = PARTS[:3], PARTS[3:]


class QKVIndexParallelLinear(ColumnParallelLinear):
    """Fused q | k | v | index_q | index_k projection of one MSA layer (or a contiguous subset of the parts).

    Args: hidden_size H, head_dim D, num_heads / num_kv_heads (whole model), index_dim Di, parts (subset of
    PARTS, in order), quant_config (SGLang's, or None), prefix (module name, for the quant config and errors).
    forward(x [T, H]) → (y [T, sum(part_sizes)], None), y's columns split by `part_sizes` in `parts` order.
    Raises ValueError at construction when the heads cannot be split over the TP ranks as SGLang's
    QKVParallelLinear would split them.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, index_dim: int,
                 parts: tuple[str, ...] = PARTS, quant_config=None, prefix: str = ""):
        tp_rank, tp_size = get_parallel().tp_rank, get_parallel().tp_size
        if tuple(p for p in PARTS if p in parts) != tuple(parts) or not parts:
            raise ValueError(f"{prefix}: parts {parts} must be a non-empty subsequence of {PARTS}")
        if num_heads % tp_size or (num_kv_heads % tp_size and tp_size % num_kv_heads):
            raise ValueError(f"{prefix}: {num_heads} query / {num_kv_heads} KV heads cannot be split over TP {tp_size}")
        kv_local = max(1, num_kv_heads // tp_size)
        kv_shard = tp_rank // max(1, tp_size // num_kv_heads)  # which KV heads (as QKVParallelLinear picks them)
        # part -> (rows on this rank, rows of the checkpoint tensor, index of this rank's slice of those rows)
        layout = {
            "q": (num_heads // tp_size * head_dim, num_heads * head_dim, tp_rank),
            "k": (kv_local * head_dim, num_kv_heads * head_dim, kv_shard),
            "v": (kv_local * head_dim, num_kv_heads * head_dim, kv_shard),
            "index_q": (kv_local * index_dim, num_kv_heads * index_dim, kv_shard),
            "index_k": (index_dim, index_dim, 0),
        }
        self.parts = tuple(parts)
        self.layout = {p: layout[p] for p in self.parts}
        self.part_sizes = [self.layout[p][0] for p in self.parts]
        self.part_offsets = dict(zip(self.parts, [sum(self.part_sizes[:i]) for i in range(len(self.parts))]))
        # ColumnParallelLinear divides these by tp_size for the quant method's per-rank partition sizes.
        self.output_sizes = [size * tp_size for size in self.part_sizes]
        super().__init__(hidden_size, sum(self.output_sizes), bias=False, gather_output=False,
                         quant_config=quant_config, prefix=prefix, tp_rank=tp_rank, tp_size=tp_size)
        self.prefix = prefix

    def _rows_per_param_row(self, param: torch.nn.Parameter) -> int:
        """How many weight rows one row of `param` covers: 1 for weights and per-row (MXFP8) scales, the block
        height for block-FP8 scales."""
        if isinstance(param, BlockQuantScaleParameter) and not getattr(param, "format_ue8m0", False):
            return self.quant_method.quant_config.weight_block_size[0]
        return 1

    def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Optional[str] = None) -> None:
        """Copy this rank's rows of checkpoint tensor `loaded_weight` (the whole, unsharded part `loaded_shard_id`:
        a weight [rows, H] or its block scale) into the part's rows of `param`.

        Raises ValueError for an unknown part, a tensor whose shape is not the part's full shape, or a layout the
        scale blocks do not tile; NotImplementedError for a parameter without an output dim (per-tensor scales).
        """
        if loaded_shard_id not in self.layout:
            raise ValueError(f"{self.prefix}: no part {loaded_shard_id!r} (this layer holds {self.parts})")
        dim = getattr(param, "output_dim", None)
        if dim is None:
            raise NotImplementedError(f"{self.prefix}: cannot load {type(param).__name__} (no output dim; per-tensor "
                                      "scales are not supported by the fused q/k/v/index projection)")
        block = self._rows_per_param_row(param)
        rows, full_rows, shard = self.layout[loaded_shard_id]
        offset = self.part_offsets[loaded_shard_id]
        if rows % block or full_rows % block or offset % block:
            raise ValueError(f"{self.prefix}: part {loaded_shard_id} ({rows} rows at {offset}) does not tile into "
                             f"scale blocks of {block} rows")
        rows, full_rows, offset = rows // block, full_rows // block, offset // block
        want = list(param.shape)
        want[dim] = full_rows
        if list(loaded_weight.shape) != want:
            raise ValueError(f"{self.prefix}: {loaded_shard_id} tensor has shape {tuple(loaded_weight.shape)}, "
                             f"expected {tuple(want)}")
        param.data.narrow(dim, offset, rows).copy_(loaded_weight.narrow(dim, shard * rows, rows))

    weight_loader_v2 = weight_loader  # the quant methods SGLang routes through weight_loader_v2 (Fp8LinearMethod)
