"""MiniMax-M3 text backbone for SGLang, top-down as in M3_SPEC.md §2–§3.

    embed → [ layer_l: x + Attn_l(norm_in x) ; x + FFN_l(norm_post x) ] × L → final norm → lm_head

Attention is dense GQA on the leading layers and MSA (lightning indexer + block-sparse attention) on the
rest; both hand their tensors to the attention backend through `RadixAttention`, the sparse layers adding
their index queries/keys. FFN is the clamped-SwiGLU MLP on dense layers and the MoE block on the others.
Weight loading (name mapping, strictness) lives in `loader.py`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.utils import is_layer_skipped
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models.utils import WeightsMapper
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix

from sglang_m3.config import M3TextView, m3_text_view
from sglang_m3.layers.moe import M3MoE
from sglang_m3.layers.norm import PrecompiledGemmaRMSNorm
from sglang_m3.layers.qk_norm_rope import qk_norm_rope_, qk_norm_rope_torch
from sglang_m3.layers.qkv_index import INDEX_PARTS, PARTS, QKV_PARTS, QKVIndexParallelLinear
from sglang_m3.layers.swiglu import SwiGLUOAIMLP
from sglang_m3.quant import check_quant_config
from sglang_m3.torch_twins import use_torch_twin


def _qk_norm_and_rope(view: M3TextView, head_dim: int):
    """Per-head Gemma norms for queries and keys (`qk_norm_type: per_head`: one [head_dim] weight shared by every
    head) and the partial NeoX RoPE applied after them (§2.4, §3.1). Only the norms' weights and the rope's cos/sin
    cache are used: layers/qk_norm_rope applies both in one launch."""
    return (PrecompiledGemmaRMSNorm(head_dim, eps=view.rms_norm_eps),
            PrecompiledGemmaRMSNorm(head_dim, eps=view.rms_norm_eps), get_rope_of(view, head_dim))


class M3Attention(nn.Module):
    """§2.4 (+ §3.1 on sparse layers): q/k/v (+ index q/k) projections, per-head Gemma norms, partial NeoX RoPE.

    Dense layers project with SGLang's QKVParallelLinear. Sparse layers project q, k, v, index_q and index_k with
    one GEMM (`QKVIndexParallelLinear` as `qkv_proj`: this rank's index heads are those of its KV heads, the
    index key is replicated); only when the checkpoint quantizes q/k/v and the index pair differently (its
    ignore list names one group and not the other) do they take two layers, `qkv_proj` and `index_proj`.
    """

    def __init__(self, view: M3TextView, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
        tp_size = get_parallel().tp_size
        self.head_dim = view.head_dim
        self.num_heads = view.num_heads // tp_size
        self.num_kv_heads = max(1, view.num_kv_heads // tp_size)
        qkv_sizes = [self.num_heads * view.head_dim, self.num_kv_heads * view.head_dim,
                     self.num_kv_heads * view.head_dim]
        self.eps = view.rms_norm_eps
        # (rope module, first column, heads, norm module) of q and k in the q/k/v projection's output
        qk = [("rotary_emb", 0, self.num_heads, "q_norm"), ("rotary_emb", qkv_sizes[0], self.num_kv_heads, "k_norm")]
        self.is_sparse = view.is_sparse(layer_id)
        if self.is_sparse:
            sparse = view.sparse
            self.index_dim = sparse.index_dim
            self.num_index_heads = self.num_kv_heads  # one index head per KV head (config.py requires it)
            qkv_quant, index_quant = _projection_quant(quant_config, prefix)

            def proj(name, parts, quant):
                return QKVIndexParallelLinear(view.hidden_size, view.head_dim, view.num_heads, view.num_kv_heads,
                                              sparse.index_dim, parts=parts, quant_config=quant,
                                              prefix=add_prefix(name, prefix))

            self.index_q_norm, self.index_k_norm, self.index_rotary_emb = _qk_norm_and_rope(view, sparse.index_dim)
            index_rope = "index_rotary_emb"
            if sparse.index_dim == view.head_dim and self.index_rotary_emb is get_rope_of(view, view.head_dim):
                index_rope = "rotary_emb"  # the same SGLang rope object: index heads join q/k's launch
            index_cols = self.num_kv_heads * sparse.index_dim
            index = [(index_rope, 0, self.num_index_heads, "index_q_norm"), (index_rope, index_cols, 1, "index_k_norm")]
            if qkv_quant is index_quant:
                self.qkv_proj = proj("qkv_proj", PARTS, qkv_quant)
                shift = sum(qkv_sizes)
                self._projections = (("qkv_proj", self.qkv_proj.part_sizes,
                                      _norm_rope_spec(qk + [(r, c + shift, h, n) for r, c, h, n in index])),)
            else:
                self.qkv_proj = proj("qkv_proj", QKV_PARTS, qkv_quant)
                self.index_proj = proj("index_proj", INDEX_PARTS, index_quant)
                self._projections = (("qkv_proj", qkv_sizes, _norm_rope_spec(qk)),
                                     ("index_proj", self.index_proj.part_sizes, _norm_rope_spec(index)))
        else:
            self.qkv_proj = QKVParallelLinear(view.hidden_size, view.head_dim, view.num_heads, view.num_kv_heads,
                                              bias=False, quant_config=quant_config,
                                              prefix=add_prefix("qkv_proj", prefix))
            self._projections = (("qkv_proj", qkv_sizes, _norm_rope_spec(qk)),)
        self.o_proj = RowParallelLinear(view.num_heads * view.head_dim, view.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=add_prefix("o_proj", prefix))
        self.q_norm, self.k_norm, self.rotary_emb = _qk_norm_and_rope(view, view.head_dim)
        self._norm_rope = qk_norm_rope_torch if use_torch_twin("qk_norm_rope") else qk_norm_rope_
        self.attn = RadixAttention(self.num_heads, view.head_dim, view.head_dim ** -0.5,
                                   num_kv_heads=self.num_kv_heads, layer_id=layer_id,
                                   prefix=add_prefix("attn", prefix))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        parts = []
        for name, sizes, norm_rope in self._projections:
            y, _ = getattr(self, name)(x)
            for rope_name, groups in norm_rope:  # per-head Gemma norm, then partial NeoX RoPE (§2.4, §3.1), in place
                rope = getattr(self, rope_name)
                self._norm_rope(y, positions, rope.cos_sin_cache,
                                [(col, heads, getattr(self, norm).weight) for col, heads, norm in groups],
                                rope.rotary_dim, self.eps)
            parts += y.split(sizes, dim=-1)
        q, k, v, *index = parts
        if self.is_sparse:
            index_q, index_k = index
            out = self.attn(q, k, v, forward_batch, index_q=index_q.view(-1, self.num_index_heads, self.index_dim),
                            index_k=index_k)
        else:
            out = self.attn(q, k, v, forward_batch)
        out, _ = self.o_proj(out)
        return out


def get_rope_of(view: M3TextView, head_dim: int):
    """SGLang's (cached, shared) rope object for heads of `head_dim` (§2.4: every M3 rope is the same)."""
    return get_rope(head_dim, rotary_dim=view.rotary_dim, max_position=view.max_position_embeddings,
                    base=view.rope_theta, is_neox_style=True)


