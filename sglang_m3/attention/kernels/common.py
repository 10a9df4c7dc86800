"""Shared pieces of the MSA Triton kernels: launch heuristics, workspace, per-token metadata.

Nothing here syncs with the host: every per-request quantity (lengths, positions, pool rows) stays
on the device and is read by the kernels; the host only sees tensor *shapes*. That is what makes the
decode entry points CUDA-graph capturable (see ``__init__.py`` for the capture/replay recipe).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# launch heuristics (functions of shapes only -> identical at capture and replay)
# ----------------------------------------------------------------------------------------------

# Rows (tokens x index heads) of one indexer tile in extend mode. Each index-key block loaded from
# memory is reused by all rows of the tile, so larger tiles cut the (dominant) key traffic of long
# prefills; 64 keeps the [64, 128] fp32 score tile plus the running top-k in registers.
INDEXER_EXTEND_ROWS = 64
# Launch knobs, set from H200 measurements (decode, graph replay; see the kernels' docstrings).
# Indexer programs aimed for per SM when a batch is small: one program's block loop is
# latency-bound (~2.5 us per 128-key block on H200: slot load -> key gather -> dot -> top-k
# insert), so several resident programs per SM are needed to approach HBM bandwidth
# (bs 32 x 32K context: 1/SM 145 us, 4/SM 96 us; the split kernel, which bs 32 no longer takes since session 12).
INDEXER_PROGRAMS_PER_SM = 4
# Upper bound on the programs one tile is split over: the merge reads splits x topk keys and its
# cost grows with them (bs 1 x 128K: 32 splits 88 us, 64 splits 70 us, 128 splits 79 us).
INDEXER_MAX_SPLITS = 64
# A split of the indexer scans at least this many key blocks (short contexts use fewer splits).
INDEXER_MIN_BLOCKS_PER_SPLIT = 4
# Splits merged per bitonic top-k pass in the indexer merge kernel (x topk candidates). Tried (session 10, benchmarks/
# results/2026-11-30-h200x2-s10/kernel_decode.md, split indexer, us, as is / split count rounded down to a power of
# two with this chunk cut to it): TP1 bs 32 96.3 / 92.2 (32K), 161.2 / 157.8 (64K), 290.3 / 291.1 (128K); TP8 91.6 /
# 89.6, 156.4 / 156.4, 285.6 / 287.9 -- 2-4 us at <= 64K, none at 128K, against a merge of ~21 us (in-tree top-k 3.5-5).
# A threshold merge (session 11: the TOPK-th largest of the splits' best keys bounds the top-k, <= TOPK^2 candidates
# ranked) measured in session 12, TP1 bs 32, split indexer us, bitonic / threshold: 96.5 / 98.6 (32K), 161.0 / 158.5
# (64K), 290.6 / 288.0 (128K) -- removed; bs 32 now takes the two-pass indexer, which has no merge.
INDEXER_MERGE_CHUNK = 32
INDEXER_NUM_STAGES = 2  # no measurable effect (1..4) on the gather-bound loop
# The indexer loop loads the next key block ahead when its grid has at most this many programs per SM
# (H100, graph replay, TP1 heads: bs 1 x 128K 100 -> 86 us, bs 1 x 4K 53.2 -> 51.8 us; always on, the
# register cost slows the bandwidth-bound bs 32 x 128K from 462 to 517 us; prefetching slots alone: no gain).
INDEXER_PREFETCH_PROGRAMS_PER_SM = 1
# Two-pass ("score, then select") indexer for small decode-shaped batches (one token per tile): pass 1 writes
# every visible block's score to a [T, H, blocks of a req_to_token row] scratch from many programs (no running
# top-k, so the key axis can be cut finely without a merge whose cost grows with the cut), pass 2 selects the
# top-k per token. Used when the batch has at most this many tiles; larger batches keep the split kernel, whose
# programs already fill the GPU. Only the batch size is known at capture, not the context. H200, TP1 heads, graph
# replay (benchmarks/results/2026-11-30-h200x2/kernel_decode_partial.log), two-pass vs split indexer, us:
#   bs 1: 26.4 vs 42.0 (32K), 50.3 vs 61.6 (128K); bs 8: 46.8 vs 57.8 (32K), 125.0 vs 108.6 (128K);
#   bs 32: 106.2 vs 97.2 (32K), 347.6 vs 289.4 (128K).
# Those two-pass times used an earlier pass 2 (bitonic tl.topk over packed int64 keys, one program per token).
# With the radix pass 2 (one program per (token, index head); benchmarks/results/2026-11-30-h200x2-s5/
# kernel_decode.md), two-pass vs split, us: bs 1: 21.4 vs 40.5 (32K), 35.4 vs 59.7 (128K); bs 8: 41.9 vs 57.0
# (32K), 106.7 vs 108.4 (128K) -- and vs the bitonic pass 2 it replaced: 26.9, 51.1, 47.3, 126.0 us, same
# selections. bs 2-4 and 9-16 not measured. bs 32: split (pass 1 alone is the larger part there) -- until session 12:
# with 16 pass-1 programs per SM and the rank/threshold pass 2, two-pass also wins at bs 32 (the split variant's
# merge costs ~20 us there). H200 TP1, whole layer, us (benchmarks/results/2026-12-01-h200-s12/
# sweep_two_pass_bs8_32.log, the split variant and the in-tree from kernel_decode.md of the same lease):
#   bs 32: 129.9 two-pass vs 146.4 split, in-tree 140.5 (32K); 317.1 vs 340.1, in-tree 328.9 (128K).
# bs 9-31 and 33-127 not measured; past 32 the split kernel's programs fill the GPU as before (bs 128, TP1, 32K /
# 128K: split 277.4 / 1003.8 us vs two-pass at 8 programs per SM 299.1 / 1093.0, kernel_decode_bs128.md).
INDEXER_TWO_PASS_MAX_TILES = 32
# Pass-1 programs aimed for per SM (a program scores >= 1 key block; programs beyond the token's blocks exit). Session
# 12 (same files), TP1 whole layer, us, 2 / 4 / 8 / 16 per SM: bs 8 62.3 / 61.0 / 61.9 / 61.6 (32K), 130.1 / 108.4 /
# 116.7 / 106.6 (128K); bs 32 149.3 / 131.3 / 139.0 / 129.9 (32K), 401.4 / 324.6 / 360.7 / 317.1 (128K). Not
# monotonic (8 is worse than 4 and 16: likely a partial last wave of resident programs); bs 1 is unchanged from 8 up
# (capped at one program per block of the row: 1040 at 133120 tokens); bs 2-7 not measured.
INDEXER_TWO_PASS_PROGRAMS_PER_SM = 16
# Block scores per chunk of pass 2, the radix select (power of two).
INDEXER_SELECT_CHUNK = 512
# Pass 2 of the two-pass indexer, select="rank" (index_block_topk's default): rows of at most this many visible
# blocks (a power of two) are selected by all-pairs ranking, no dependent rounds; longer rows of the same launch
# take INDEXER_LONG_ROW_SELECT (the radix search until session 11). Per row, not per launch: a launch's static
# max_blocks comes from the pool width (the model's context; 1024 blocks in benchmarks/kernel_decode.py), so a
# per-launch rule would never rank. The work is
# nb^2 int64 compares in one program per (token, index head): at 256 blocks (32K context at block 128) 64K, about
# the element count of the radix's 8 rounds of [512, 16] digit compares; at 512 it would be 4x that, at 1024 16x.
# Measured on one H200 (benchmarks/results/2026-11-30-h200x2-s7/kernel_decode.md, the two-pass indexer alone,
# graph replay, us, rank vs radix, same selections): 32K context (256 blocks, ranked) TP1 bs 1 16.4 vs 21.2, bs 8
# 36.2 vs 41.6; TP8 bs 1 16.4 vs 20.7, bs 8 36.0 vs 40.6. 128K (1024 blocks: the radix search in both) TP1 bs 1
# 36.5 vs 35.2, TP8 37.0 vs 35.0 -- the ranked variant's larger kernel costs ~1.5-2 us there -- and level at bs 8
# (105.4 vs 105.6, 106.0 vs 105.1). Hence the default: -4 to -5 us per sparse layer up to 32K, +2 at 128K bs 1.
# Raised from 256 to 512 (session 8), with two row tiles (RANK_MAX / 2 and RANK_MAX rows, so a short row is not
# charged the larger tile's compares): a served "32K" request decodes at 257+ blocks (prompt + output), where the
# radix search cost ~20 us per sparse layer in the batch-1 profile (benchmarks/results/2026-11-30-h200x2-s8/
# profile_32k_call9.json). Measured (same place, kernel_decode_call11.md, TP1, two-pass indexer, rank vs radix, us):
# bs 1: 13.5 vs 19.7 (16K, 128 blocks), 18.5 vs 21.4 (33792, 264 blocks), 24.1 vs 24.8 (64K, 512 blocks); bs 8:
# 23.2 vs 29.8, 38.9 vs 42.1, 61.4 vs 61.7; same selections.
INDEXER_RANK_MAX_BLOCKS = 256  # 512 until session 11: see INDEXER_LONG_ROW_SELECT
# The price of the 512-row tile (session 9, benchmarks/results/2026-11-30-h200x2-s9/kernel_decode_call8.md, TP1, the
# two-pass indexer, us, RANK_MAX 512 / 256 / radix for every row, same selections): rows past RANK_MAX, whose radix
# search runs inside the larger kernel, got slower -- 43.9 / 39.0 / 35.8 at 128K bs 1 (1024 blocks), 113.8 / 110.0 /
# 107.2 at bs 8 -- while at 64K 512 beats 256 and is level with the radix search (24.5 / 27.8 / 24.9); at 32K both
# limits run the same 256-row tile (16.9 / 16.2 is noise; radix 21.6). Kept at 512 then: up to 64K context is the
# commoner served length, and at 128K the radix search was far off the in-tree's top-k (4.6 us) either way. Lowered
# to 256 in session 11, when the threshold select beat the 512-row rank at 64K (below).
# Warps of the select kernel. 4 kept. 8 measured (session 10, benchmarks/results/2026-11-30-h200x2-s10/
# kernel_decode.md, TP1, the two-pass indexer, us, 4 / 8 warps, same selections): bs 1 18.0 / 18.1 (32K), 24.9 / 26.5
# (64K), 43.2 / 35.2 (128K: rows past RANK_MAX, radix-searched); bs 8 36.6 / 38.0, 61.3 / 63.8, 113.7 / 105.4. 8 warps
# win only on rows past RANK_MAX, and one launch serves rows of every length: a per-launch rule would trade 1.5-2.5 us
# at 64K for 8 at 128K.
INDEXER_SELECT_WARPS = 4
# Pass 2 for rows past RANK_MAX under the default select="rank": "threshold" (session 11; indexer._threshold_select:
# the need-th largest maximum of the row's groups of INDEXER_THRESHOLD_GROUP blocks bounds the top-k from below, so
# only the blocks of `need` groups -- at most need x G, ~need on random scores -- are ranked) or "radix" (the 4-bit
# radix search). Measured on one H200 (benchmarks/results/2026-12-01-h200-s11/kernel_decode_*.md, the two-pass
# indexer, graph replay, us, default of then (rank <= 512 blocks, radix past) / threshold for every row, same
# selections): TP1 bs 1 13.0 / 16.4 (16K), 15.9 / 17.2 (32K), 23.4 / 18.2 (64K), 41.3 / 23.6 (128K); bs 8 22.5 / 26.2,
# 36.1 / 37.0, 61.1 / 56.3, 111.0 / 93.6; TP8 bs 1 12.9 / 16.3, 16.2 / 15.3. Hence rank up to 256 blocks (where it
# wins at TP1 and 16K; 32K at TP8 bs 1 is 0.9 us the other way) and threshold past it. That combination in one
# kernel was compiled for sm_90a (ptxas: 90 registers, no spills, tests/test_kernels_sm90.py; rank 512 + radix: 96)
# but not timed or run on a GPU in session 11 (device time): in session 9 a radix search inside the larger rank
# kernel ran 3-8 us slower than alone, so the threshold rows may too. (The threshold code was refactored after its
# GPU run -- _ranks_in -- same operations.)
INDEXER_LONG_ROW_SELECT = "threshold"
INDEXER_THRESHOLD_GROUP = 16
# Tried and removed (session 10): a forced select="rank_wide" (rows past RANK_MAX ranked by a second launch of the
# select kernel, row tiles of up to 2048 blocks over 16 warps x 16 columns or 32 warps x 8). Same selections, slower
# wherever it differs from the default (same file, us, two-pass indexer, default / rank_wide 16 / 32 warps): TP1 bs 1
# x 128K 43.2 / 58.2 / 62.0, bs 8 x 128K 113.7 / 128.7 / 133.7; TP8 45.6 / 57.2 / 60.5; and its extra launch cost
# the shorter rows 0.7-1.9 us (bs 1 / 8 x 32K: 18.0 / 18.8, 36.6 / 38.5).
# Tried and removed (session 9): a forced select="rank_split" (rows cut into 256-block segments, each ranked by a
# program of its own; the last program of a row to finish, found by an atomic count, ranked the segments' picks).
# Same selections on the GPU, but never faster than the better of the default and the radix pass 2 for every row
# (kernel_decode.md there, the two-pass indexer, us, rank_split / default / radix for every row): TP1 bs 1 16.7 /
# 16.7 / 21.5 (32K), 30.4 / 24.4 / 24.9 (64K), 39.2 / 44.2 / 35.8 (128K); bs 8 36.6 / 36.7 / 41.7, 68.7 / 61.2 /
# 62.4, 110.6 / 114.1 / 106.9. As the server's select above 256 blocks it changed no e2e figure beyond noise
# (e2e_4l_tp1_rank_split_default.md there).
# Tried and removed (session 8): the radix search on the row held in registers (tiles of 512 and 1024 blocks: one
# load, then per round one [tile, 16] digit compare and one reduction) instead of re-reading it in chunks of
# INDEXER_SELECT_CHUNK each round. Same selections, but slower on one H200 (benchmarks/results/2026-11-30-h200x2-s8/
# kernel_decode_call5.md, two-pass indexer, us, register vs chunked): TP1 bs 1 x 128K 72.4 vs 35.7, bs 8 x 128K 138.4
# vs 107.3; TP8 72.7 vs 35.5, 143.7 vs 106.8 (not profiled; the [1024, 16] tile per round evidently costs far more
# than the re-reads it saves, as the 8-bit histogram form below did).
# Removed (session 8): a forced select="rank_segments" (rows above RANK_MAX ranked by 16-block segment maxima, then
# the best segments' blocks): 79.4 us vs 36.2 for the two-pass indexer at TP1 bs 1 x 128K, 148 vs 105 at bs 8
# (benchmarks/results/2026-11-30-h200x2-s8/kernel_decode.md), same selections.
# Tried and removed (5c7848a): a pass 2 with 8-bit digits (4 rounds of tl.histogram, the row kept in registers
# up to 1024 blocks) instead of these 8 rounds of 4 bits. Same selections, but slower on one H200
# (benchmarks/results/2026-11-30-h200-s6/kernel_decode.md, two-pass indexer, us, 4-bit vs 8-bit): TP1 bs 1 20.2
# vs 40.4 (32K), 34.5 vs 48.4 (128K); bs 8 41.4 vs 56.9 (32K), 105.3 vs 114.6 (128K); TP8 bs 1 x 32K 19.9 vs 40.8.
# Not used because it lost in every case; not profiled, but the 512-bin histogram and scan per round evidently
# cost more than the halved round count saves.
# Attention programs aimed for per SM before the block list is split (1 and 2 measured equal
# for 64 q heads; 1 is 10% faster for 8 q heads at bs 256).
ATTN_PROGRAMS_PER_SM = 1
ATTN_NUM_STAGES = 2
# SM count assumed off-GPU (interpreter).
_DEFAULT_SMS = 132


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must get fp32 operands (with input_precision='ieee').

    fp32 caches: exact fp32 products like the twin (no TF32). Under TRITON_INTERPRET the
    interpreter's tl.dot mishandles bf16/fp16 operands, so they are upcast there (exact: products of
    bf16 values are exact in fp32, which is what the tensor cores compute too).
    """
    return dtype == torch.float32 or interpret_mode()


