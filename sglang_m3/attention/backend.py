"""SGLang attention backend for MiniMax-M3: dense layers through an SGLang backend, sparse (MSA) layers here.

Sparse layer, any forward mode (extend with cached prefix, chunked prefill, decode, mixed):
  1. write k, v and the index key of the new tokens at `out_cache_loc` (update before indexing: a token's
     own key takes part in its block scores);
  2. indexer: top-k key blocks per new token and KV group, reading every visible index key through
     `req_to_token` (so radix-cache prefixes and earlier chunks are read from their slots);
  3. block-sparse attention of each query head over its group's blocks.
Target verify (speculative decoding, ForwardMode.TARGET_VERIFY: N draft tokens per request after the committed
`seq_lens`, extend_* fields None) is the same three steps on a rewritten layout, so that every draft node is the
last token of a prefill of prefix + its root-to-node path (reference.verify_chain_layout / verify_tree_rows):
a chain (EAGLE topk=1) is an extend of N tokens on the real req_to_token rows; a tree (EAGLE topk>1, NGRAM) is
one decode row per node over a virtual req_to_token built from SGLang's tree mask.
The torch twins in `reference.py` run steps 2–3 on CPU; the Triton kernels replace them on CUDA.
"""

from __future__ import annotations

import functools
import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.runtime_context import get_parallel

from sglang_m3.attention import kernels, reference
from sglang_m3.config import m3_text_view
from sglang_m3.torch_twins import ENV as TWINS_ENV
from sglang_m3.torch_twins import NOT_GRAPH_SAFE, torch_twins, use_torch_twin

logger = logging.getLogger(__name__)


