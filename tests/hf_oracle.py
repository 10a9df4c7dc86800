"""HF-transformers oracle for tiny MiniMax-M3 checkpoints (test helper; transformers is *used*, not copied).

    from tests.hf_oracle import hf_model, hf_logits, hf_greedy
    logits = hf_logits(ckpt_dir, input_ids)      # [T, vocab] float32, CPU, eager attention
    tokens = hf_greedy(ckpt_dir, input_ids, 32)  # greedy continuation through HF's KV/index-key cache

Loading path (transformers 5.12.1, ``transformers/models/minimax_m3_vl/``):

- VL packaging (``model_type: minimax_m3_vl``, tensors under ``language_model.``, the release's layout):
  ``MiniMaxM3SparseForConditionalGeneration.from_pretrained(dir, dtype=float32)`` — the class
  ``AutoModelForImageTextToText`` maps ``minimax_m3_vl`` to. transformers loads the *released* names itself
  through its conversion mapping for ``minimax_m3_vl`` (``transformers/conversion_mapping.py``):
  ``language_model.model.`` -> ``model.language_model.``, ``language_model.lm_head`` -> ``lm_head``;
  ``block_sparse_moe.{gate.weight,e_score_correction_bias}`` -> ``mlp.gate.{weight,e_score_correction_bias}``;
  per-expert ``w1``/``w3`` -> stacked ``mlp.experts.gate_up_proj [E, 2I, H]`` (``MergeModulelist`` then
  ``Concatenate(dim=1)``: gate rows first, then up rows), ``w2`` -> ``mlp.experts.down_proj [E, H, I]``;
  dense ``mlp.{gate,up}_proj`` and ``shared_experts.{gate,up}_proj`` -> fused ``gate_up_proj`` ([gate; up]);
  ``self_attn.index_{q,k}_{proj,norm}`` -> ``self_attn.indexer.{q,k}_{proj,norm}``; vision:
  ``vision_tower.vision_model.{embeddings.patch_embedding,encoder.layers,pre_layrnorm}`` ->
  ``model.vision_tower.{embeddings.proj,layers,pre_layrnorm}``, ``multi_modal_projector.linear_{1,2}`` ->
  ``model.multi_modal_projector.linear_{1,2}``, ``patch_merge_mlp.linear_{1,2}`` ->
  ``model.multi_modal_projector.merge_linear_{1,2}``. With the tiny writer's checkpoint this load reports
  **no missing, no unexpected and no mismatched keys** (the tiny VL checkpoint carries a complete vision
  tower). The only non-loaded state is non-persistent buffers (rotary ``inv_freq``), which are not keys.
- Flat packaging (``model_type: minimax_m3``, no prefix): transformers has no config class for
  ``minimax_m3`` and its conversion mapping is keyed on ``minimax_m3_vl`` and on the ``.language_model.``
  prefix, so ``from_pretrained`` cannot load released flat names. The oracle builds
  ``MiniMaxM3VLTextConfig(**text_config)`` and ``MiniMaxM3VLForCausalLM`` (text-only class, fp32, eager) and
  converts the released names itself (``released_to_hf``: the same renames/stacking as above), then
  ``load_state_dict`` and asserts no missing/unexpected keys. ``hf_model(dir, text_only=True)`` takes this
  path for a VL checkpoint too (vision tensors are then skipped on purpose).

What the HF implementation does (read in ``modeling_minimax_m3_vl.py`` / ``configuration_minimax_m3_vl.py``):

- **Index-head pooling**: ``MiniMaxM3VLIndexer.forward`` computes token scores ``iq·ik`` (fp32, no scale,
  -inf for future keys), max-pools per block, and then ``block_scores = scores.amax(-1).amax(dim=1)`` —
  it *also max-pools over the index heads*, so one block selection ``[B, S_q, topk]`` is shared by all KV
  heads (build_block_mask broadcasts it over every head). True M3 MSA (spec §3.3-3.5) selects per index
  head = per KV group. HF therefore equals per-group MSA only when there is one index head
  (``--num-kv-heads 1``) or when every query sees ≤ topk blocks (T ≤ topk·block_size, where MSA is dense).
  ``hf_is_exact_msa(cfg, T)`` says which case applies.
  ``per_kv_group=True`` (``hf_model``/``hf_logits``/``hf_greedy``) replaces that selection with the spec's
  (see "Per-KV-group MSA patch" below), which makes the oracle exact at any number of KV heads.
- Block selection uses the config: ``index_block_size`` <- ``sparse_block_size``, ``index_topk_blocks`` <-
  ``sparse_topk_blocks``, ``index_local_blocks`` <- ``sparse_local_block`` (own block forced with +inf),
  ``index_n_heads``/``index_head_dim`` <- ``sparse_num_index_heads``/``sparse_index_dim``. Blocks are
  anchored at absolute key positions; K = min(topk, visible blocks); future blocks -> -1.
  Not read: ``sparse_init_block`` (HF assumes 0 = M3), ``sparse_score_type`` (always max = M3),
  ``sparse_disable_index_value`` (no value branch = M3), ``use_sparse_attention``.
- Layer kinds: ``layer_types`` from ``sparse_attention_freq``, ``mlp_layer_types`` from ``moe_layer_freq``.
- RoPE: partial NeoX (rotate-half) over ``int(head_dim * partial_rotary_factor)`` channels — it reads
  ``partial_rotary_factor``, *not* ``rotary_dim`` (the tiny writer keeps both consistent); the indexer uses
  the same cos/sin (``cos[..., :index_head_dim]``). QK norm per head before RoPE, Gemma RMSNorm (1+w) in fp32.
- SwiGLU-OAI: ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``, ``(up + 1) * gate * sigmoid(alpha*gate)``,
  gate/up halves un-interleaved (``chunk(2)``); ``hidden_act`` is normalised to ``silu`` and ignored.
- Routing: ``F.linear(x.to(router_dtype), W)`` (fp32 router stays fp32), ``sigmoid``, top-k on
  ``scores + e_score_correction_bias`` (bias only for selection), renormalise without eps, multiply the routed
  sum by ``routed_scaling_factor``, add the shared expert (``shared_intermediate_size``) unscaled.
- Chat template: transformers ships none for M3 (no template in the model code; the processor only expands
  ``]<]image[>[``/``]<]video[>[`` with ``]<]start of image[>[``/``]<]end of image[>[`` brackets); the
  template comes from the checkpoint's tokenizer files (here: ``sglang_m3.tiny.CHAT_TEMPLATE``).
- ``bos_token_id``/``eos_token_id`` default to 200034/200020 in ``MiniMaxM3VLTextConfig``; the tiny writer
  puts its own ids into the configs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch


def read_config(ckpt_dir) -> tuple[dict, bool]:
    """(text_config dict, is_vl) of a checkpoint directory."""
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    if "text_config" in cfg:
        return cfg["text_config"], True
    return cfg, False


def hf_is_exact_msa(text_config: dict, seq_len: int) -> bool:
    """True when HF's head-pooled block selection equals per-KV-group MSA for a sequence of seq_len tokens."""
    sp = text_config["sparse_attention_config"]
    return sp["sparse_num_index_heads"] == 1 or seq_len <= sp["sparse_topk_blocks"] * sp["sparse_block_size"]