def is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# workspace
# ----------------------------------------------------------------------------------------------


class MSAWorkspace:
    """Named, grow-only device scratch buffers reused across calls.

    Every call carves views of the same buffers (same addresses), which is what a CUDA graph needs.
    Buffers grow only in eager mode; growing while a graph is being captured, or after ``freeze()``,
    raises instead (a captured graph would keep pointers to the freed buffer). Recipe: size it with
    ``kernels.warmup(...)`` at the largest captured batch size, then ``freeze()``; use a *separate*
    workspace (or none) for eager extend calls.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.frozen = False
        self._bufs: dict[str, Tensor] = {}

    def freeze(self) -> "MSAWorkspace":
        self.frozen = True
        return self

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            if self.frozen or is_capturing(device):
                have = None if buf is None else (tuple(buf.shape), buf.dtype)
                raise RuntimeError(
                    f"MSAWorkspace buffer {name!r} needs {n} x {dtype} but holds {have}; it cannot grow while "
                    "frozen or during CUDA-graph capture: call kernels.warmup(...) with the largest shapes first")
            buf = torch.empty(max(n, 1), dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[:n].view(shape)


def scratch(workspace: MSAWorkspace | None, name: str, shape, dtype, device) -> Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(name, tuple(shape), dtype, device)


# ----------------------------------------------------------------------------------------------
# per-token / per-tile metadata
# ----------------------------------------------------------------------------------------------


def indexer_block_t(num_tokens: int, batch_size: int, index_heads: int, decode: bool) -> int:
    """Tokens per indexer tile. Decode-shaped batches (one token per request) use 1: tiles never
    span requests, so bigger tiles would only add masked rows."""
    if decode or num_tokens <= batch_size:
        return 1
    return max(1, INDEXER_EXTEND_ROWS // next_pow2(index_heads))


@dataclass
class MSAMeta:
    """Device-side layout of the new tokens, shared by all sparse layers of one forward.

    tok_row[t] / tok_pos[t]: req_to_token row and absolute position of token t (row -1: token owned
    by no request; kernels skip it and leave its output rows untouched).
    Indexer tiles (block_t > 1 only): runs of <= block_t consecutive tokens of one request;
    tile_ntok == 0 marks unused tile slots (the tile count is only known on the device).
    """

    num_tokens: int
    batch_size: int
    index_heads: int
    block_t: int
    tok_row: Tensor
    tok_pos: Tensor
    tile_tok0: Tensor | None = None
    tile_ntok: Tensor | None = None
    tile_row: Tensor | None = None
    tile_pos0: Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return self.num_tokens if self.block_t == 1 else self.tile_ntok.numel()


def max_tiles(num_tokens: int, batch_size: int, block_t: int) -> int:
    # sum_i ceil(ext_i / bt) <= (T + bs * (bt - 1)) / bt, and never more than T.
    return max(1, min(num_tokens, (num_tokens + batch_size * (block_t - 1)) // block_t))


@triton.jit
def _meta_kernel(rpi_ptr, seq_ptr, ext_ptr, start_ptr,
                 tok_row_ptr, tok_pos_ptr,
                 tile_tok0_ptr, tile_ntok_ptr, tile_row_ptr, tile_pos0_ptr,
                 DECODE: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    # One program per request: writes the row/position of each of its new tokens and, for
    # BLOCK_T > 1, its indexer tiles at an exclusive prefix sum of the tile counts of the requests
    # before it (recomputed per program: O(bs^2 / CHUNK) loads, trivial next to any real work).
    i = tl.program_id(0)
    row = tl.load(rpi_ptr + i).to(tl.int32)
    seq = tl.load(seq_ptr + i).to(tl.int32)
    if DECODE:
        tl.store(tok_row_ptr + i, row)
        tl.store(tok_pos_ptr + i, seq - 1)
    else:
        offs = tl.arange(0, CHUNK)
        ext = tl.load(ext_ptr + i).to(tl.int32)
        start = tl.load(start_ptr + i).to(tl.int32)
        prefix = seq - ext
        for r0 in range(0, ext, CHUNK):
            r = r0 + offs
            m = r < ext
            tl.store(tok_row_ptr + start + r, row + 0 * r, mask=m)
            tl.store(tok_pos_ptr + start + r, prefix + r, mask=m)
        if BLOCK_T > 1:
            base = tl.sum(tl.zeros([CHUNK], tl.int32), axis=0)
            for c0 in range(0, i, CHUNK):
                j = c0 + offs
                e = tl.load(ext_ptr + j, mask=j < i, other=0).to(tl.int32)
                base += tl.sum((e + BLOCK_T - 1) // BLOCK_T, axis=0)
            n_tiles = (ext + BLOCK_T - 1) // BLOCK_T
            for k0 in range(0, n_tiles, CHUNK):
                k = k0 + offs
                m = k < n_tiles
                tl.store(tile_tok0_ptr + base + k, start + k * BLOCK_T, mask=m)
                tl.store(tile_ntok_ptr + base + k, tl.minimum(ext - k * BLOCK_T, BLOCK_T), mask=m)
                tl.store(tile_row_ptr + base + k, row + 0 * k, mask=m)
                tl.store(tile_pos0_ptr + base + k, prefix + k * BLOCK_T, mask=m)


def prepare_meta(req_pool_indices: Tensor, seq_lens: Tensor, extend_seq_lens: Tensor | None,
                 extend_start_loc: Tensor | None, num_tokens: int, *, index_heads: int,
                 workspace: MSAWorkspace | None = None) -> MSAMeta:
    """Per-token metadata for one forward (1 fill + 1 tiny launch, no host sync).

    ``extend_seq_lens``/``extend_start_loc`` None means decode: token i belongs to request i and sits
    at position seq_lens[i] - 1 (num_tokens must equal the batch size). Build it once per forward
    (in ``init_forward_metadata[_in_graph]``) and pass it to every layer's kernels as ``meta=``.
    """
    bs = req_pool_indices.numel()
    decode = extend_seq_lens is None
    if decode != (extend_start_loc is None):
        raise ValueError("extend_seq_lens and extend_start_loc must both be given or both be None (decode)")
    if decode and num_tokens != bs:
        raise ValueError(f"decode metadata needs one token per request: num_tokens={num_tokens}, batch={bs}")
    dev = seq_lens.device
    bt = indexer_block_t(num_tokens, bs, index_heads, decode)
    tok_row = scratch(workspace, "meta.tok_row", (num_tokens,), torch.int32, dev)
    tok_pos = scratch(workspace, "meta.tok_pos", (num_tokens,), torch.int32, dev)
    tiles = [None] * 4
    if not decode:
        tok_row.fill_(-1)  # tokens owned by no request
    if bt > 1:
        nt = max_tiles(num_tokens, bs, bt)
        tiles = [scratch(workspace, f"meta.tile{k}", (nt,), torch.int32, dev) for k in range(4)]
        tiles[1].zero_()  # tile_ntok: unused slots
    if bs > 0 and num_tokens > 0:
        dummy = tok_row
        _meta_kernel[(bs,)](
            req_pool_indices, seq_lens,
            extend_seq_lens if not decode else seq_lens, extend_start_loc if not decode else seq_lens,
            tok_row, tok_pos, *(t if t is not None else dummy for t in tiles),
            DECODE=decode, BLOCK_T=bt, CHUNK=128, num_warps=1)
    return MSAMeta(num_tokens, bs, index_heads, bt, tok_row, tok_pos, *tiles)


def check_meta(meta: MSAMeta, num_tokens: int, index_heads: int | None = None) -> None:
    if meta.num_tokens != num_tokens:
        raise ValueError(f"meta was built for {meta.num_tokens} tokens, called with {num_tokens}")
    if index_heads is not None and meta.index_heads != index_heads:
        raise ValueError(f"meta was built for {meta.index_heads} index heads, called with {index_heads}")
