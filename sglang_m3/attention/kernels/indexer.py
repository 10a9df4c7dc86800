"""Lightning indexer: per-(token, index head) top-k key blocks, in Triton. Twin: reference.index_block_topk.

Work decomposition
  * A *tile* is a run of consecutive new tokens of one request (1 token in decode; up to
    64 / H_pad tokens in extend). Its rows are (token, index head) pairs, packed along the M
    dimension of one tl.dot: the single shared index-key head means one key block loaded from
    memory serves every head of every token of the tile. Key traffic (S x Di bf16 per tile) is the
    cost of this kernel, so packing heads (and, in extend, tokens) is what makes it fast.
  * The key axis of a tile (blocks 0 .. nb(last token) - 1) is cut into ``n_splits`` contiguous
    ranges, one program each, so that a small decode batch still occupies the GPU.
  * A program scans its blocks one at a time: key tile = one block (block_size keys) gathered
    through req_to_token, scores [rows, block] in fp32, per-row max over the visible keys, then the
    block is inserted into a running per-row top-k held in registers. Nothing of size
    O(context) is ever written to memory.
  * Running top-k entries are packed int64 keys: (order-preserving fp32 bits of the score) << 32 |
    (2^31 - 1 - block id). One integer compare orders by score, ties by the lower block id, so
    selection is deterministic and a merge is a plain integer top-k.
  * With n_splits > 1 each split stores its top-k; a second kernel merges them per token (bitonic
    tl.topk over chunks of splits on GPU; topk rounds of max under the interpreter, where tl.topk
    costs seconds). With n_splits == 1 the main kernel writes the result directly.
  * The result row is the selected block ids sorted ascending, -1 padded (as the twin); ordering is
    done by ranking (one [rows, k, k] compare), not by a sort.

Two-pass variant (small decode-shaped batches, ``uses_two_pass``): at batch 1 the split kernel's programs
each walk ~16 blocks one after the other and its merge grows with the split count, so the key axis cannot
be cut finely enough to fill the GPU. Pass 1 is the same kernel (same block scores, bit for bit) with
SCORES set: grid (token, program), each program scores a contiguous range of >= 1 blocks and stores each
visible block's score image (int32, the packed key's high word) in a scratch int32 [T, H, max_blocks],
max_blocks = ceil(req_to_token.shape[1] / block_size) -- fixed by the pool's shape, so it is sized once
at warmup and stays valid for every captured graph. Pass 2 (``_indexer_select_kernel``, one program per
(token, index head)) finds the k-th largest score image by a 4-bit radix search and takes the blocks above
it plus the lowest-id blocks equal to it, ids written ascending through a prefix sum. Same keys, same
order -> the same selection as the split variant. ``select="rank"`` (the default) runs the same kernel with
RANK_MAX > 0: rows of at most common.INDEXER_RANK_MAX_BLOCKS visible blocks are selected by all-pairs ranking
(``_rank_select``: no dependent rounds; fastest up to 32K context, see common.py), longer rows of the same launch
by common.INDEXER_LONG_ROW_SELECT: the threshold select (``_threshold_select``: the k-th largest of the rows' group
maxima bounds the top-k from below, and only the blocks of those k groups are ranked) or the radix search;
``select="radix"`` / ``"threshold"`` run one of those for every row.

Measured on one H200 (graph replay, bf16, 4 index heads, block 128, top-16): decode bs 256 x 32K
context 0.52 ms = 4.1 TB/s of index keys; bs 32 x 32K 96 us (2.8 TB/s); bs 1 x 128K 70 us (0.48 TB/s:
a lone program's block loop costs ~2.5 us per block and is not overlapped by Triton's pipeliner;
more splits move the cost into the merge). Extend: 8192 new tokens after a 32K prefix, 2.4 ms.

Graph safety: grid = (max tiles, n_splits), both functions of tensor shapes only (two-pass: also the
req_to_token width); context lengths are read on the device (loop bounds), so one capture serves every
replay. The variant is chosen from shapes too, hence fixed at capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import MSAMeta, MSAWorkspace

_MINKEY = tl.constexpr(-(2**63))  # empty slot / invisible block (below every packed key)
_MAXKEY = tl.constexpr(2**63 - 1)  # padding slot beyond topk (never evicted, never reported)
_BIG_ID = tl.constexpr(2**31 - 1)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_INT32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _store_ids(out_ptr, row_off, row_ok, keys, kcol, TOPK: tl.constexpr):
    """Store the block ids of the valid keys among columns < TOPK of keys [R, K_PAD], ascending,
    -1 padded, at out_ptr + row_off[r] + column.

    No sort: each entry's output column is its rank under a unique sort key (id for valid
    entries, 2^30 + column for the rest), computed by one [R, K, K] comparison -- cheaper than a
    bitonic sort for K = 16 and a single reduction in the interpreter.
    """
    valid = (keys != _MINKEY) & (keys != _MAXKEY) & (kcol[None, :] < TOPK)
    ids = keys.to(tl.int32) ^ _BIG_ID  # low word (truncation) holds 2^31 - 1 - id
    skey = tl.where(valid, ids, (1 << 30) + kcol[None, :])
    rank = tl.sum((skey[:, None, :] < skey[:, :, None]).to(tl.int32), axis=2)  # [R, K]
    tl.store(out_ptr + row_off[:, None] + rank, tl.where(valid, ids, -1).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (rank < TOPK))


@triton.jit
def _tile(tile, tok_row_ptr, tok_pos_ptr, tile_tok0_ptr, tile_ntok_ptr, tile_row_ptr, tile_pos0_ptr,
          BLOCK_T: tl.constexpr):
    """(first token, token count, req_to_token row, first position) of a tile; ntok 0 = no work."""
    if BLOCK_T == 1:
        row = tl.load(tok_row_ptr + tile)
        ntok = tl.where(row >= 0, 1, 0)
        return tile, ntok, row, tl.load(tok_pos_ptr + tile)
    else:
        return (tl.load(tile_tok0_ptr + tile), tl.load(tile_ntok_ptr + tile),
                tl.load(tile_row_ptr + tile), tl.load(tile_pos0_ptr + tile))


@triton.jit
def _block_slots(r2t_row, b, b_hi, p_last, offs_n, BLOCK_SIZE: tl.constexpr):
    """Cache slots of key block b (masked off beyond the token's last position or the split's range)."""
    j = b * BLOCK_SIZE + offs_n
    return tl.load(r2t_row + j, mask=(offs_n < BLOCK_SIZE) & (j <= p_last) & (b < b_hi), other=0).to(tl.int64)


@triton.jit
def _block_keys(k_ptr, stride_ks, slot, b, b_hi, p_last, offs_n, offs_d, d_ok, BLOCK_SIZE: tl.constexpr):
    """Index keys [BN, DI] (DI contiguous) of key block b at the given slots (same mask as _block_slots)."""
    j = b * BLOCK_SIZE + offs_n
    kv = (offs_n < BLOCK_SIZE) & (j <= p_last) & (b < b_hi)
    return tl.load(k_ptr + slot[:, None] * stride_ks + offs_d[None, :], mask=kv[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _split_range(nb_tile, n_splits, min_chunk):
    chunk = tl.maximum((nb_tile + n_splits - 1) // n_splits, min_chunk)
    n_active = (nb_tile + chunk - 1) // chunk
    return chunk, n_active


# Integer arguments that vary with the batch size are not specialised on (Triton compiles a variant per value
# class: == 1, multiple of 16, other): one compiled kernel then serves every captured batch size.
@triton.jit(do_not_specialize=["n_splits", "min_chunk", "max_blocks"])
def _indexer_kernel(
    q_ptr, stride_qt, stride_qh,                 # index_q [T, H, DI]
    k_ptr, stride_ks,                            # index_k_cache [slots, DI]
    r2t_ptr, stride_r2t,                         # req_to_token [rows, max_len]
    tok_row_ptr, tok_pos_ptr, tile_tok0_ptr, tile_ntok_ptr, tile_row_ptr, tile_pos0_ptr,
    out_ptr, stride_ot, stride_oh,               # out [T, H, TOPK] (n_splits == 1)
    part_ptr,                                    # int64 [T, H, n_splits, TOPK] (n_splits > 1)
    score_ptr, max_blocks,                       # int32 [T, H, max_blocks] (SCORES)
    n_splits, min_chunk,
    H: tl.constexpr, H_PAD: tl.constexpr, DI: tl.constexpr, DI_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BN: tl.constexpr, BLOCK_T: tl.constexpr, M: tl.constexpr,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    DOT_F32: tl.constexpr, PREFETCH: tl.constexpr, SCORES: tl.constexpr,
):
    # SCORES (pass 1 of the two-pass indexer, BLOCK_T == 1): instead of keeping a running top-k, store every
    # visible block's order-preserving score image (the high word of the packed key below) at
    # score_ptr[(token * H + head) * max_blocks + block]; _indexer_select_kernel picks the top-k from there.
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tok0, ntok, row, pos0 = _tile(tile, tok_row_ptr, tok_pos_ptr, tile_tok0_ptr, tile_ntok_ptr,
                                  tile_row_ptr, tile_pos0_ptr, BLOCK_T)
    if ntok == 0:
        return
    p_last = pos0 + ntok - 1
    nb_tile = p_last // BLOCK_SIZE + 1
    chunk, n_active = _split_range(nb_tile, n_splits, min_chunk)
    if split >= n_active:
        return
    b_lo = split * chunk
    b_hi = tl.minimum(b_lo + chunk, nb_tile)

    # rows = (token in tile, head) pairs; padding rows get pos -1 (nothing visible).
    offs_m = tl.arange(0, M)
    t_in = offs_m // H_PAD
    head = offs_m % H_PAD
    row_ok = (t_in < ntok) & (head < H)
    tok = tok0 + t_in
    row_pos = tl.where(row_ok, pos0 + t_in, -1)
    nb_row = tl.where(row_ok, row_pos // BLOCK_SIZE + 1, 0)  # visible blocks per row

    offs_d = tl.arange(0, DI_PAD)
    d_ok = offs_d < DI
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, DI]

    kcol = tl.arange(0, K_PAD)
    keys = tl.full([M, K_PAD], _MINKEY, tl.int64)
    keys = tl.where(kcol[None, :] < TOPK, keys, _MAXKEY)
    r2t_row = r2t_ptr + row.to(tl.int64) * stride_r2t
    srow = (tok * H + head).to(tl.int64) * max_blocks  # [M] (SCORES)

    offs_n = tl.arange(0, BN)
    # A lone program's loop is latency-bound: slot load -> key gather -> dot -> insert, each waiting on the
    # last, and Triton's pipeliner does not overlap the indirect gather. With PREFETCH the next block's keys
    # (and the slots of the one after) are loaded an iteration early. It costs registers, so it is only on when
    # the grid is too small to hide latency by occupancy (see index_block_topk).
    if PREFETCH:
        slot_next = _block_slots(r2t_row, b_lo, b_hi, p_last, offs_n, BLOCK_SIZE)
        k_next = _block_keys(k_ptr, stride_ks, slot_next, b_lo, b_hi, p_last, offs_n, offs_d, d_ok, BLOCK_SIZE)
        slot_next = _block_slots(r2t_row, b_lo + 1, b_hi, p_last, offs_n, BLOCK_SIZE)
    for b in range(b_lo, b_hi):
        j = b * BLOCK_SIZE + offs_n
        kv = (offs_n < BLOCK_SIZE) & (j <= p_last)
        if PREFETCH:
            k = k_next
            k_next = _block_keys(k_ptr, stride_ks, slot_next, b + 1, b_hi, p_last, offs_n, offs_d, d_ok, BLOCK_SIZE)
            slot_next = _block_slots(r2t_row, b + 2, b_hi, p_last, offs_n, BLOCK_SIZE)
        else:
            slot = _block_slots(r2t_row, b, b_hi, p_last, offs_n, BLOCK_SIZE)
            k = _block_keys(k_ptr, stride_ks, slot, b, b_hi, p_last, offs_n, offs_d, d_ok, BLOCK_SIZE)
        if DOT_F32:  # (inlined, not a helper: the interpreter pays ~ms per nested jit call)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # [M, BN]
        else:
            s = tl.dot(q, tl.trans(k))  # [M, BN] fp32 accumulation
        s = tl.where(kv[None, :] & (j[None, :] <= row_pos[:, None]), s, float("-inf"))
        sc = tl.max(s, axis=1)  # block score per row
        # twin: amax propagates NaN, then nan_to_num(nan=-1e30, neginf=-1e30, posinf=FLT_MAX)
        # (explicit NaN test: GPU max ignores NaN, the interpreter's propagates it)
        nan_row = tl.max((s != s).to(tl.int32), axis=1) > 0
        sc = tl.where(nan_row | (sc == float("-inf")), -1e30, sc)
        sc = tl.where(sc == float("inf"), _FLT_MAX, sc)
        visible = b < nb_row
        forced = visible & ((b < INIT_BLOCKS) | (b >= nb_row - LOCAL_BLOCKS))
        sc = tl.where(forced, float("inf"), sc)
        # packed key (inlined): order-preserving int32 image of the score, then 2^31-1-id below it
        bits = sc.to(tl.int32, bitcast=True)
        skey = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse magnitude order
        new = (skey.to(tl.int64) << 32) | ((b + 0 * nb_row) ^ _BIG_ID).to(tl.int64)
        if SCORES:
            tl.store(score_ptr + srow + b, skey, mask=visible & (b < max_blocks))
        else:
            new = tl.where(visible, new, _MINKEY)  # [M]
            # insert into the running top-k: replace the row's smallest key if the new one beats it
            low, at = tl.min(keys, axis=1, return_indices=True)
            hit = (new > low)[:, None] & (kcol[None, :] == at[:, None])
            keys = tl.where(hit, new[:, None], keys)

    if SCORES:
        pass
    elif n_splits == 1:
        _store_ids(out_ptr, tok.to(tl.int64) * stride_ot + head * stride_oh, row_ok, keys, kcol, TOPK)
    else:
        prow = ((tok * H + head) * n_splits + split).to(tl.int64) * TOPK
        tl.store(part_ptr + prow[:, None] + kcol[None, :], keys,
                 mask=row_ok[:, None] & (kcol[None, :] < TOPK))


@triton.jit(do_not_specialize=["n_splits", "min_chunk"])
def _indexer_merge_kernel(
    tok_row_ptr, tok_pos_ptr, tile_tok0_ptr, tile_ntok_ptr, tile_row_ptr, tile_pos0_ptr,
    out_ptr, stride_ot, stride_oh, part_ptr,
    n_splits, min_chunk,
    H: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    R: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, CS: tl.constexpr, BITONIC: tl.constexpr,
):
    # One program per (tile, token of the tile), rows = index heads: top-k over the split partials
    # (only the splits that ran), CS splits at a time, then ascending ids. Recomputes the split
    # layout exactly as the main kernel did. (Rows = heads only keeps this kernel small: a
    # [64-row] variant took 30 s to compile.)
    tile = tl.program_id(0)
    t_in = tl.program_id(1)
    tok0, ntok, row, pos0 = _tile(tile, tok_row_ptr, tok_pos_ptr, tile_tok0_ptr, tile_ntok_ptr,
                                  tile_row_ptr, tile_pos0_ptr, BLOCK_T)
    if t_in >= ntok:
        return
    nb_tile = (pos0 + ntok - 1) // BLOCK_SIZE + 1
    chunk, n_active = _split_range(nb_tile, n_splits, min_chunk)

    head = tl.arange(0, R)
    row_ok = head < H
    tok = tok0 + t_in
    base = ((tok * H + head) * n_splits).to(tl.int64) * TOPK  # [R]

    kcol = tl.arange(0, K_PAD)
    ccol = tl.arange(0, CS * K_PAD)
    c_split = ccol // K_PAD
    c_k = ccol % K_PAD
    run = tl.full([R, K_PAD], _MINKEY, tl.int64)  # best TOPK keys so far
    for s0 in range(0, n_active, CS):
        sp = s0 + c_split
        cand = tl.load(part_ptr + base[:, None] + (sp * TOPK + c_k)[None, :],
                       mask=row_ok[:, None] & ((sp < n_active) & (c_k < TOPK))[None, :], other=_MINKEY)
        if BITONIC:
            # GPU: bitonic top-K_PAD of the chunk, then of (running U chunk's best).
            top = tl.topk(cand, K_PAD, dim=1)
            run = tl.topk(tl.reshape(tl.join(run, top), [R, 2 * K_PAD]), K_PAD, dim=1)
        else:
            # Interpreter (where tl.topk costs seconds per program): TOPK rounds of "take the
            # largest of run U cand"; keys are unique per row (distinct block ids), so removing the
            # picked key removes exactly one entry.
            new = tl.full([R, K_PAD], _MINKEY, tl.int64)
            for r in tl.static_range(TOPK):
                best = tl.maximum(tl.max(cand, axis=1), tl.max(run, axis=1))
                new = tl.where(kcol[None, :] == r, best[:, None], new)
                cand = tl.where(cand == best[:, None], _MINKEY, cand)
                run = tl.where(run == best[:, None], _MINKEY, run)
            run = new
    # run holds the TOPK best keys in its first TOPK columns (both paths sort descending)
    _store_ids(out_ptr, tok.to(tl.int64) * stride_ot + head * stride_oh, row_ok, run, kcol, TOPK)


@triton.jit
def _rank_key(image, ids):
    # (score image, 2^31 - 1 - id) as one int64, as the packed keys: one compare orders by score, ties to the lower
    # id, and no two blocks compare equal
    return (image.to(tl.int64) << 32) | (ids ^ _BIG_ID).to(tl.int64)


@triton.jit
def _store_picks(dst, pick, ids):
    # The picked ids, in order, from dst on: each at the number of picks before it (a prefix sum). Returns the count.
    pk = pick.to(tl.int32)
    tl.store(dst + tl.cumsum(pk, axis=0) - pk, ids.to(dst.dtype.element_ty), mask=pick)
    return tl.sum(pk, axis=0)


@triton.jit
def _pad_row(out_row, taken, TOPK: tl.constexpr, K_PAD: tl.constexpr):
    # -1 in an out row's columns taken .. TOPK - 1 (a row with fewer visible blocks than TOPK)
    kcol = tl.arange(0, K_PAD)
    tl.store(out_row + kcol, tl.full([K_PAD], -1, out_row.dtype.element_ty), mask=(kcol >= taken) & (kcol < TOPK))


@triton.jit
def _rank_select(row, out_row, nb, need, RB: tl.constexpr, CC: tl.constexpr):
    # Pass 2 by all-pairs ranking (select="rank"): block b's rank is #{b': s_b' > s_b} + #{b' < b: s_b' == s_b}
    # (its place in the packed-key order: score descending, ties to the lower id); b is picked iff rank < need,
    # and its output column is the number of picks below it (a prefix sum), so ids come out ascending -- the
    # radix select's exact output. RB rows at a time (spread over the threads), each compared with all nb blocks,
    # CC columns per [CC, RB] tile summed along the columns: Triton lays the columns out in each thread's registers,
    # so the sum needs no shuffle and no barrier (a [rows, columns] tile summed along axis 1 spreads the columns over
    # all warps: a cross-warp reduction per tile, seen in the sm_90 SASS). No dependent rounds: the column steps
    # only accumulate counts.
    rows = tl.arange(0, RB)
    cols = tl.arange(0, CC)
    taken = nb * 0
    for r0 in range(0, nb, RB):
        b = r0 + rows
        kb = _rank_key(tl.load(row + b, mask=b < nb, other=0), b)
        rank = tl.zeros([RB], tl.int32)
        n_full = nb - nb % CC
        for c0 in range(0, n_full, CC):  # whole column steps: unmasked loads (fewer instructions per column)
            c = c0 + cols
            kc = _rank_key(tl.load(row + c), c)
            rank += tl.sum((kc[:, None] > kb[None, :]).to(tl.int32), axis=0)
        for c0 in range(n_full, nb, CC):  # the last, partial step (at most one)
            c = c0 + cols
            # Columns past nb read as INT32_MIN, and such a column never beats a real block: its key is below every
            # key of a higher score, and against an INT32_MIN score its id is the higher. So no column mask.
            kc = _rank_key(tl.load(row + c, mask=c < nb, other=_INT32_MIN), c)
            rank += tl.sum((kc[:, None] > kb[None, :]).to(tl.int32), axis=0)
        taken += _store_picks(out_row + taken, (b < nb) & (rank < need), b)
    return taken


@triton.jit
def _rank_row(row, out_row, nb, RB: tl.constexpr, CC: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr):
    # A whole row of nb blocks ranked (_rank_select, row tiles of RB) into out_row: the top min(nb, TOPK) ids
    # ascending, -1 in the columns left
    _pad_row(out_row, _rank_select(row, out_row, nb, tl.minimum(nb, TOPK), RB, CC), TOPK, K_PAD)


@triton.jit
def _digit_counts(sc, ok, level, p: tl.constexpr):
    # Round p of the radix search: the 16-bin histogram of the blocks' p-th 4-bit digit (MSB first; round 0 the signed
    # top nibble, shifted to 0..15 in order), counting only the blocks (ok) whose higher digits equal `level`.
    bins = tl.arange(0, 16)
    if p == 0:
        dig = (sc >> 28) + 8
    else:
        dig = (sc >> (28 - 4 * p)) & 15
        ok = ok & ((sc >> (32 - 4 * p)) == level)
    return tl.sum(((dig[:, None] == bins[None, :]) & ok[:, None]).to(tl.int32), axis=0)


@triton.jit
def _radix_step(hist, need, level, p: tl.constexpr):
    # From round p's histogram: tau's digit d (the largest whose blocks at or above it reach `need`), the picks
    # still to make among the blocks equal to tau so far, and tau's decided digits.
    bins = tl.arange(0, 16)
    ge = tl.sum(tl.where(bins[None, :] >= bins[:, None], hist[None, :], 0), axis=1)  # blocks with digit >= b
    d = tl.max(tl.where(ge >= need, bins, -1), axis=0)
    need -= tl.sum(tl.where(bins == d, ge - hist, 0), axis=0)  # those strictly above d are all picked
    if p == 0:
        level = d - 8
    else:
        level = level * 16 + d
    return need, level


@triton.jit
def _ranks_in(buf, r, n, CC: tl.constexpr):
    # The keys buf[r] (_MINKEY where r >= n) and the rank of each among the n distinct int64 keys at buf[0:n] (how
    # many are larger), CC columns per step; padding columns read _MINKEY, which is larger than no real key.
    kr = tl.load(buf + r, mask=r < n, other=_MINKEY)
    cols = tl.arange(0, CC)
    rank = r * 0
    for c0 in range(0, n, CC):
        c = c0 + cols
        kc = tl.load(buf + c, mask=c < n, other=_MINKEY)
        rank += tl.sum((kc[:, None] > kr[None, :]).to(tl.int32), axis=0)
    return kr, rank


@triton.jit
def _kth_key(buf, n, k, RT: tl.constexpr, CC: tl.constexpr):
    # The k-th largest of the n distinct int64 keys at buf[0:n] (RT rows at a time); _MINKEY when n < k.
    rows = tl.arange(0, RT)
    kth = tl.full([RT], _MINKEY, tl.int64)
    for r0 in range(0, n, RT):
        r = r0 + rows
        kr, rank = _ranks_in(buf, r, n, CC)
        kth = tl.maximum(kth, tl.where((r < n) & (rank == k - 1), kr, _MINKEY))
    return tl.max(kth, axis=0)


@triton.jit
def _group_keys(row, g0, nb, G: tl.constexpr, GC: tl.constexpr):
    # The packed keys of groups g0 .. g0 + GC - 1 of G consecutive blocks ([GC, G], _MINKEY past nb) and their ids
    b = (g0 + tl.arange(0, GC))[:, None] * G + tl.arange(0, G)[None, :]
    ok = b < nb
    return tl.where(ok, _rank_key(tl.load(row + b, mask=ok, other=0), b), _MINKEY), ok


@triton.jit
def _threshold_select(row, out_row, buf, nb, need, G: tl.constexpr, GC: tl.constexpr, RT: tl.constexpr,
                      CC: tl.constexpr):
    # Pass 2 by a threshold (select="threshold"): tau = the need-th largest of the maxima of the row's groups of G
    # consecutive blocks. At least `need` blocks (those groups' maxima) have keys >= tau, so the top `need` are
    # among them, and every such block lies in one of the `need` groups whose maximum is >= tau: at most need * G
    # candidates (random scores: ~need). They are compacted in block order into buf (a per-row int64 scratch of
    # max(groups, TOPK * G)), ranked all-pairs, and the picks written through a prefix sum, ids ascending -- the
    # radix search's exact output. Work: two reads of the row (maxima, candidates), ranks over ~nb / G maxima and
    # ~need candidates, instead of 8 dependent histogram rounds over the row.
    ng = (nb + G - 1) // G
    gi = tl.arange(0, GC)
    for g0 in range(0, ng, GC):  # the group maxima into buf[0:ng]
        keys, ok = _group_keys(row, g0, nb, G, GC)
        tl.store(buf + g0 + gi, tl.max(keys, axis=1), mask=g0 + gi < ng)
    tl.debug_barrier()  # (other threads' maxima are read next, and buf is overwritten after)
    tau = _kth_key(buf, ng, need, RT, CC)
    tl.debug_barrier()
    n_cand = nb * 0
    for g0 in range(0, ng, GC):  # the candidates (keys >= tau), in block order, into buf[0:n_cand]
        keys, ok = _group_keys(row, g0, nb, G, GC)
        pick = tl.reshape(ok & (keys >= tau), [GC * G])
        pk = pick.to(tl.int32)
        tl.store(buf + n_cand + tl.cumsum(pk, axis=0) - pk, tl.reshape(keys, [GC * G]), mask=pick)
        n_cand += tl.sum(pk, axis=0)
    tl.debug_barrier()
    rows = tl.arange(0, RT)
    taken = nb * 0
    for r0 in range(0, n_cand, RT):
        r = r0 + rows
        kr, rank = _ranks_in(buf, r, n_cand, CC)
        ids = (kr & 0xFFFFFFFF).to(tl.int32) ^ _BIG_ID
        taken += _store_picks(out_row + taken, (r < n_cand) & (rank < need), ids)
    return taken


@triton.jit(do_not_specialize=["max_blocks", "stride_buf"])
def _indexer_select_kernel(
    tok_row_ptr, tok_pos_ptr, out_ptr, stride_ot, stride_oh, score_ptr, max_blocks, buf_ptr, stride_buf,
    H: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, CH: tl.constexpr,
    RANK_MAX: tl.constexpr, RB: tl.constexpr, CC: tl.constexpr,
    G: tl.constexpr = 0, GC: tl.constexpr = 1, RT: tl.constexpr = 1,
):
    # Pass 2 of the two-pass indexer: one program per (token, index head). The selection is the top TOPK visible
    # blocks by score image (the int32 order-preserving image pass 1 stored), ties to the lower block id -- the
    # order of the packed keys everywhere else. Rows of <= RANK_MAX blocks are ranked all-pairs (_rank_select);
    # longer ones take the threshold select (G > 0, _threshold_select) or the radix search (G == 0), which instead
    # of sorting 64-bit keys finds the threshold tau = the k-th
    # largest image (k = min(TOPK, visible blocks)) MSB first, 4 bits per round (8 rounds, each a 16-bin
    # histogram of the blocks whose higher digits equal tau's so far), then takes every block above tau and the
    # lowest-id blocks equal to it, writing their ids in ascending order at the running count of picks (a prefix
    # sum): no sort, no 64-bit data, all int32. The row is read in chunks of CH each round (1-4 KB per row: L1/L2
    # hits; holding it in registers instead was slower, see common.py).
    t = tl.program_id(0)
    h = tl.program_id(1)
    if tl.load(tok_row_ptr + t) < 0:  # token owned by no request: its out row stays untouched
        return
    nb = tl.minimum(tl.load(tok_pos_ptr + t) // BLOCK_SIZE + 1, max_blocks)
    row = score_ptr + (t * H + h).to(tl.int64) * max_blocks
    out_row = out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh
    if RANK_MAX > 0:  # (RANK_MAX == 0, select="radix": this block is not compiled at all)
        # two row tiles: rows of <= RANK_MAX / 2 blocks are not charged the compares of the larger one
        tl.static_assert(RB >= 2)
        if nb <= RANK_MAX // 2:
            _rank_row(row, out_row, nb, RB // 2, CC, TOPK, K_PAD)
            return
        if nb <= RANK_MAX:
            _rank_row(row, out_row, nb, RB, CC, TOPK, K_PAD)
            return
    if G > 0:  # rows past RANK_MAX by the threshold select
        buf = buf_ptr + (t * H + h).to(tl.int64) * stride_buf
        _pad_row(out_row, _threshold_select(row, out_row, buf, nb, tl.minimum(nb, TOPK), G, GC, RT, CC), TOPK, K_PAD)
    else:  # (G == 0: the radix search; the threshold select is not compiled)
        offs = tl.arange(0, CH)
        need = tl.minimum(nb, TOPK)  # picks still to make among the blocks that share tau's digits so far
        level = nb * 0  # tau >> (the bits not decided yet), signed
        for p in tl.static_range(8):
            hist = tl.zeros([16], tl.int32)
            for c0 in range(0, nb, CH):
                b = c0 + offs
                hist += _digit_counts(tl.load(row + b, mask=b < nb, other=0), b < nb, level, p)
            need, level = _radix_step(hist, need, level, p)
        # level == tau; take every block above it and the `need` lowest-id blocks equal to it, ids ascending
        taken = nb * 0
        eq_seen = nb * 0
        for c0 in range(0, nb, CH):
            b = c0 + offs
            ok = b < nb
            sc = tl.load(row + b, mask=ok, other=0)
            eq = (ok & (sc == level)).to(tl.int32)
            pick = (ok & (sc > level)) | ((eq_seen + tl.cumsum(eq, axis=0) - eq < need) & (eq != 0))
            taken += _store_picks(out_row + taken, pick, b)
            eq_seen += tl.sum(eq, axis=0)
        _pad_row(out_row, taken, TOPK, K_PAD)


# Pass-2 forms of the two-pass indexer (index_block_topk's select)
SELECTS = ("rank", "radix", "threshold")


def indexer_num_splits(num_tiles: int, device: torch.device) -> int:
    """Key-range splits per tile: a few programs per SM (latency hiding), capped (merge cost)."""
    target = common.INDEXER_PROGRAMS_PER_SM * common.num_sms(device)
    return max(1, min(common.INDEXER_MAX_SPLITS, triton.cdiv(target, max(1, num_tiles))))


def two_pass_num_programs(num_tiles: int, max_blocks: int, device: torch.device) -> int:
    """Pass-1 programs per token of the two-pass indexer: enough to fill the GPU, at most one per block."""
    target = common.INDEXER_TWO_PASS_PROGRAMS_PER_SM * common.num_sms(device)
    return max(1, min(max_blocks, triton.cdiv(target, max(1, num_tiles))))


def uses_two_pass(meta: MSAMeta) -> bool:
    """The variant rule (a function of shapes only, hence fixed for a captured graph): decode-shaped batches
    (one token per tile) of at most INDEXER_TWO_PASS_MAX_TILES tokens score-then-select."""
    return meta.block_t == 1 and meta.num_tiles <= common.INDEXER_TWO_PASS_MAX_TILES


def index_block_topk(index_q: Tensor, index_k_cache: Tensor, req_to_token: Tensor,
                     req_pool_indices: Tensor, seq_lens: Tensor, extend_seq_lens: Tensor | None,
                     extend_start_loc: Tensor | None, *, block_size: int, topk_blocks: int,
                     init_blocks: int = 0, local_blocks: int = 1, out: Tensor | None = None,
                     meta: MSAMeta | None = None, workspace: MSAWorkspace | None = None,
                     num_splits: int | None = None, two_pass: bool | None = None,
                     select: str = "rank") -> Tensor:
    """Triton twin of ``reference.index_block_topk`` (same arguments, result and ``out`` semantics).

    Extra keyword arguments (all optional):
      meta       -- ``common.prepare_meta(...)`` for this forward (built here if None);
      workspace  -- MSAWorkspace holding the split partials / block scores and the threshold select's int64
                    scratch ("indexer.select_buf"; allocated per call if None);
      num_splits -- override the key-range split count (pass-1 programs per token in the two-pass variant;
                    tests; must be fixed under a graph);
      two_pass   -- force the two-pass (True) or split (False) variant; None: ``uses_two_pass(meta)``.
                    Two-pass needs one token per tile (decode-shaped batches); its block-score scratch is
                    int32 [T, H, ceil(req_to_token.shape[1] / block_size)], so under a frozen workspace
                    ``warmup`` must have seen a req_to_token of the same width (its ``context_len``).
      select     -- pass 2 of the two-pass variant: "rank" (the default: rows of <= common.INDEXER_RANK_MAX_BLOCKS
                    visible blocks are ranked all-pairs, longer rows of the same launch take
                    common.INDEXER_LONG_ROW_SELECT), "radix" (8 rounds of a 4-bit radix search for every row) or
                    "threshold" (every row through the group-maximum threshold, _threshold_select; its int64
                    scratch [T, H, max(max_blocks / G, topk * G)] comes from ``workspace``). Same selection in
                    every form; ignored by the split variant. ValueError for any other value.
    Both variants give identical results (same block scores, same packed-key order).
    ``extend_seq_lens``/``extend_start_loc`` may be None for a decode batch (token i <-> request i).
    Shapes are validated; per-request values (lengths, rows) are not (that would need a host sync).
    """
    if index_q.dim() != 3:
        raise ValueError(f"index_q must be [T, H, Di], got {tuple(index_q.shape)}")
    if index_k_cache.dim() != 2:
        raise ValueError(f"index_k_cache must be [num_slots, Di], got {tuple(index_k_cache.shape)}")
    T, H, di = index_q.shape
    if index_k_cache.shape[1] != di:
        raise ValueError(f"index head dim mismatch: index_q has Di={di}, index_k_cache has Di={index_k_cache.shape[1]}")
    if block_size < 1 or topk_blocks < 1 or init_blocks < 0 or local_blocks < 0:
        raise ValueError(f"bad block_size/topk_blocks/init_blocks/local_blocks: "
                         f"{block_size}/{topk_blocks}/{init_blocks}/{local_blocks}")
    if init_blocks + local_blocks > topk_blocks:
        raise ValueError(f"init_blocks + local_blocks ({init_blocks} + {local_blocks}) must be <= topk_blocks ({topk_blocks})")
    if req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be 2-D [pool, max_len], got {tuple(req_to_token.shape)}")
    if out is None:
        out = torch.full((T, H, topk_blocks), -1, dtype=torch.int32, device=index_q.device)
    elif tuple(out.shape) != (T, H, topk_blocks):
        raise ValueError(f"out must have shape {(T, H, topk_blocks)}, got {tuple(out.shape)}")
    if T == 0 or req_pool_indices.numel() == 0:
        return out
    if index_q.stride(2) != 1:
        index_q = index_q.contiguous()
    if index_k_cache.stride(1) != 1 or out.stride(2) != 1 or req_to_token.stride(1) != 1:
        raise ValueError("index_k_cache, out and req_to_token need a contiguous last dimension")
    if meta is None:
        meta = common.prepare_meta(req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, T,
                                   index_heads=H, workspace=workspace)
    common.check_meta(meta, T, H)

    dev = index_q.device
    bt = meta.block_t
    h_pad = common.next_pow2(H)
    m_rows = max(16, bt * h_pad)  # tl.dot needs M >= 16; extra rows are masked
    k_pad = max(2, common.next_pow2(topk_blocks))
    n_tiles = meta.num_tiles
    if two_pass is None:
        two_pass = uses_two_pass(meta)
    elif two_pass and bt != 1:
        raise ValueError(f"the two-pass indexer needs one token per tile (decode-shaped batch), got {bt}")
    tiles = [t if t is not None else meta.tok_row for t in
             (meta.tile_tok0, meta.tile_ntok, meta.tile_row, meta.tile_pos0)]
    interp = common.interpret_mode()
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if common.INDEXER_LONG_ROW_SELECT not in ("radix", "threshold"):
        raise ValueError(f"common.INDEXER_LONG_ROW_SELECT {common.INDEXER_LONG_ROW_SELECT!r} is not a known form "
                         f"(radix|threshold)")
    if two_pass:
        max_blocks = triton.cdiv(req_to_token.shape[1], block_size)
        n_splits = num_splits if num_splits is not None else two_pass_num_programs(n_tiles, max_blocks, dev)
        scores = common.scratch(workspace, "indexer.scores", (T, H, max_blocks), torch.int32, dev)
        part, min_chunk = out, 1
    else:
        max_blocks = 0
        n_splits = num_splits if num_splits is not None else indexer_num_splits(n_tiles, dev)
        part = (common.scratch(workspace, "indexer.part", (T, H, n_splits, topk_blocks), torch.int64, dev)
                if n_splits > 1 else out)
        scores, min_chunk = out, common.INDEXER_MIN_BLOCKS_PER_SPLIT

    _indexer_kernel[(n_tiles, n_splits)](
        index_q, index_q.stride(0), index_q.stride(1),
        index_k_cache, index_k_cache.stride(0),
        req_to_token, req_to_token.stride(0),
        meta.tok_row, meta.tok_pos, *tiles,
        out, out.stride(0), out.stride(1), part,
        scores, max_blocks,
        n_splits, min_chunk,
        H=H, H_PAD=h_pad, DI=di, DI_PAD=max(16, common.next_pow2(di)),
        BLOCK_SIZE=block_size, BN=max(16, common.next_pow2(block_size)), BLOCK_T=bt, M=m_rows,
        TOPK=topk_blocks, K_PAD=k_pad, INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks,
        DOT_F32=common.dot_in_fp32(index_k_cache.dtype),
        PREFETCH=n_tiles * n_splits <= common.INDEXER_PREFETCH_PROGRAMS_PER_SM * common.num_sms(dev),
        SCORES=two_pass, num_warps=4, num_stages=common.INDEXER_NUM_STAGES)
    if two_pass:
        # (the interpreter runs the same code on chunks small enough to iterate)
        rank_max = common.INDEXER_RANK_MAX_BLOCKS if select == "rank" else 0
        long_rows = common.INDEXER_LONG_ROW_SELECT if select == "rank" else select
        g = common.INDEXER_THRESHOLD_GROUP if long_rows == "threshold" else 0
        buf_w = max(triton.cdiv(max_blocks, g), topk_blocks * g) if g else 1
        buf = common.scratch(workspace, "indexer.select_buf", (T, H, buf_w), torch.int64, dev) if g else out
        _indexer_select_kernel[(T, H)](
            meta.tok_row, meta.tok_pos, out, out.stride(0), out.stride(1), scores, max_blocks, buf, buf_w,
            H=H, BLOCK_SIZE=block_size, TOPK=topk_blocks, K_PAD=k_pad, CH=8 if interp else common.INDEXER_SELECT_CHUNK,
            # rank: one row tile covers a ranked row (RB = RANK_MAX rows, 2 per thread at 256 and 4 warps; the
            # RB // 2 tile for rows of <= RANK_MAX / 2), 32 columns per step. At RANK_MAX 256 with the radix search
            # past it (session 7), sm_90 ptxas: 96 registers, no spills, ~6 SASS instructions per (row, column) pair
            # in the whole-step loop (16 columns: a 4-byte spill; 8 warps, 1 row per thread: ~1.5x the instructions
            # per pair); with the threshold select past it 90 (tests/test_kernels_sm90.py). 4 warps for every path.
            RANK_MAX=rank_max, RB=max(2, rank_max), CC=32, num_warps=common.INDEXER_SELECT_WARPS,
            # threshold: group maxima of G blocks, GC groups per step (1024 blocks), ranks in [32, 64] steps
            G=g, GC=4 if interp else 64, RT=8 if interp else 64)
    elif n_splits > 1:
        _indexer_merge_kernel[(n_tiles, bt)](
            meta.tok_row, meta.tok_pos, *tiles,
            out, out.stride(0), out.stride(1), part,
            n_splits, min_chunk,
            H=H, BLOCK_SIZE=block_size, BLOCK_T=bt, R=max(4, h_pad),  # R=1 hangs triton 3.6's compiler
            TOPK=topk_blocks, K_PAD=k_pad, CS=max(1, 64 // k_pad) if interp else common.INDEXER_MERGE_CHUNK,
            BITONIC=not interp, num_warps=4)
    return out