class M3SparseAttnBackend(AttentionBackend):
    def __init__(self, model_runner, dense_backend: AttentionBackend):
        super().__init__()
        self.dense = dense_backend
        self._model_runner = model_runner  # read at init_cuda_graph_state (the runner's captured batch sizes)
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
        self.use_kernels = self.device.type == "cuda" and not use_torch_twin("msa")
        self.impl = kernels if self.use_kernels else reference
        self._meta = None
        self._workspace = None        # None: scratch from the caching allocator (eager)
        self._graph_workspace = None  # fixed addresses for captured decode graphs
        self._graph_block_topk = None
        # Target verify: N draft tokens per request; a chain (EAGLE/EAGLE3 with topk 1) or a tree (else).
        spec = getattr(model_runner, "spec_algorithm", None)
        spec = spec if spec is not None and spec.is_speculative() else None
        sargs = model_runner.server_args if spec is not None else None
        self.num_draft_tokens = sargs.speculative_num_draft_tokens if spec is not None else None
        self.verify_is_chain = bool(spec is not None and spec.is_eagle() and sargs.speculative_eagle_topk == 1)
        self._graph_verify = None  # fixed-address verify layout buffers for the captured verify graphs
        logger.info("sglang-m3 MSA backend: %d sparse layers (block %d, top-%d) via %s, dense layers via %s",
                    len(self.sparse_layer_ids), self.sparse.block_size, self.sparse.topk_blocks,
                    "Triton kernels" if self.use_kernels else "torch reference", type(dense_backend).__name__)

    @functools.cached_property
    def fused_store(self) -> bool:
        """K, V and index key in one store_kv_index launch where the pool's K/V write is a plain row scatter;
        otherwise (HND / 5-D layouts, quantized caches) the pool's own set_kv_buffer, then the index key."""
        return _plain_kv_rows(self.token_to_kv_pool)

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
        if forward_batch.forward_mode.is_target_verify():
            self._copy_tree_mask(forward_batch.spec_info)

    def init_forward_metadata_in_graph(self, forward_batch):
        # Captured: device-only work on static shapes; replays recompute it from the new seq_lens.
        self.dense.init_forward_metadata_in_graph(forward_batch)
        self._workspace = self._graph_workspace
        self._meta = self._sparse_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        syncing = sorted(torch_twins() & set(NOT_GRAPH_SAFE)) if self.device.type == "cuda" else []
        if syncing:
            raise ValueError(f"{TWINS_ENV} names {syncing}, torch twins that sync with the host and cannot be "
                             "captured in CUDA graphs: serve with --disable-cuda-graph")
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
        if not self.use_kernels:
            return
        # Compile every kernel variant and size the scratch for the longest context before any capture:
        # a captured graph keeps the workspace's addresses, so it must never grow afterwards.
        self._graph_workspace = kernels.MSAWorkspace(self.device)
        verify_tree = self.num_draft_tokens is not None and not self.verify_is_chain
        # Tree verify runs as bs*N decode rows; decode-form shapes cover both.
        captured = self._captured_batch_sizes(max_bs, max_num_tokens)
        rows = [bs * self.num_draft_tokens for bs in captured] if verify_tree else captured
        warm = functools.partial(
            kernels.warmup, self._graph_workspace, batch_sizes=rows, num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, head_dim_v=self.token_to_kv_pool.v_head_dim,
            index_dim=self.sparse.index_dim, block_size=self.sparse.block_size, topk_blocks=self.sparse.topk_blocks,
            init_blocks=self.sparse.init_blocks, local_blocks=self.sparse.local_blocks,
            dtype=self.token_to_kv_pool.index_dtype, kv_dtype=self.token_to_kv_pool.dtype, device=self.device,
            # (tree verify reads a virtual req_to_token one column wider, _init_verify_graph_state)
            context_len=self.req_to_token_pool.req_to_token.shape[1] + int(verify_tree))
        _compile_in_parallel(warm)  # cold start: the variants' compiles side by side; the warm-up then finds them
        warm()
        if self.num_draft_tokens is not None:
            self._init_verify_graph_state(max_bs, captured)
        self._graph_workspace.freeze()
        self._graph_block_topk = torch.full((max(max_bs, max_num_tokens), self.num_kv_heads, self.sparse.topk_blocks),
                                            -1, dtype=torch.int32, device=self.device)

    def _captured_batch_sizes(self, max_bs: int, max_num_tokens: int) -> list[int]:
        """The batch sizes SGLang's decode graph runner will capture: its own ``get_batch_sizes_to_capture``,
        called as the runner calls it (max_num_tokens = max_bs x tokens per request), so warmup compiles and
        sizes the frozen workspace for exactly those (today: 1..max_bs, most of them never captured). Every
        size up to max_bs where that function cannot be used (e.g. another SGLang version)."""
        try:
            from sglang.srt.model_executor.runner.base_cuda_graph_runner import get_batch_sizes_to_capture

            sizes, _ = get_batch_sizes_to_capture(self._model_runner, max(1, max_num_tokens // max(1, max_bs)))
            sizes = sorted({int(b) for b in sizes if 0 < int(b) <= max_bs} | {max_bs})
        except Exception as e:  # noqa: BLE001 -- warming more sizes is slower, never wrong
            logger.warning("sglang-m3: captured batch sizes unavailable (%s); warming every size 1..%d", e, max_bs)
            sizes = list(range(1, max_bs + 1))
        return sizes

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    def on_after_cuda_graph_warmup(self):
        self.dense.on_after_cuda_graph_warmup()

    # ---- target verify (speculative decoding) --------------------------------------------------------
    # Members that AttentionBackend defines are not reached by __getattr__: forward the spec-decode ones.
    @property
    def verify_mask(self):
        """The dense backend's tree-mask buffer: EAGLE writes the tree mask straight into it."""
        return self.dense.verify_mask

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        self.dense.update_verify_buffers_to_fill_after_draft(spec_info, cuda_graph_bs)
        if cuda_graph_bs is not None:
            self._copy_tree_mask(spec_info)

    def _init_verify_graph_state(self, max_bs: int, captured: list[int]):
        """Fixed-address verify layout buffers (sized for max_bs requests x N drafts) and the chain form's kernel
        warmup at the captured batch sizes."""
        n, dev = self.num_draft_tokens, self.device
        r2t = self.req_to_token_pool.req_to_token
        g = dict(rows=torch.arange(max_bs * n, dtype=torch.int64, device=dev))
        if self.verify_is_chain:
            g["lens"] = tuple(torch.zeros(max_bs, dtype=torch.int32, device=dev) for _ in range(3))
            _compile_in_parallel(lambda: self._warmup_chain_verify(captured))
            self._warmup_chain_verify(captured)
        else:
            g["r2t"] = torch.zeros((max_bs * n, r2t.shape[1] + 1), dtype=r2t.dtype, device=dev)
            g["node_lens"] = torch.ones(max_bs * n, dtype=torch.int64, device=dev)
            # FULL_MASK layout: N x (seq_len + N) per request (SGLang 0.5.17 verify_mask.tree_mask_numel).
            # The dense backend's buffer (Triton's) is current at replay: EAGLE builds the tree into it and
            # Triton's out_graph copies NGRAM's mask into it. Otherwise keep our own copy.
            vm = self.dense.verify_mask
            if vm is not None and int(vm.mode) == 0 and vm.max_bs >= max_bs:  # 0: TreeMaskMode.FULL_MASK
                g["mask"], g["own_mask"] = vm.buffer, False
            else:
                need = max_bs * n * (r2t.shape[1] + n)
                g["mask"], g["own_mask"] = torch.zeros(need, dtype=torch.uint8, device=dev), True
        self._graph_verify = g

    def _warmup_chain_verify(self, batch_sizes: list[int]):
        """Compile and size the graph workspace for the chain-verify (extend-form) shapes of the batch sizes the
        verify graphs are captured at (each size's split counts, hence scratch sizes, differ)."""
        n, sp, pool = self.num_draft_tokens, self.sparse, self.token_to_kv_pool
        dt, kv_dt = getattr(pool, "index_dtype", pool.dtype), pool.dtype  # model dtype (q, index lane); K/V cache
        ctx = 2 * sp.topk_blocks * sp.block_size + n + 1  # reaches the sparse code paths; small dummy caches
        r2t = torch.arange(ctx, dtype=torch.int32, device=self.device)[None]
        ik = torch.zeros(ctx, sp.index_dim, dtype=dt, device=self.device)
        kc = torch.zeros(ctx, self.num_kv_heads, self.head_dim, dtype=kv_dt, device=self.device)
        vc = torch.zeros(ctx, self.num_kv_heads, pool.v_head_dim, dtype=kv_dt, device=self.device)
        ws = self._graph_workspace
        for bs in batch_sizes:
            rpi = torch.zeros(bs, dtype=torch.int64, device=self.device)
            total, ext, start = reference.verify_chain_layout(
                torch.full((bs,), ctx - n, dtype=torch.int64, device=self.device), n)
            meta = kernels.prepare_meta(rpi, total, ext, start, bs * n, index_heads=self.num_kv_heads, workspace=ws)
            iq = torch.zeros(bs * n, self.num_kv_heads, sp.index_dim, dtype=dt, device=self.device)
            sel = kernels.index_block_topk(iq, ik, r2t, rpi, total, ext, start, block_size=sp.block_size,
                                           topk_blocks=sp.topk_blocks, init_blocks=sp.init_blocks,
                                           local_blocks=sp.local_blocks, meta=meta, workspace=ws)
            q = torch.zeros(bs * n, self.num_q_heads, self.head_dim, dtype=dt, device=self.device)
            kernels.sparse_attention(q, kc, vc, r2t, rpi, total, ext, start, sel, block_size=sp.block_size,
                                     sm_scale=self.head_dim ** -0.5, meta=meta, workspace=ws)

    def _copy_tree_mask(self, spec_info):
        """Tree verify under a graph: the live tree mask into the captured mask buffer (outside the graph)."""
        g = self._graph_verify
        mask = getattr(spec_info, "custom_mask", None)
        if g is None or not g.get("own_mask") or mask is None or mask.data_ptr() == g["mask"].data_ptr():
            return
        if mask.numel() > g["mask"].numel():
            raise RuntimeError(f"tree mask of {mask.numel()} entries exceeds the verify graph buffer "
                               f"({g['mask'].numel()})")
        g["mask"][: mask.numel()].copy_(mask, non_blocking=True)

    def _verify_metadata(self, fb):
        """TARGET_VERIFY as the MSA functions' extend form (chain) or decode rows over virtual req_to_token (tree)."""
        n = getattr(fb.spec_info, "draft_token_num", None) or self.num_draft_tokens
        if n is None:
            raise ValueError("TARGET_VERIFY batch without a draft token count (spec_info.draft_token_num)")
        g = self._graph_verify if self._workspace is not None else None
        r2t = self.req_to_token_pool.req_to_token
        tokens = fb.out_cache_loc.shape[0]
        if self.verify_is_chain:
            total, ext, start = reference.verify_chain_layout(fb.seq_lens, n, out=g["lens"] if g else None)
            return dict(req_to_token=r2t, req_pool_indices=fb.req_pool_indices, seq_lens=total,
                        extend_seq_lens=ext, extend_start_loc=start)
        mask = g["mask"] if g else fb.spec_info.custom_mask
        virt, node_lens = reference.verify_tree_rows(
            mask, fb.seq_lens, fb.req_pool_indices, fb.out_cache_loc, r2t, n,
            out_req_to_token=g["r2t"] if g else None, out_seq_lens=g["node_lens"] if g else None)
        rows = g["rows"][:tokens] if g else torch.arange(tokens, dtype=torch.int64, device=r2t.device)
        if self.use_kernels:
            ext = start = None  # decode form: token k is row k
        else:
            ext = torch.ones(tokens, dtype=torch.int32, device=r2t.device)
            start = torch.arange(tokens, dtype=torch.int32, device=r2t.device)
        return dict(req_to_token=virt, req_pool_indices=rows, seq_lens=node_lens, extend_seq_lens=ext,
                    extend_start_loc=start)

    def _sparse_metadata(self, fb):
        """Where each new token sits (request row, position), in the form the MSA functions take."""
        if fb.forward_mode.is_target_verify():
            return self._with_plan(fb, self._verify_metadata(fb))
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
        return self._with_plan(fb, meta)

    def _with_plan(self, fb, meta):
        plan = {}
        if self.use_kernels:
            plan["meta"] = kernels.prepare_meta(meta["req_pool_indices"], meta["seq_lens"], meta["extend_seq_lens"],
                                                meta["extend_start_loc"], fb.out_cache_loc.shape[0],
                                                index_heads=self.num_kv_heads, workspace=self._workspace)
            plan["workspace"] = self._workspace
        return meta, plan

    # ---- forward ------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, index_q=None, index_k=None, **kw):
        """Attention of T new tokens, model dtype: q [T, Hq·D], k [T, Hkv·D], v [T, Hkv·Dv] (flat or per head), and
        for sparse layers index_q [T, Hkv, index_dim], index_k [T, index_dim]; returns [T, Hq·Dv]. Dense layers go
        to the dense delegate unchanged. Sparse layers always store K/V with the index key (save_kv_cache is
        ignored there: a later token or a radix-cache hit reads both); ValueError without index_q/index_k."""
        if layer.layer_id not in self.sparse_layer_ids:
            return self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        return self._forward_sparse(q, k, v, layer, forward_batch, index_q, index_k)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, index_q=None, index_k=None, **kw):
        """One token per request (T = batch size); shapes and storing as forward_extend."""
        if layer.layer_id not in self.sparse_layer_ids:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        return self._forward_sparse(q, k, v, layer, forward_batch, index_q, index_k)

    def _forward_sparse(self, q, k, v, layer, fb, index_q, index_k):
        if index_q is None or index_k is None:
            raise ValueError(f"sparse layer {layer.layer_id} called without index_q/index_k")
        pool = self.token_to_kv_pool
        # K/V and the index key are always stored together: a later token (or a radix-cache hit) reads both.
        k_scale, v_scale = _kv_scales(layer, pool.dtype, k.dtype)
        if self.fused_store:  # one launch, rounding as set_kv_buffer's
            self.impl.store_kv_index(pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id),
                                     pool.get_index_k_buffer(layer.layer_id), fb.out_cache_loc, k, v, index_k,
                                     k_scale=k_scale, v_scale=v_scale)
        else:
            if k_scale == v_scale == 1.0:
                pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
            else:  # the pool stores k / k_scale, dividing in place: keep the caller's tensors intact
                pool.set_kv_buffer(layer, fb.out_cache_loc, k.clone(), v.clone(), k_scale, v_scale)
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
            block_size=self.sparse.block_size, sm_scale=layer.scaling, k_scale=k_scale, v_scale=v_scale, **plan)
        return out.reshape(tokens, layer.tp_q_head_num * layer.v_head_dim)