def _norm_rope_spec(entries):
    """[(rope module, first column, heads, norm module)] → [(rope module, [(first column, heads, norm module)])],
    one launch per rope module (consecutive entries merged)."""
    spec = []
    for rope, col, heads, norm in entries:
        if spec and spec[-1][0] == rope:
            spec[-1][1].append((col, heads, norm))
        else:
            spec.append((rope, [(col, heads, norm)]))
    return tuple((rope, tuple(groups)) for rope, groups in spec)


def _projection_quant(quant_config, prefix: str):
    """(quant config for q/k/v, quant config for index_q/index_k) of the sparse layer at `prefix`: `quant_config`,
    or None for a group whose checkpoint modules are all in its ignored_layers (SGLang's `is_layer_skipped`
    matching, the same test its layers apply to their own names). Raises ValueError when one group is split."""
    if quant_config is None:
        return None, None
    ignored = getattr(quant_config, "ignored_layers", None) or []
    result = []
    for group in (("q_proj", "k_proj", "v_proj"), ("index_q_proj", "index_k_proj")):
        skipped = {name: is_layer_skipped(add_prefix(name, prefix), ignored) for name in group}
        if len(set(skipped.values())) > 1:
            raise ValueError(f"{prefix}: quantization_config.ignored_layers lists only some of {group} "
                             f"({[n for n, s in skipped.items() if s]}); they share one GEMM and need one precision")
        result.append(None if any(skipped.values()) else quant_config)
    return tuple(result)


