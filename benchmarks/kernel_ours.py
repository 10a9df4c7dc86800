"""Our side of the MSA kernel benchmark: the decode path as M3SparseAttnBackend runs it under a captured decode graph,
the eager extend path, and our torch reference (the oracle of the smoke cross-check)."""

from __future__ import annotations

import os

import torch

from kernel_inputs import Batch, Geometry
from sglang_m3.attention import kernels, reference

# ----------------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------------


def sglang_kv_store():
    """The K/V write of SGLang's MHATokenToKVPool.set_kv_buffer (our pool's base class): its ``store_cache`` JIT
    kernel on CUDA when it builds, else index_put (what _set_kv_buffer_impl falls back to)."""
    if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        from sglang.kernels.ops.kvcache.kvcache import can_use_store_cache, store_cache

        def store(b: Batch):
            row = b.k_cache.shape[1] * b.k_cache.shape[2]
            if can_use_store_cache(row * b.k_cache.element_size()):
                store_cache(b.k.view(-1, row), b.v.view(-1, row), b.k_cache.view(-1, row), b.v_cache.view(-1, row),
                            b.out_cache_loc)
            else:
                b.k_cache[b.out_cache_loc], b.v_cache[b.out_cache_loc] = b.k, b.v
        return store

    def store_cpu(b: Batch):
        b.k_cache[b.out_cache_loc], b.v_cache[b.out_cache_loc] = b.k, b.v
    return store_cpu


class OursDecode:
    """Our decode path as M3SparseAttnBackend runs it under a captured decode graph (see kernels/__init__.py).

    ``two_pass`` forces the indexer variant (True: score-then-select, False: split + merge); None takes the
    kernels' shape rule, as the backend does. ``select`` picks the two-pass variant's pass 2 (indexer.SELECTS: "rank",
    the kernels' and the backend's default, all-pairs ranking of rows up to common.INDEXER_RANK_MAX_BLOCKS blocks;
    "radix"; "threshold")."""

    def __init__(self, geo: Geometry, b: Batch, kv_store, two_pass: bool | None = None, select: str = "rank"):
        self.geo, self.b, self.kv_store, self.two_pass, self.select = geo, b, kv_store, two_pass, select
        dev = b.q.device
        # init_cuda_graph_state: compile every variant and size the scratch before capture, then freeze.
        self.ws = kernels.MSAWorkspace(dev)
        kernels.warmup(self.ws, batch_sizes=[b.bs], num_q_heads=geo.hq, num_kv_heads=geo.hkv, head_dim=geo.d,
                       head_dim_v=geo.d, index_dim=geo.di, block_size=geo.block, topk_blocks=geo.topk,
                       init_blocks=geo.init_blocks, local_blocks=geo.local_blocks, dtype=geo.dtype, device=dev,
                       context_len=b.context_len)
        self.block_topk = torch.full((b.bs, geo.hkv, geo.topk), -1, dtype=torch.int32, device=dev)
        self.out = torch.empty(b.bs, geo.hq, geo.d, dtype=geo.dtype, device=dev)
        self.meta = None
        if two_pass is not None:  # warmup followed the shape rule: size the scratch of the forced variant too
            self.prepare()
            self.indexer()
        self.ws.freeze()

    @property
    def indexer_variant(self) -> str:
        two_pass = self.two_pass if self.two_pass is not None else kernels.indexer.uses_two_pass(self.meta)
        return "two-pass" if two_pass else "split"

    def prepare(self):
        """init_forward_metadata_in_graph: once per forward, shared by every sparse layer."""
        b = self.b
        self.meta = kernels.prepare_meta(b.req_pool_indices, b.seq_lens, None, None, b.num_tokens,
                                         index_heads=self.geo.hkv, workspace=self.ws)

    def store(self):
        """The backend's store: K, V and the index key in one store_kv_index launch."""
        b = self.b
        kernels.store_kv_index(b.k_cache, b.v_cache, b.index_k_cache, b.out_cache_loc, b.k, b.v, b.index_k)

    def store_unfused(self):
        """The store before store_kv_index (timed for comparison): the pool's K/V write, then store_index_k."""
        self.kv_store(self.b)
        kernels.store_index_k(self.b.index_k_cache, self.b.out_cache_loc, self.b.index_k)

    def indexer(self):
        geo, b = self.geo, self.b
        kernels.index_block_topk(b.index_q, b.index_k_cache, b.req_to_token, b.req_pool_indices, b.seq_lens,
                                 None, None, block_size=geo.block, topk_blocks=geo.topk,
                                 init_blocks=geo.init_blocks, local_blocks=geo.local_blocks,
                                 out=self.block_topk, meta=self.meta, workspace=self.ws, two_pass=self.two_pass,
                                 select=self.select)

    def attention(self):
        geo, b = self.geo, self.b
        kernels.sparse_attention(b.q, b.k_cache, b.v_cache, b.req_to_token, b.req_pool_indices, b.seq_lens,
                                 None, None, self.block_topk, block_size=geo.block, sm_scale=geo.sm_scale,
                                 out=self.out, meta=self.meta, workspace=self.ws)

    def stages(self) -> dict:
        return {"store": self.store, "store_unfused": self.store_unfused, "indexer": self.indexer,
                "attention": self.attention}

    def layer(self) -> torch.Tensor:
        """_forward_sparse of one layer."""
        self.store()
        self.indexer()
        self.attention()
        return self.out


class OursPrefill:
    """Our eager extend path (M3SparseAttnBackend.forward_extend): scratch from the caching allocator."""

    def __init__(self, geo: Geometry, b: Batch):
        self.geo, self.b = geo, b
        self.meta = kernels.prepare_meta(b.req_pool_indices, b.seq_lens, b.extend_seq_lens, b.extend_start_loc,
                                         b.num_tokens, index_heads=geo.hkv)  # per forward
        self.block_topk = None

    def layer(self) -> torch.Tensor:
        geo, b = self.geo, self.b
        kernels.store_kv_index(b.k_cache, b.v_cache, b.index_k_cache, b.out_cache_loc, b.k, b.v, b.index_k)
        self.block_topk = kernels.index_block_topk(
            b.index_q, b.index_k_cache, b.req_to_token, b.req_pool_indices, b.seq_lens, b.extend_seq_lens,
            b.extend_start_loc, block_size=geo.block, topk_blocks=geo.topk, init_blocks=geo.init_blocks,
            local_blocks=geo.local_blocks, meta=self.meta)
        return kernels.sparse_attention(
            b.q, b.k_cache, b.v_cache, b.req_to_token, b.req_pool_indices, b.seq_lens, b.extend_seq_lens,
            b.extend_start_loc, self.block_topk, block_size=geo.block, sm_scale=geo.sm_scale, meta=self.meta)


def reference_msa(geo: Geometry, b: Batch):
    """Our torch twins (the executable spec) on the same inputs, after the step's writes: (out, block_topk)."""
    meta = dict(req_to_token=b.req_to_token, req_pool_indices=b.req_pool_indices, seq_lens=b.seq_lens,
                extend_seq_lens=b.extend_seq_lens, extend_start_loc=b.extend_start_loc)
    sel = reference.index_block_topk(b.index_q, b.index_k_cache, **meta, block_size=geo.block,
                                     topk_blocks=geo.topk, init_blocks=geo.init_blocks,
                                     local_blocks=geo.local_blocks)
    out = reference.sparse_attention(b.q, b.k_cache, b.v_cache, **meta, block_topk=sel, block_size=geo.block,
                                     sm_scale=geo.sm_scale)
    return out, sel