def _plain_kv_rows(pool) -> bool:
    """Whether ``pool.set_kv_buffer`` is a plain per-slot row write of K/V at the pool dtype (model dtype or
    float8_e4m3fn): SGLang's NHD layout with its base ``_store_kv_layer`` or ours, not a quantized (FP4) cache."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_m3.attention.pool import M3KVPool

    return (getattr(pool, "kv_cache_layout", "nhd") == "nhd" and not getattr(pool, "use_hnd", False)
            and not getattr(pool, "is_quantized_kv_cache", False)
            and getattr(type(pool), "_store_kv_layer", None) in (MHATokenToKVPool._store_kv_layer,
                                                                 M3KVPool._store_kv_layer)
            and pool.dtype in (getattr(pool, "index_dtype", None), torch.float8_e4m3fn))


def _compile_in_parallel(warm) -> None:
    """Compile the Triton kernels ``warm()`` launches on a thread pool first (kernels.precompile): a cold
    decode-graph capture otherwise compiles them one after the other. Never fatal: after any error the warm-up
    compiles what is missing itself, as without this step."""
    import time

    from sglang_m3.attention.kernels.precompile import compile_in_parallel

    t0 = time.perf_counter()
    try:
        n = compile_in_parallel(warm)
    except Exception as e:  # noqa: BLE001 -- the serial warm-up that follows compiles (and reports) the same
        logger.warning("sglang-m3: parallel compile of the MSA kernels failed (%r); the warm-up compiles them", e)
        return
    logger.info("sglang-m3: %d MSA kernel variants compiled or loaded in %.1f s (thread pool)", n,
                time.perf_counter() - t0)


def _kv_scales(layer, cache_dtype: torch.dtype, kv_dtype: torch.dtype) -> tuple[float, float]:
    """(k_scale, v_scale) as floats: the cache holds K / k_scale and V / v_scale.

    1.0 unless a KV-cache quant method attached scales to the RadixAttention layer (SGLang's
    BaseKVCacheMethod: the checkpoint's k_scale/v_scale, else 1.0) and the cache dtype differs from
    K's: MHATokenToKVPool.set_kv_buffer divides by the scales only when it converts, so the read
    side must multiply only then too.
    """
    if layer.k_scale is None or cache_dtype == kv_dtype:
        return 1.0, 1.0
    return float(layer.k_scale_float), float(layer.v_scale_float)
