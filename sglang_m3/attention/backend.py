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
import os

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.runtime_context import get_parallel

from sglang_m3.attention import kernels, reference
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
        self.device = torch.device(model_runner.device)
        # Per-rank head counts, as the pool and the attention layers see them.
        self.num_kv_heads = self.token_to_kv_pool.head_num
        self.head_dim = self.token_to_kv_pool.head_dim
        self.num_q_heads = view.num_heads // get_parallel().tp_size
        # The Triton kernels on CUDA; the torch reference on CPU (or on CUDA when asked, as an oracle).
        self.use_kernels = self.device.type == "cuda" and os.environ.get("SGLANG_M3_SPARSE_IMPL", "triton") != "torch"
        self.impl = kernels if self.use_kernels else reference
        self._meta = None
        self._workspace = None        # None: scratch from the caching allocator (eager)
        self._graph_workspace = None  # fixed addresses for captured decode graphs
        self._graph_block_topk = None
        logger.info("sglang-m3 MSA backend: %d sparse layers (block %d, top-%d) via %s, dense layers via %s",
                    len(self.sparse_layer_ids), self.sparse.block_size, self.sparse.topk_blocks,
                    "Triton kernels" if self.use_kernels else "torch reference", type(dense_backend).__name__)

    # Attributes the model runner reads off its backend (forward_metadata, capability flags, ...) come
    # from the dense backend, which handles every non-sparse layer.
    def __getattr__(self, name):
        if name == "dense":
            raise AttributeError(name)
        return getattr(self.dense, name)

    # ---- metadata (plan once per forward; every sparse layer reuses it) -----------------------------
    def init_forward_metadata(self, forward_batch):
        self.dense.init_forward_metadata(forward_batch)
        self._workspace = None
        self._meta = self._sparse_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        # Captured: device-only work on static shapes; replays recompute it from the new seq_lens.
        self.dense.init_forward_metadata_in_graph(forward_batch)
        self._workspace = self._graph_workspace
        self._meta = self._sparse_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
        if not self.use_kernels:
            return
        # Compile every kernel variant and size the scratch for the longest context before any capture:
        # a captured graph keeps the workspace's addresses, so it must never grow afterwards.
        self._graph_workspace = kernels.MSAWorkspace(self.device)
        kernels.warmup(self._graph_workspace, batch_sizes=range(1, max_bs + 1), num_q_heads=self.num_q_heads,
                       num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                       head_dim_v=self.token_to_kv_pool.v_head_dim, index_dim=self.sparse.index_dim,
                       block_size=self.sparse.block_size, topk_blocks=self.sparse.topk_blocks,
                       init_blocks=self.sparse.init_blocks, local_blocks=self.sparse.local_blocks,
                       dtype=self.token_to_kv_pool.dtype, device=self.device,
                       context_len=self.req_to_token_pool.req_to_token.shape[1])
        self._graph_workspace.freeze()
        self._graph_block_topk = torch.full((max_bs, self.num_kv_heads, self.sparse.topk_blocks), -1,
                                            dtype=torch.int32, device=self.device)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    def on_after_cuda_graph_warmup(self):
        self.dense.on_after_cuda_graph_warmup()

    def _sparse_metadata(self, fb):
        """Where each new token sits (request row, position), in the form the MSA functions take."""
        decode = fb.forward_mode.is_decode_or_idle()
        seq_lens = fb.seq_lens
        if decode and not self.use_kernels:
            bs = seq_lens.shape[0]
            extend_seq_lens = torch.ones(bs, dtype=torch.int32, device=seq_lens.device)
            extend_start_loc = torch.arange(bs, dtype=torch.int32, device=seq_lens.device)
        elif decode:
            extend_seq_lens = extend_start_loc = None  # the kernels' graph-safe decode form
        else:
            extend_seq_lens, extend_start_loc = fb.extend_seq_lens, fb.extend_start_loc
        meta = dict(req_to_token=self.req_to_token_pool.req_to_token, req_pool_indices=fb.req_pool_indices,
                    seq_lens=seq_lens, extend_seq_lens=extend_seq_lens, extend_start_loc=extend_start_loc)
        plan = {}
        if self.use_kernels:
            plan["meta"] = kernels.prepare_meta(fb.req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc,
                                                fb.out_cache_loc.shape[0], index_heads=self.num_kv_heads,
                                                workspace=self._workspace)
            plan["workspace"] = self._workspace
        return meta, plan

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
        self.impl.store_index_k(pool.get_index_k_buffer(layer.layer_id), fb.out_cache_loc, index_k)

        tokens = q.shape[0]
        meta, plan = self._meta
        # Under a captured graph the selection lands in a buffer of fixed address.
        topk_out = self._graph_block_topk[:tokens] if self._workspace is not None else None
        block_topk = self.impl.index_block_topk(
            index_q, pool.get_index_k_buffer(layer.layer_id), **meta, block_size=self.sparse.block_size,
            topk_blocks=self.sparse.topk_blocks, init_blocks=self.sparse.init_blocks,
            local_blocks=self.sparse.local_blocks, out=topk_out, **plan)
        out = self.impl.sparse_attention(
            q.view(tokens, layer.tp_q_head_num, layer.qk_head_dim), pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id), **meta, block_topk=block_topk,
            block_size=self.sparse.block_size, sm_scale=layer.scaling, **plan)
        return out.reshape(tokens, layer.tp_q_head_num * layer.v_head_dim)
