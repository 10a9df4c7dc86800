"""SGLang attention backend for MiniMax-M3: dense layers through an SGLang backend, sparse (MSA) layers here.

Sparse layer, any forward mode (extend with cached prefix, chunked prefill, decode, mixed):
  1. write k, v and the index key of the new tokens at `out_cache_loc` (update before indexing: a token's
     own key takes part in its block scores);
  2. indexer: top-k key blocks per new token and KV group, reading every visible index key through
     `req_to_token` (so radix-cache prefixes and earlier chunks are read from their slots);
  3. block-sparse attention of each query head over its group's blocks.
The torch twins in `reference.py` run steps 2–3 on CPU; the Triton kernels replace them on CUDA.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

import os

from sglang_m3.attention import reference
from sglang_m3.config import m3_text_view

logger = logging.getLogger(__name__)


class M3SparseAttnBackend(AttentionBackend):
    def __init__(self, model_runner, dense_backend: AttentionBackend):
        super().__init__()
        self.dense = dense_backend
        view = m3_text_view(model_runner.model_config.hf_config)
        self.sparse = view.sparse
        self.sparse_layer_ids = frozenset(view.sparse_layers)
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.device = model_runner.device
        self._meta = None
        logger.info("sglang-m3 MSA backend: %d sparse layers (block %d, top-%d), dense layers via %s",
                    len(self.sparse_layer_ids), self.sparse.block_size, self.sparse.topk_blocks,
                    type(dense_backend).__name__)

    # Attributes the model runner reads off its backend (forward_metadata, capability flags, ...) come
    # from the dense backend, which handles every non-sparse layer.
    def __getattr__(self, name):
        if name == "dense":
            raise AttributeError(name)
        return getattr(self.dense, name)

    # ---- metadata -----------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        self.dense.init_forward_metadata(forward_batch)
        self._meta = self._sparse_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        self.dense.init_forward_metadata_in_graph(forward_batch)
        self._meta = self._sparse_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    def on_after_cuda_graph_warmup(self):
        self.dense.on_after_cuda_graph_warmup()

    def _sparse_metadata(self, fb):
        """Per-request layout of the new tokens, in the form `reference.py`'s functions take."""
        bs = fb.req_pool_indices.shape[0]
        if fb.forward_mode.is_decode_or_idle():
            extend_seq_lens = torch.ones(bs, dtype=torch.int32, device=fb.seq_lens.device)
            extend_start_loc = torch.arange(bs, dtype=torch.int32, device=fb.seq_lens.device)
        else:
            extend_seq_lens, extend_start_loc = fb.extend_seq_lens, fb.extend_start_loc
        return dict(req_to_token=self.req_to_token_pool.req_to_token, req_pool_indices=fb.req_pool_indices,
                    seq_lens=fb.seq_lens, extend_seq_lens=extend_seq_lens, extend_start_loc=extend_start_loc)

    # ---- forward ------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, index_q=None, index_k=None, **kw):
        if layer.layer_id not in self.sparse_layer_ids:
            return self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        return self._forward_sparse(q, k, v, layer, forward_batch, index_q, index_k)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, index_q=None, index_k=None, **kw):
        if layer.layer_id not in self.sparse_layer_ids:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        return self._forward_sparse(q, k, v, layer, forward_batch, index_q, index_k)

    def _forward_sparse(self, q, k, v, layer, fb, index_q, index_k):
        if index_q is None or index_k is None:
            raise ValueError(f"sparse layer {layer.layer_id} called without index_q/index_k")
        pool = self.token_to_kv_pool
        # K/V and the index key are always stored together: a later token (or a radix-cache hit) reads both.
        pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        pool.set_index_k_buffer(layer.layer_id, fb.out_cache_loc, index_k)

        tokens = q.shape[0]
        meta = self._meta
        block_topk = reference.index_block_topk(
            index_q, pool.get_index_k_buffer(layer.layer_id), **meta, block_size=self.sparse.block_size,
            topk_blocks=self.sparse.topk_blocks, init_blocks=self.sparse.init_blocks,
            local_blocks=self.sparse.local_blocks)
        out = reference.sparse_attention(
            q.view(tokens, layer.tp_q_head_num, layer.qk_head_dim), pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id), **meta, block_topk=block_topk,
            block_size=self.sparse.block_size, sm_scale=layer.scaling)
        return out.reshape(tokens, layer.tp_q_head_num * layer.v_head_dim)