def released_to_hf(tensors: dict[str, torch.Tensor], text_config: dict) -> dict[str, torch.Tensor]:
    """Released text tensor names (``language_model.`` prefix optional) -> ``MiniMaxM3VLForCausalLM`` state dict.

    Same renames/stacking as transformers' ``minimax_m3_vl`` conversion mapping; non-text tensors are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("language_model."):
            name = name[len("language_model."):]
        elif name.startswith(("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")):
            continue
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[3] == "block_sparse_moe":
            layer, rest = int(parts[2]), parts[4:]
            p = f"model.layers.{layer}.mlp."
            if rest[0] == "experts":  # experts.{e}.w{1,2,3}.weight
                experts.setdefault((layer, rest[2]), {})[int(rest[1])] = t
                continue
            if rest == ["gate", "weight"]:
                name = p + "gate.weight"
            elif rest == ["e_score_correction_bias"]:
                name = p + "gate.e_score_correction_bias"
            elif rest[0] == "shared_experts":
                name = p + "shared_experts." + ".".join(rest[1:])
            else:
                raise KeyError(name)
        elif ".self_attn.index_" in name:
            name = name.replace(".self_attn.index_", ".self_attn.indexer.")
        out[name] = t
    # fuse [gate; up] pairs of the dense MLPs and shared experts
    for name in [n for n in out if n.endswith(".gate_proj.weight")]:
        up = name.replace(".gate_proj.", ".up_proj.")
        out[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([out.pop(name), out.pop(up)], dim=0)
    n_exp = text_config["num_local_experts"]
    for layer in sorted({layer for layer, _ in experts}):
        w = {k: [experts[(layer, k)][e] for e in range(n_exp)] for k in ("w1", "w2", "w3")}
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(w["w1"], w["w3"])])
        out[p + "down_proj"] = torch.stack(w["w2"])
    return out


# ---- Per-KV-group MSA patch ------------------------------------------------------------------------------
# Written from M3_SPEC.md §3.2-3.6 (not from sglang_m3): for index head h, query position p, key j <= p,
#   s_h(p, j) = <iq_h(p), ik(j)>                       (§3.2; no scale, -inf for j > p)
#   score_h(p, b) = max_{j in block b, j <= p} s_h(p, j)   (§3.3; pooled over tokens only, NOT over heads)
#   nb(p) = p // block + 1; forced = {b < init} U {b >= nb(p) - local}; K(p) = min(topk, nb(p))
#   sel_h(p) = the K(p) visible blocks with the largest score, forced ones first   (§3.4)
# and query head q attends to the keys j <= p whose block is in sel_{q // group}(p)   (§3.5-3.6, group =
# heads / KV heads, so index head g selects for KV group g). Scores are computed in float64 so that the
# oracle's selection is the exact one for the fp32 model (the server scores in fp32: a near-tie may flip;
# the tests' prompts are checked not to sit on one, see tests/test_oracle_kv_heads.py).


# Smallest score gap (float64) between a selected and a dropped block, one entry per patched indexer call:
# a server scoring in fp32 may pick differently only where this gap is at fp32 rounding level.
SELECTION_GAPS: list[float] = []


def _per_group_indexer_forward(self, hidden_states, position_embeddings, past_key_values, position_ids):
    """Replacement of ``MiniMaxM3VLIndexer.forward``: block ids [B, H_idx, S_q, topk] int64, -1 = unused.

    The projections, norms and RoPE are HF's own modules (spec §3.1); only the selection differs.
    """
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import apply_rotary_pos_emb

    batch, q_len, _ = hidden_states.shape
    iq = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)).transpose(1, 2)
    ik = self.k_norm(self.k_proj(hidden_states).view(batch, q_len, 1, self.head_dim)).transpose(1, 2)
    cos, sin = position_embeddings
    iq, ik = apply_rotary_pos_emb(iq, ik, cos[..., : self.head_dim], sin[..., : self.head_dim])
    if past_key_values is not None:
        ik = past_key_values.layers[self.layer_idx].update_index(ik)

    bs, k_len = self.block_size, ik.shape[2]
    n_blk = -(-k_len // bs)
    pos = position_ids  # [B, S_q] absolute positions of the queries
    s = torch.matmul(iq.double(), ik.double().transpose(-1, -2))  # [B, H, S_q, S_k]
    key_pos = torch.arange(n_blk * bs, device=s.device)
    s = torch.nn.functional.pad(s, (0, n_blk * bs - k_len), value=float("-inf"))
    s = s.masked_fill(key_pos[None, None, None, :] > pos[:, None, :, None], float("-inf"))
    score = s.view(*s.shape[:3], n_blk, bs).amax(-1)  # [B, H, S_q, n_blk]: per head, max over tokens
    blk = torch.arange(n_blk, device=s.device)
    nb = (pos // bs + 1)[:, None, :, None]  # [B, 1, S_q, 1]
    visible = blk < nb
    forced = visible & ((blk < self.init_blocks) | (blk >= nb - self.local_blocks))
    score = score.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    width = min(self.topk_blocks, n_blk)
    if n_blk > width:  # gap between the last selected and the first dropped block, where both are scored
        vals = score.topk(width + 1, dim=-1).values
        last, first_out = vals[..., width - 1], vals[..., width]
        gap = (last - first_out)[torch.isfinite(last) & torch.isfinite(first_out)]
        if gap.numel():
            SELECTION_GAPS.append(gap.min().item())
    top = score.topk(width, dim=-1)
    ids = top.indices.masked_fill(top.values == float("-inf"), -1)  # K(p) < width: the rest are invisible
    # K(p) = min(topk, nb(p)): never fewer than K(p) visible picks, never an invisible one.
    assert bool(((ids >= 0).sum(-1) == torch.clamp(nb[..., 0], max=self.topk_blocks)).all())
    return ids


def _per_group_block_mask(self, block_indices, attention_mask, key_length, dtype, device, position_ids):
    """Replacement of ``MiniMaxM3VLIndexer.build_block_mask``: additive mask [B, H_q, S_q, S_k], query head q
    reading the selection of index head q // (H_q / H_idx) and keys j <= p only."""
    batch, heads, q_len, _ = block_indices.shape
    n_blk = -(-key_length // self.block_size)
    safe = block_indices.masked_fill(block_indices < 0, n_blk)
    keep_blk = torch.zeros((batch, heads, q_len, n_blk + 1), dtype=torch.bool, device=device)
    keep_blk.scatter_(-1, safe, True)
    key_pos = torch.arange(key_length, device=device)
    keep = keep_blk[..., key_pos // self.block_size]  # [B, H_idx, S_q, S_k]
    keep = keep & ~(key_pos[None, None, None, :] > position_ids[:, None, :, None])
    if attention_mask is not None:  # padding (the causal part is already in `keep`)
        keep = keep & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    group = self.config.num_attention_heads // heads
    keep = keep.repeat_interleave(group, dim=1)  # q head q -> KV group q // group (spec §2.4, §3.5)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def _patch_per_kv_group(model, text_config: dict) -> None:
    """Make every indexer of ``model`` select per index head = per KV group (spec §3.4-3.5)."""
    import types

    sp = text_config["sparse_attention_config"]
    assert sp["sparse_num_index_heads"] == text_config["num_key_value_heads"], "one index head per KV group"
    assert sp.get("sparse_score_type", "max") == "max"
    n = 0
    for module in model.modules():
        if type(module).__name__ == "MiniMaxM3VLIndexer":
            module.init_blocks = sp.get("sparse_init_block", 0)  # HF has no field for it (assumes 0)
            module.forward = types.MethodType(_per_group_indexer_forward, module)
            module.build_block_mask = types.MethodType(_per_group_block_mask, module)
            n += 1
    assert n == sum(1 for f in sp["sparse_attention_freq"] if f), f"patched {n} indexers"


def _hf_text_config(text_config: dict):
    from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig

    kwargs = {k: v for k, v in text_config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return MiniMaxM3VLTextConfig(**kwargs)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float, text_only: bool, per_kv_group: bool):
    from safetensors.torch import load_file
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
        MiniMaxM3SparseForConditionalGeneration,
        MiniMaxM3VLForCausalLM,
    )

    text_config, is_vl = read_config(path)
    if is_vl and not text_only:
        model, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}  # missing/unexpected/mismatched keys, error_msgs
        assert not problems, f"HF VL load of {path} is not clean: {problems}"
    else:
        model = MiniMaxM3VLForCausalLM._from_config(
            _hf_text_config(text_config), dtype=torch.float32, attn_implementation="eager")
        sd = released_to_hf(load_file(str(Path(path) / "model.safetensors")), text_config)
        sd = {k: v.to(torch.float32) for k, v in sd.items()}
        result = model.load_state_dict(sd, strict=False)
        assert not result.missing_keys and not result.unexpected_keys, (
            f"HF text load of {path}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    if per_kv_group:
        _patch_per_kv_group(model, text_config)
    return model.eval()


def hf_model(ckpt_dir, *, text_only: bool = False, per_kv_group: bool = False):
    """The HF model for a tiny checkpoint (float32, CPU, eager attention), cached per path and file mtime.

    VL packaging -> MiniMaxM3SparseForConditionalGeneration via from_pretrained (released names, HF's own
    conversion); flat packaging or text_only=True -> MiniMaxM3VLForCausalLM with ``released_to_hf``.
    per_kv_group=True: the indexers select per KV group as M3_SPEC.md §3.4-3.5 says (``_patch_per_kv_group``)
    instead of HF's selection pooled over index heads; exact MSA at any number of KV heads.
    Raises AssertionError if any key is missing or unexpected.
    """
    path = Path(ckpt_dir).resolve()
    return _load(str(path), (path / "model.safetensors").stat().st_mtime, text_only, per_kv_group)


@torch.no_grad()
def hf_logits(ckpt_dir, input_ids: list[int], *, text_only: bool = False, per_kv_group: bool = False) -> torch.Tensor:
    """Logits [T, vocab] float32 of one sequence (positions 0..T-1, no cache); per_kv_group: see hf_model."""
    model = hf_model(ckpt_dir, text_only=text_only, per_kv_group=per_kv_group)
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(ckpt_dir, input_ids: list[int], max_new_tokens: int, *, use_cache: bool = True,
              text_only: bool = False, per_kv_group: bool = False) -> list[int]:
    """Greedy continuation of exactly max_new_tokens tokens (EOS does not stop it).

    use_cache=True runs HF's own incremental decode (DynamicCache with the sparse layers' index-key cache);
    use_cache=False recomputes the whole sequence every step (the plain definition; slow). Both agree on
    the tiny checkpoints, also past the dense region (see test_tiny.py).
    """
    model = hf_model(ckpt_dir, text_only=text_only, per_kv_group=per_kv_group)
    ids = list(input_ids)
    if not use_cache:
        for _ in range(max_new_tokens):
            ids.append(int(hf_logits(ckpt_dir, ids, text_only=text_only, per_kv_group=per_kv_group)[-1].argmax()))
        return ids[len(input_ids):]
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    for step in range(max_new_tokens):
        ids.append(int(out.logits[0, -1].argmax()))
        if step + 1 < max_new_tokens:
            out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return ids[len(input_ids):]
