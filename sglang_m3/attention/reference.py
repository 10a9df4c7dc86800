"""MiniMax Sparse Attention (MSA) in plain torch, over SGLang's paged KV cache.

This file is the executable spec of MSA (M3_SPEC.md §3.2-3.6). It is used
  * as the CPU execution path of the M3 sparse layers, and
  * as the test oracle of the Triton kernels, which keep exactly these signatures.
So it favours obviously-correct, fp32 computation over speed; it is vectorised with torch
only so that it stays usable for real sequence lengths (tens of thousands of tokens).

Batch layout (SGLang extend/decode conventions):
  * request i has ``seq_lens[i]`` visible tokens after this forward; its ``extend_seq_lens[i]``
    new tokens are packed along the token axis T starting at ``extend_start_loc[i]``;
  * new token r of request i sits at absolute position ``seq_lens[i] - extend_seq_lens[i] + r``;
  * ``req_to_token[req_pool_indices[i], pos]`` is the cache slot of position ``pos``;
  * keys (K, V and the index key) of every position < seq_lens[i], the new tokens included,
    are already in the caches ("update before index": a token's own key takes part).

MSA per new token p (absolute position) and index head h == KV head h:
  s_h(p, j)     = <index_q[p, h], index_k(j)>             (fp32, only keys j <= p)
  score_h(p, b) = max_{j in block b, j <= p} s_h(p, j)     (blocks anchored at absolute positions)
  nb(p)         = p // block_size + 1                      (visible blocks)
  forced        = {b < init_blocks} U {b >= nb(p) - local_blocks}, within the visible blocks
  sel_h(p)      = the min(topk_blocks, nb(p)) visible blocks with the highest score, forced first
  out[p, qh]    = softmax attention of query head qh over the keys j <= p whose block is in
                  sel_{qh // group}(p)   (group = Hq // Hkv; selection is per KV group, never pooled)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["store_index_k", "store_kv_index", "index_block_topk", "sparse_attention", "verify_chain_layout", "verify_tree_rows"]

# Upper bound on the number of fp32 elements of one [queries, heads, keys] score tile. Queries of
# a request are processed in chunks so memory stays bounded for long sequences (e.g. 64 query
# heads x 64k keys -> 4 queries per chunk). Module-level so tests can shrink it.
_TILE_ELEMS = 1 << 24
_MAX_QUERY_CHUNK = 256


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _request_metadata(req_to_token, req_pool_indices, seq_lens, extend_seq_lens,
                      extend_start_loc, num_tokens):
    """Validate the per-request metadata and return it as Python lists.

    This is the only host<->device sync of the module: one transfer per metadata tensor, needed
    anyway because the loop over requests is on the host.
    """
    _check(req_to_token.dim() == 2, f"req_to_token must be 2-D [pool, max_len], got {tuple(req_to_token.shape)}")
    bs = req_pool_indices.numel()
    for name, t in (("seq_lens", seq_lens), ("extend_seq_lens", extend_seq_lens),
                    ("extend_start_loc", extend_start_loc)):
        _check(t.dim() == 1 and t.numel() == bs,
               f"{name} must be 1-D with one entry per request ({bs}), got shape {tuple(t.shape)}")
    rows = req_pool_indices.tolist()
    lens = seq_lens.tolist()
    ext = extend_seq_lens.tolist()
    start = extend_start_loc.tolist()
    for i in range(bs):
        _check(0 <= rows[i] < req_to_token.shape[0],
               f"req_pool_indices[{i}]={rows[i]} out of range for req_to_token with {req_to_token.shape[0]} rows")
        _check(0 <= ext[i] <= lens[i],
               f"request {i}: need 0 <= extend_seq_lens ({ext[i]}) <= seq_lens ({lens[i]})")
        _check(lens[i] <= req_to_token.shape[1],
               f"request {i}: seq_lens {lens[i]} exceeds req_to_token width {req_to_token.shape[1]}")
        _check(start[i] >= 0 and start[i] + ext[i] <= num_tokens,
               f"request {i}: tokens [{start[i]}, {start[i] + ext[i]}) fall outside the {num_tokens} packed tokens")
    return rows, lens, ext, start


def _query_chunk(heads: int, keys: int) -> int:
    return max(1, min(_MAX_QUERY_CHUNK, _TILE_ELEMS // max(1, heads * keys)))


def _requests(req_to_token, metadata, heads: int, device):
    """Per request with new tokens: (slots of its visible keys, its query chunks), a chunk being (rows in
    the packed batch, absolute positions, keys visible to the chunk's last query).

    Queries go in chunks so that a [chunk, heads, keys] score tile stays bounded at long contexts.
    """
    rows, lens, ext, start = metadata
    for i in range(len(rows)):
        n_new, prefix = ext[i], lens[i] - ext[i]
        chunks = []
        step = _query_chunk(heads, lens[i])
        for c0 in range(0, n_new, step):
            c1 = min(n_new, c0 + step)
            chunks.append((slice(start[i] + c0, start[i] + c1),
                           torch.arange(prefix + c0, prefix + c1, device=device), prefix + c1))
        if chunks:
            yield req_to_token[rows[i], : lens[i]].long(), chunks


def _exact_fp32(fn):
    """Run fn with full-precision fp32 matmuls: as an oracle on GPU, TF32 (often enabled globally
    by serving stacks) would perturb index scores enough to flip near-tied block selections."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_float32_matmul_precision(prev)

    return wrapper


# ----------------------------------------------------------------------------------------------
# index-key cache
# ----------------------------------------------------------------------------------------------


def check_store_kv(k_cache, v_cache, loc, k, v) -> None:
    """Shape/dtype checks of ``store_kv`` (shared with its Triton twin); ValueError naming the problem."""
    _check(k_cache.dim() == 3 and v_cache.dim() == 3 and v_cache.shape[:2] == k_cache.shape[:2],
           f"k_cache/v_cache must be [num_slots, Hkv, D/Dv], got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    _check(loc.dim() == 1, f"loc must be 1-D [T], got {tuple(loc.shape)}")
    T = loc.numel()
    for name, x, cache in (("k", k, k_cache), ("v", v, v_cache)):
        _check(tuple(x.shape) == (T, *cache.shape[1:]) and x.dtype == cache.dtype,
               f"{name} must be [T={T}, {', '.join(map(str, cache.shape[1:]))}] of the cache dtype {cache.dtype}, "
               f"got {tuple(x.shape)} {x.dtype}")
    _check(k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "k_cache and v_cache need a contiguous last dimension")


def store_kv(k_cache: Tensor, v_cache: Tensor, loc: Tensor, k: Tensor, v: Tensor) -> None:
    """A dense layer's cache write (M3KVPool._store_kv_layer): K/V rows of T new tokens into their slots, in place.

    k_cache [num_slots, Hkv, D], v_cache [num_slots, Hkv, Dv]; k [T, Hkv, D], v [T, Hkv, Dv] already in the
    cache's dtype (SGLang's set_kv_buffer casts and scales before this step; fp8 caches arrive as their uint8
    store view); loc [T] int slots. Raises ValueError on shapes/dtypes that do not fit."""
    check_store_kv(k_cache, v_cache, loc, k, v)
    k_cache[loc] = k
    v_cache[loc] = v


def check_store_kv_index(k_cache, v_cache, index_k_cache, loc, k, v, index_k, k_scale, v_scale) -> None:
    """Shape/dtype checks of ``store_kv_index`` (shared with its Triton twin); ValueError naming the problem."""
    _check(k_cache.dim() == 3 and v_cache.dim() == 3,
           f"k_cache/v_cache must be [num_slots, Hkv, D], got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    _check(v_cache.shape[:2] == k_cache.shape[:2] and v_cache.dtype == k_cache.dtype,
           f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} does not match k_cache {tuple(k_cache.shape)} "
           f"{k_cache.dtype} in slots/heads/dtype")
    _check(index_k_cache.dim() == 2 and index_k_cache.shape[0] == k_cache.shape[0],
           f"index_k_cache must be [num_slots={k_cache.shape[0]}, Di], got {tuple(index_k_cache.shape)}")
    _check(loc.dim() == 1, f"loc must be 1-D [T], got {tuple(loc.shape)}")
    T = loc.numel()
    _check(tuple(k.shape) == (T, *k_cache.shape[1:]), f"k must be [T={T}, Hkv, D] = {(T, *k_cache.shape[1:])}, "
           f"got {tuple(k.shape)}")
    _check(tuple(v.shape) == (T, *v_cache.shape[1:]), f"v must be [T={T}, Hkv, Dv] = {(T, *v_cache.shape[1:])}, "
           f"got {tuple(v.shape)}")
    _check(index_k.dim() in (2, 3) and (index_k.dim() == 2 or index_k.shape[1] == 1),
           f"index_k must be [T, Di] or [T, 1, Di] (M3 has ONE shared index-key head), got {tuple(index_k.shape)}")
    _check(index_k.shape[0] == T and index_k.shape[-1] == index_k_cache.shape[1],
           f"index_k must be [T={T}, Di={index_k_cache.shape[1]}], got {tuple(index_k.shape)}")
    _check(k_cache.dtype in (k.dtype, torch.float8_e4m3fn),
           f"k_cache dtype {k_cache.dtype} must be K's ({k.dtype}) or float8_e4m3fn")
    _check(k_scale > 0 and v_scale > 0, f"k_scale ({k_scale}) and v_scale ({v_scale}) must be > 0")
    _check(k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and index_k_cache.stride(1) == 1,
           "k_cache, v_cache and index_k_cache need a contiguous last dimension")


def store_kv_index(k_cache: Tensor, v_cache: Tensor, index_k_cache: Tensor, loc: Tensor, k: Tensor, v: Tensor,
                   index_k: Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """A sparse layer's cache write: K, V and the index key of the new tokens into their slots, in place.

    k_cache [num_slots, Hkv, D], v_cache [num_slots, Hkv, Dv]: the model dtype, or float8_e4m3fn
    (--kv-cache-dtype fp8_e4m3); index_k_cache [num_slots, Di] (model dtype); loc [T] int slots;
    k [T, Hkv, D], v [T, Hkv, Dv], index_k [T, Di] or [T, 1, Di] (model dtype).
    K/V as SGLang's MHATokenToKVPool.set_kv_buffer writes them: when the cache dtype differs from K's,
    K is divided by k_scale (V by v_scale) in K's dtype, then cast to the cache dtype (torch's rounding:
    nearest even, fp8 overflow past 464 -> NaN); scales are ignored when the dtypes agree.
    The division is written as a multiply by the fp32 reciprocal, which is what torch's ``div_`` by a
    host scalar computes on CUDA. Raises ValueError on shapes/dtypes that do not fit.
    """
    check_store_kv_index(k_cache, v_cache, index_k_cache, loc, k, v, index_k, k_scale, v_scale)
    for src, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if cache.dtype != src.dtype:
            if scale != 1.0:
                inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
                src = (src.float() * inv.to(src.device)).to(src.dtype)
            src = src.to(cache.dtype)
        if cache.element_size() == 1:  # (index_put has no fp8 kernels; the pool stores them as uint8 too)
            cache, src = cache.view(torch.uint8), src.view(torch.uint8)
        cache[loc] = src
    store_index_k(index_k_cache, loc, index_k)



def store_index_k(index_k_cache: Tensor, loc: Tensor, index_k: Tensor) -> None:
    """Write the (single-head) index keys of the new tokens into their cache slots, in place.

    index_k_cache [num_slots, Di]; loc [T] int64 slots; index_k [T, Di] or [T, 1, Di].
    Values are cast to the cache dtype (bf16 / fp8 caches).
    """
    _check(index_k_cache.dim() == 2, f"index_k_cache must be [num_slots, Di], got {tuple(index_k_cache.shape)}")
    _check(loc.dim() == 1, f"loc must be 1-D [T], got {tuple(loc.shape)}")
    di = index_k_cache.shape[1]
    if index_k.dim() == 3:
        _check(index_k.shape[1] == 1, f"index_k has {index_k.shape[1]} heads; M3 has ONE shared index-key head")
        index_k = index_k[:, 0]
    _check(index_k.dim() == 2 and index_k.shape == (loc.numel(), di),
           f"index_k must be [T={loc.numel()}, Di={di}] (or [T, 1, Di]), got {tuple(index_k.shape)}")
    index_k_cache[loc] = index_k.to(index_k_cache.dtype)


# ----------------------------------------------------------------------------------------------
# lightning indexer: block scores + forced top-k
# ----------------------------------------------------------------------------------------------


@_exact_fp32
def index_block_topk(index_q: Tensor, index_k_cache: Tensor, req_to_token: Tensor,
                     req_pool_indices: Tensor, seq_lens: Tensor, extend_seq_lens: Tensor,
                     extend_start_loc: Tensor, *, block_size: int, topk_blocks: int,
                     init_blocks: int = 0, local_blocks: int = 1, out: Tensor | None = None) -> Tensor:
    """Select, per new token and per index head, the key blocks it attends to.

    index_q [T, H, Di]; index_k_cache [num_slots, Di] (ONE index-key head shared by all H heads).
    Returns int32 [T, H, topk_blocks] (written into ``out`` if given): the selected block ids of
    each (token, head) sorted ascending, padded with -1. Rows of tokens not owned by any request
    are left untouched in ``out`` (and are -1 in a freshly allocated result).
    """
    _check(index_q.dim() == 3, f"index_q must be [T, H, Di], got {tuple(index_q.shape)}")
    _check(index_k_cache.dim() == 2, f"index_k_cache must be [num_slots, Di], got {tuple(index_k_cache.shape)}")
    T, H, di = index_q.shape
    _check(index_k_cache.shape[1] == di,
           f"index head dim mismatch: index_q has Di={di}, index_k_cache has Di={index_k_cache.shape[1]}")
    _check(block_size >= 1, f"block_size must be >= 1, got {block_size}")
    _check(topk_blocks >= 1, f"topk_blocks must be >= 1, got {topk_blocks}")
    _check(init_blocks >= 0 and local_blocks >= 0,
           f"init_blocks ({init_blocks}) and local_blocks ({local_blocks}) must be >= 0")
    # Otherwise the forced blocks could not all fit into the selection.
    _check(init_blocks + local_blocks <= topk_blocks,
           f"init_blocks + local_blocks ({init_blocks} + {local_blocks}) must be <= topk_blocks ({topk_blocks})")
    if out is None:
        out = torch.full((T, H, topk_blocks), -1, dtype=torch.int32, device=index_q.device)
    else:
        _check(tuple(out.shape) == (T, H, topk_blocks),
               f"out must have shape {(T, H, topk_blocks)}, got {tuple(out.shape)}")
    metadata = _request_metadata(req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, T)
    dev = index_q.device

    for slots, chunks in _requests(req_to_token, metadata, H, dev):
        ik = index_k_cache[slots].float()  # [S, Di]; gathered once, fp32 (bf16/fp8 caches)
        for rows_t, pos, n_keys in chunks:  # keys beyond the chunk's last query are never visible
            C = pos.numel()
            n_blk = -(-n_keys // block_size)
            iq = index_q[rows_t].float()  # [C, H, Di]

            # s_h(p, j), -inf for future keys and for the padding of the last (partial) block.
            s = torch.einsum("chd,sd->chs", iq, ik[:n_keys])
            key_pos = torch.arange(n_blk * block_size, device=dev)
            s = torch.nn.functional.pad(s, (0, n_blk * block_size - n_keys), value=float("-inf"))
            s = s.masked_fill((key_pos[None, :] > pos[:, None])[:, None, :], float("-inf"))
            score = s.view(C, H, n_blk, block_size).amax(dim=-1)  # [C, H, n_blk]

            blk = torch.arange(n_blk, device=dev)[None, :]  # [1, n_blk]
            nb = (pos // block_size + 1)[:, None]  # [C, 1] visible blocks per query
            visible = blk < nb
            forced = visible & ((blk < init_blocks) | (blk >= nb - local_blocks))
            # Visible blocks hold >= 1 visible key, so their score is finite; clamp NaN/-inf anyway
            # (kernels map NaN to -1e30) so that a visible block always outranks an invisible one.
            score = torch.nan_to_num(score, nan=-1e30, neginf=-1e30)
            score = score.masked_fill(forced[:, None, :], float("inf"))  # forced always win
            score = score.masked_fill(~visible[:, None, :], float("-inf"))

            # K(p) = min(topk, nb(p)): take min(topk, n_blk) and drop picks that are not visible
            # (only happens when nb(p) < topk, where every visible block is picked first).
            width = min(topk_blocks, n_blk)
            ids = score.topk(width, dim=-1).indices  # [C, H, width]
            ids = torch.where(ids < nb[:, :, None], ids, n_blk)  # n_blk sorts after every real id
            ids = ids.sort(dim=-1).values
            ids = torch.where(ids == n_blk, -1, ids).to(torch.int32)
            res = torch.full((C, H, topk_blocks), -1, dtype=torch.int32, device=dev)
            res[:, :, :width] = ids
            out[rows_t] = res.to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------


@_exact_fp32
def sparse_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                     req_pool_indices: Tensor, seq_lens: Tensor, extend_seq_lens: Tensor,
                     extend_start_loc: Tensor, block_topk: Tensor, *, block_size: int,
                     sm_scale: float, out: Tensor | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> Tensor:
    """Exact softmax attention of each new token over the keys of its selected blocks.

    q [T, Hq, D]; k_cache [num_slots, Hkv, D]; v_cache [num_slots, Hkv, Dv];
    block_topk int32 [T, Hkv, topk] (-1 = unused). Query head qh reads KV head qh // (Hq // Hkv)
    and that KV head's block list. Key j is used by query p iff j <= p and j // block_size is
    listed (duplicate ids count once; ids outside the sequence's blocks are ignored like -1).
    Returns [T, Hq, Dv] in q.dtype (written into ``out`` if given). A (token, head) with no
    usable key gets 0. Rows not owned by any request are left untouched in ``out``.
    Caches of any float dtype (model dtype, or float8_e4m3fn for --kv-cache-dtype fp8_e4m3) are read
    as fp32 times their per-tensor scale: K = k_cache * k_scale, V = v_cache * v_scale (SGLang's fp8
    KV convention: the pool stores k / k_scale; unit scales unless the checkpoint gives them).
    """
    _check(q.dim() == 3, f"q must be [T, Hq, D], got {tuple(q.shape)}")
    _check(k_scale > 0 and v_scale > 0, f"k_scale ({k_scale}) and v_scale ({v_scale}) must be > 0")
    _check(k_cache.dim() == 3 and v_cache.dim() == 3,
           f"k_cache/v_cache must be [num_slots, Hkv, D], got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    T, hq, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[2]
    _check(k_cache.shape[2] == d, f"head dim mismatch: q has D={d}, k_cache has D={k_cache.shape[2]}")
    _check(v_cache.shape[:2] == k_cache.shape[:2],
           f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)} in slots/heads")
    _check(hkv >= 1 and hq % hkv == 0, f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    _check(block_topk.dim() == 3 and block_topk.shape[:2] == (T, hkv),
           f"block_topk must be [T={T}, Hkv={hkv}, topk], got {tuple(block_topk.shape)}")
    _check(block_size >= 1, f"block_size must be >= 1, got {block_size}")
    if out is None:
        out = torch.zeros((T, hq, dv), dtype=q.dtype, device=q.device)
    else:
        _check(tuple(out.shape) == (T, hq, dv), f"out must have shape {(T, hq, dv)}, got {tuple(out.shape)}")
    metadata = _request_metadata(req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, T)
    group = hq // hkv
    dev = q.device

    for slots, chunks in _requests(req_to_token, metadata, hq, dev):
        k = k_cache[slots].float() * k_scale  # [S, Hkv, D], dequantized in fp32
        v = v_cache[slots].float() * v_scale  # [S, Hkv, Dv]
        for rows_t, pos, n_keys in chunks:
            C = pos.numel()
            n_blk = -(-n_keys // block_size)

            # Block list -> boolean block mask [C, Hkv, n_blk]; unused (-1) and out-of-range ids are
            # routed to an extra dummy column that is dropped.
            sel = block_topk[rows_t].long()
            sel = torch.where((sel >= 0) & (sel < n_blk), sel, n_blk)
            blk_mask = torch.zeros((C, hkv, n_blk + 1), dtype=torch.bool, device=dev)
            blk_mask.scatter_(2, sel, True)
            key_pos = torch.arange(n_keys, device=dev)
            allowed = blk_mask[:, :, key_pos // block_size]  # [C, Hkv, S]
            allowed &= (key_pos[None, :] <= pos[:, None])[:, None, :]  # token-level causal mask

            qc = q[rows_t].float().view(C, hkv, group, d)
            logits = torch.einsum("chgd,shd->chgs", qc, k[:n_keys]) * sm_scale
            logits = logits.masked_fill(~allowed[:, :, None, :], float("-inf"))
            # Plain softmax, except that rows with no allowed key give 0 instead of NaN.
            m = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
            p = torch.exp(logits - m)
            denom = p.sum(dim=-1, keepdim=True)
            o = torch.einsum("chgs,shd->chgd", p, v[:n_keys]) / denom.clamp_min(torch.finfo(torch.float32).tiny)
            out[rows_t] = o.reshape(C, hq, dv).to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# target verify (speculative decoding): the N draft tokens of a request as queries
# ----------------------------------------------------------------------------------------------
#
# SGLang's TARGET_VERIFY batch (0.5.17: forward_batch_info.py init_new, eagle_utils.py
# build_tree_kernel_efficient, ngram_worker.py): every request has exactly N draft tokens packed at
# rows [i*N, (i+1)*N), node 0 being the root (the bonus token); ``seq_lens`` is the committed prefix
# and EXCLUDES them; draft j of request i sits in slot req_to_token[row_i, seq_len_i + j] (=
# out_cache_loc[i*N + j]) at position seq_len_i + depth(j); the extend_* fields are None.
# MSA semantics of verify (M3_SPEC.md §3.8): each draft node is the last token of a prefill of
# prefix + its root-to-node path, so it selects its blocks over exactly those keys, its own block
# forced. Both helpers below only rewrite the batch layout; the MSA functions above do the work.


def verify_chain_layout(seq_lens: Tensor, num_draft_tokens: int, *, out: tuple[Tensor, Tensor, Tensor] | None = None):
    """Chain verify (EAGLE topk=1: node j's path is nodes 0..j) in the extend form of the MSA functions.

    seq_lens [bs] (committed prefix, drafts excluded). Returns (total_lens = seq_lens + N,
    extend_seq_lens = N, extend_start_loc = i*N), each [bs] int32 (into ``out``'s three [>= bs]
    buffers if given: fixed addresses for CUDA graphs). Draft j is then the new token at position
    seq_len + j reading keys < seq_len + j + 1 of the real req_to_token row -- a prefill of
    prefix + drafts 0..j. Device ops only (no host sync).
    """
    _check(num_draft_tokens >= 1, f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    _check(seq_lens.dim() == 1, f"seq_lens must be 1-D [bs], got {tuple(seq_lens.shape)}")
    bs = seq_lens.numel()
    if out is None:
        out = tuple(torch.empty(bs, dtype=torch.int32, device=seq_lens.device) for _ in range(3))
    total, ext, start = (o[:bs] for o in out)
    torch.add(seq_lens, num_draft_tokens, out=total)
    ext.fill_(num_draft_tokens)
    torch.mul(torch.arange(bs, dtype=torch.int32, device=seq_lens.device), num_draft_tokens, out=start)
    return total, ext, start


def verify_tree_rows(custom_mask: Tensor, seq_lens: Tensor, req_pool_indices: Tensor, out_cache_loc: Tensor,
                     req_to_token: Tensor, num_draft_tokens: int, *, out_req_to_token: Tensor | None = None,
                     out_seq_lens: Tensor | None = None):
    """Tree verify (EAGLE topk>1, NGRAM) as one decode row per draft node over a virtual req_to_token.

    custom_mask: SGLang's FULL_MASK tree mask, flat bool/uint8 (0.5.17 eagle_utils.py
      build_tree_kernel_efficient / spec_tree.py, ngram_worker.py): request i owns N*(seq_len_i + N)
      entries starting at sum_{i'<i} N*(seq_len_i' + N); row x of it has seq_len_i + N columns, the
      first seq_len_i for the prefix, then column seq_len_i + j true iff draft j is x itself or an
      ancestor of x. Only the N x N tree part is read.
    seq_lens [bs] committed prefix; req_pool_indices [bs]; out_cache_loc [bs*N] slots of the drafts;
    req_to_token [rows, W] int32.
    Returns (virtual req_to_token int32 [bs*N, W + 1], node_seq_lens int64 [bs*N]) (into the
    ``out_*`` buffers, of >= bs*N rows, if given): row k = i*N + x holds request i's prefix slots at
    positions < seq_len_i and, at position seq_len_i + depth(j), the slot of each draft j on x's
    path (depth(j) = its ancestor count, itself excluded); node_seq_lens[k] = seq_len_i + depth(x) + 1.
    With req_pool_indices = arange(bs*N) and seq_lens = node_seq_lens, the decode form of the MSA
    functions then computes, for every node, exactly the prefill of prefix + path. Column W is a
    scratch column (off-path writes land there; never read, as node_seq_lens <= W).
    Device ops with static shapes only (graph-capturable; values are not validated).
    """
    n = num_draft_tokens
    _check(n >= 1, f"num_draft_tokens must be >= 1, got {n}")
    bs = seq_lens.numel()
    _check(req_pool_indices.numel() == bs, f"req_pool_indices has {req_pool_indices.numel()} entries, seq_lens {bs}")
    _check(out_cache_loc.numel() == bs * n,
           f"out_cache_loc must hold N={n} slots per request ({bs * n}), got {out_cache_loc.numel()}")
    _check(req_to_token.dim() == 2, f"req_to_token must be 2-D [pool, max_len], got {tuple(req_to_token.shape)}")
    dev, width = seq_lens.device, req_to_token.shape[1]
    s = seq_lens.long()
    span = n * (s + n)  # mask entries of each request
    start = torch.cumsum(span, 0) - span
    ar = torch.arange(n, device=dev)
    idx = start[:, None, None] + ar[None, :, None] * (s + n)[:, None, None] + s[:, None, None] + ar[None, None, :]
    on_path = custom_mask[idx] != 0  # [bs, x, j]: draft j on the path of node x
    depth = on_path.sum(-1) - 1  # [bs, N]
    pos = s[:, None] + depth  # position of each draft

    if out_req_to_token is None:
        out_req_to_token = torch.empty((bs * n, width + 1), dtype=req_to_token.dtype, device=dev)
    if out_seq_lens is None:
        out_seq_lens = torch.empty(bs * n, dtype=torch.int64, device=dev)
    _check(out_req_to_token.shape[0] >= bs * n and out_req_to_token.shape[1] == width + 1,
           f"out_req_to_token must be [>= {bs * n}, {width + 1}], got {tuple(out_req_to_token.shape)}")
    virt, node_lens = out_req_to_token[: bs * n], out_seq_lens[: bs * n]
    virt[:, :width].copy_(req_to_token.index_select(0, req_pool_indices.long().repeat_interleave(n)))
    cols = torch.where(on_path, pos[:, None, :], width).view(bs * n, n)
    slots = out_cache_loc.view(bs, 1, n).expand(bs, n, n).reshape(bs * n, n).to(virt.dtype)
    virt.scatter_(1, cols, slots)
    node_lens.copy_((pos + 1).view(-1))
    return virt, node_lens