class M3DecoderLayer(nn.Module):
    """§2.3: pre-norm residual block; the residual add is fused into the next Gemma norm."""

    def __init__(self, view: M3TextView, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
        self.self_attn = M3Attention(view, layer_id, quant_config, prefix=add_prefix("self_attn", prefix))
        if view.is_moe(layer_id):
            self.block_sparse_moe = M3MoE(view, layer_id, quant_config, prefix=add_prefix("block_sparse_moe", prefix))
        else:
            self.mlp = SwiGLUOAIMLP(view.hidden_size, view.dense_intermediate_size, view.swiglu_alpha,
                                    view.swiglu_limit, quant_config=quant_config, prefix=add_prefix("mlp", prefix))
        self.is_moe = view.is_moe(layer_id)
        self.input_layernorm = PrecompiledGemmaRMSNorm(view.hidden_size, eps=view.rms_norm_eps)
        self.post_attention_layernorm = PrecompiledGemmaRMSNorm(view.hidden_size, eps=view.rms_norm_eps)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return ffn(hidden_states), residual


class M3Model(nn.Module):
    def __init__(self, view: M3TextView, quant_config=None, prefix: str = ""):
        super().__init__()
        # Embeddings and lm_head stay in the model dtype whatever the quantization (quant.py).
        self.embed_tokens = VocabParallelEmbedding(view.vocab_size, view.hidden_size,
                                                   prefix=add_prefix("embed_tokens", prefix))
        self.layers = nn.ModuleList(
            M3DecoderLayer(view, i, quant_config, prefix=add_prefix(f"layers.{i}", prefix))
            for i in range(view.num_layers))
        self.norm = PrecompiledGemmaRMSNorm(view.hidden_size, eps=view.rms_norm_eps)
        self.start_layer, self.end_layer = 0, view.num_layers
        self.layers_to_capture: tuple[int, ...] = ()  # EAGLE3: residual stream entering these layers

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        """Final hidden states [T, H]; with layers to capture, also the list of captured residual streams."""
        hidden_states = self.embed_tokens(input_ids) if input_embeds is None else input_embeds  # no √H scaling
        residual = None
        aux = []
        for i, layer in enumerate(self.layers):
            if i in self.layers_to_capture:
                aux.append(hidden_states if residual is None else hidden_states + residual)
            hidden_states, residual = layer(positions, hidden_states, forward_batch, residual)
        if len(self.layers) in self.layers_to_capture:  # the stream after the last layer (before the final norm)
            aux.append(hidden_states + residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return (hidden_states, aux) if self.layers_to_capture else hidden_states


class MiniMaxM3SparseForCausalLM(nn.Module):
    """The text model, flat packaging (`model.*`, `lm_head.*`)."""

    # Prefix of the text tensors inside the checkpoint; the VL packaging nests them under `language_model.`.
    checkpoint_prefix = ""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        check_quant_config(quant_config)  # quant.py: what is served, which modules take it
        self.config, self.quant_config = config, quant_config
        self.view = m3_text_view(config)
        self.model = M3Model(self.view, quant_config, prefix=add_prefix("model", prefix))
        self.lm_head = ParallelLMHead(self.view.vocab_size, self.view.hidden_size, prefix=add_prefix("lm_head", prefix))
        self.logits_processor = LogitsProcessor(_text_config(config))

    @property
    def start_layer(self) -> int:
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    # ---- EAGLE3 target interface (SGLang 0.5.17: eagle_worker_v2.init_lm_head, spec_aux_hidden_state) ----------
    def get_embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding weight [V/tp, H], lm_head weight [V/tp, H]): the EAGLE3 draft shares the embedding."""
        return self.model.embed_tokens.weight, self.lm_head.weight

    def set_eagle3_layers_to_capture(self, layer_ids: Optional[list[int]] = None) -> None:
        """Capture the residual stream for an EAGLE3 draft, fed to it through the logits processor.

        layer_ids are the draft config's `eagle_aux_hidden_state_layer_ids`: id i is the output of layer i, i.e. the
        stream entering layer i + 1 (SGLang's convention). None: entering layers 2, L/2 and L-3 (M3_SPEC §6.2).
        """
        n = self.view.num_layers
        capture = [2, n // 2, n - 3] if layer_ids is None else [i + 1 for i in layer_ids]
        if not all(0 <= i <= n for i in capture) or len(set(capture)) != len(capture):
            given = (f"eagle_aux_hidden_state_layer_ids {layer_ids}" if layer_ids is not None else
                     f"the default (streams entering layers 2, L/2, L-3 = {capture}: set "
                     "eagle_aux_hidden_state_layer_ids in the draft config)")
            raise ValueError(f"EAGLE3 aux hidden states of a {n}-layer model must be distinct and within its layers; "
                             f"got {given}")
        self.model.layers_to_capture = tuple(capture)

    @property
    def capture_aux_hidden_states(self) -> bool:
        """SGLang's flag (read by its runners) for a `.model` that returns (hidden states, aux hidden states)."""
        return bool(self.model.layers_to_capture)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None, **_):
        hidden_states = self.model(input_ids, positions, forward_batch, input_embeds)
        aux = None
        if self.model.layers_to_capture:
            hidden_states, aux = hidden_states
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch, aux)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from sglang_m3.loader import load_m3_weights

        load_m3_weights(self, weights, checkpoint_prefix=self.checkpoint_prefix)


class MiniMaxM3SparseForConditionalGeneration(MiniMaxM3SparseForCausalLM):
    """The released VL packaging served as a text model: text tensors under `language_model.`, vision skipped.

    Image inputs are not supported; SGLang is told this architecture is text-only (plugin.py), so an image part
    in a chat request gets SGLang's own 400 from its OpenAI chat route, and `/generate`'s image/video/audio data a
    400 from request_validation.py, instead of being silently dropped.
    """

    checkpoint_prefix = "language_model."
    # SGLang maps the quant config's ignored_layers through this (checkpoint names → module names).
    hf_to_sglang_mapper = WeightsMapper(orig_to_new_prefix={checkpoint_prefix: ""})


def _text_config(config):
    return getattr(config, "text_config", None) or config


EntryClass = [MiniMaxM3SparseForCausalLM, MiniMaxM3SparseForConditionalGeneration]
