"""KV pool with one index-key row per KV slot for each sparse layer.

The index key of a token lives in the same slot as its K and V, so everything SGLang does with slots —
radix-cache prefix sharing, chunked prefill, eviction, retraction — carries the index lane for free, as long
as every path that moves K/V rows moves index rows too. This class owns those paths.

Dtypes: K/V are stored at the KV-cache dtype (SGLang's pool: the model dtype, or fp8 e4m3 with
--kv-cache-dtype fp8_e4m3, held as uint8 and viewed as float8_e4m3fn by get_key_buffer / get_value_buffer);
the index lane stays at the model dtype whatever the K/V dtype (issue 10: bf16 unless fp8 index keys are
measured equal, which they were not). Index-score rounding decides which blocks a token attends to (a flipped
near-tie changes the key set), and the lane is small: one Di-wide row per sparse layer vs Hkv x (D + Dv) for K/V.
"""

from __future__ import annotations

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool


def index_k_bytes_per_token(sparse_layer_ids, start_layer: int, end_layer: int, index_dim: int,
                            dtype: torch.dtype) -> int:
    """Bytes the index lane adds to one KV slot on this rank (only this pipeline stage's sparse layers).

    ``dtype`` is the lane's dtype (the model dtype; not the K/V cache dtype, which may be fp8).
    """
    local = [l for l in sparse_layer_ids if start_layer <= l < end_layer]
    return len(local) * index_dim * torch._utils._element_size(dtype)


class M3KVPool(MHATokenToKVPool):
    """MHATokenToKVPool plus the index-key lane: per local sparse layer, [size + page_size, index_dim] at
    ``index_dtype`` (the model dtype; defaults to the pool dtype, which must then not be an fp8 dtype)."""

    def __init__(self, *args, sparse_layer_ids=(), index_dim: int = 128, index_dtype: torch.dtype | None = None,
                 **kwargs):
        # Set before the base constructor: it allocates (and logs the size of) all buffers via _create_buffers.
        self.index_dim = index_dim
        self._all_sparse_layer_ids = tuple(sparse_layer_ids)
        self.index_dtype = index_dtype
        super().__init__(*args, **kwargs)

    def _create_buffers(self):
        super()._create_buffers()
        if self.index_dtype is None:
            if self.dtype.itemsize == 1:
                raise ValueError(f"M3KVPool: K/V dtype {self.dtype} needs an explicit index_dtype (the model dtype) "
                                 "for the index-key lane")
            self.index_dtype = self.dtype
        from sglang_m3.attention import kernels, reference
        from sglang_m3.torch_twins import use_torch_twin

        # The dense layers' K/V row store (_store_kv_layer): the Triton kernel on CUDA (and under Triton's
        # interpreter), its torch twin on CPU or when SGLANG_M3_TORCH_TWINS names msa; chosen once per pool.
        on_triton = torch.device(self.device).type == "cuda" or kernels.interpret_mode()
        use_kernel = on_triton and not use_torch_twin("msa")
        self._dense_kv_store = kernels.store_kv if use_kernel else reference.store_kv
        self.sparse_layer_ids = tuple(l for l in self._all_sparse_layer_ids if self.start_layer <= l < self.end_layer)
        self._index_slot = {layer_id: i for i, layer_id in enumerate(self.sparse_layer_ids)}
        # Same row count as K/V (slot 0 included, which padded tokens write into).
        rows = self.size + self.page_size
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.index_k_buffer = [torch.zeros(rows, self.index_dim, dtype=self.index_dtype, device=self.device)
                                   for _ in self.sparse_layer_ids]

    # ---- the index lane -------------------------------------------------------------------------------
    def get_index_k_buffer(self, layer_id: int) -> torch.Tensor:
        """The index-key lane of sparse layer ``layer_id`` (global id): [slots, index_dim] in ``index_dtype``.

        Raises KeyError naming the layer when it is dense or belongs to another pipeline stage (no lane)."""
        try:
            return self.index_k_buffer[self._index_slot[layer_id]]
        except KeyError:
            raise KeyError(f"layer {layer_id} has no index-key lane in this pool: its sparse layers are "
                           f"{list(self.sparse_layer_ids)}") from None

    # ---- K/V rows of the dense layers ------------------------------------------------------------------
    def _store_kv_layer(self, layer_idx: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor):
        """K/V rows of T tokens into their slots of local layer ``layer_idx`` (``set_kv_buffer`` has already cast
        them to the cache dtype and viewed them as the store dtype: cache_k [T, Hkv, D], cache_v [T, Hkv, Dv]).

        Used by the dense layers (the sparse ones store K, V and the index key in one kernel: backend.py), with
        our Triton row store (its torch twin on CPU or with SGLANG_M3_TORCH_TWINS=msa): SGLang's default here is
        its JIT `store_cache` CUDA kernel, whose first use on a host compiles it with nvcc inside the decode-graph
        capture (benchmarks/cold_start.py)."""
        if self.kv_cache_layout != "nhd":
            return super()._store_kv_layer(layer_idx, loc, cache_k, cache_v)
        self._dense_kv_store(self.k_buffer[layer_idx], self.v_buffer[layer_idx], loc, cache_k, cache_v)

    # ---- lifecycle paths that must carry the lane with K/V --------------------------------------------
    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        super().move_kv_cache(tgt_loc, src_loc)
        for buf in self.index_k_buffer:
            buf[tgt_loc] = buf[src_loc]

    def get_cpu_copy(self, indices, mamba_indices=None):
        kv = super().get_cpu_copy(indices, mamba_indices)
        index_k = [buf[indices].to("cpu", non_blocking=True) for buf in self.index_k_buffer]
        torch.get_device_module(self.device).synchronize() if self.device != "cpu" else None
        return {"kv": kv, "index_k": index_k}

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        super().load_cpu_copy(kv_cache_cpu["kv"], indices, mamba_indices)
        for buf, rows in zip(self.index_k_buffer, kv_cache_cpu["index_k"]):
            buf[indices] = rows.to(buf.device, non_blocking=True)

    def get_kv_size_bytes(self):
        """(K bytes, V bytes); the index lane is counted with K — it is the indexer's key cache."""
        k_bytes, v_bytes = super().get_kv_size_bytes()
        return k_bytes + sum(b.numel() * b.element_size() for b in self.index_k_buffer), v_bytes

    def _clear_buffers(self):
        del self.index_k_buffer
        super()._clear_buffers()
