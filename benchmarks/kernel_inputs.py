"""Inputs of the MSA kernel benchmark (benchmarks/kernel_decode.py): per-rank geometry, the HBM floor's byte count,
and one paged cache + metadata in SGLang's layout that ours and the in-tree kernels both read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Per-rank shapes of one M3 sparse layer. Index heads == KV heads (M3: one selection per KV group)."""

    name: str
    hq: int
    hkv: int
    d: int = 128
    di: int = 128
    block: int = 128
    topk: int = 16
    init_blocks: int = 0
    local_blocks: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def sm_scale(self) -> float:
        return self.d ** -0.5


HEADS = {"tp1": Geometry("tp1", 64, 4), "tp8": Geometry("tp8", 8, 1)}
# --smoke: tiny stand-ins with the same head structure (several index heads per index-key head / a single one).
SMOKE_HEADS = {"tp1": Geometry("tp1-tiny", 4, 2, 32, 32, 16, 2, dtype=torch.float16),
               "tp8": Geometry("tp8-tiny", 4, 1, 32, 32, 16, 2, dtype=torch.float16)}
SMOKE_BS, SMOKE_CTX = (1, 3), (40, 100)
# Per-request lengths of a smoke decode batch (the first bs of them): the context, then the dense/sparse boundary
# (topk * block = 32 tokens: 32 is dense, 33 the first sparse length), a block boundary (17) and a lone token.
SMOKE_DECODE_LENS = {40: (40, 32, 1), 100: (100, 33, 17)}
SMOKE_PREFILL = ((60, 20), (40, 40))  # (seq_len, new tokens) per request: one with a cached prefix, one fresh
SMOKE_ATOL = 5e-3  # fp16 outputs of |x| <~ 2; the in-tree rounds split-K partials to fp16 before merging


def decode_bytes_needed(bs: int, context: int, geo: Geometry) -> int:
    """HBM bytes one decode step of one sparse layer must move, over the batch (the HBM floor's numerator).

    Per request with ``context`` visible tokens (the new one included):
      * the index key of every visible token: context * Di * elt (one shared index-key head; 256 B at bf16),
      * K and V of the selected tokens: min(context, topk * block) tokens per KV head, each KV head
        selecting its own blocks: 2 * Hkv * min(context, topk * block) * D * elt,
      * the new token's writes: its K and V (Hkv heads each) and its index key.
    Not counted: queries, outputs, req_to_token reads (4 B per visible token, 1.6% of the index-key bytes at
    bf16), scratch traffic. The K/V term is exact when ``context`` is a multiple of ``block`` (every context the
    benchmark runs); otherwise a selected partial last block holds fewer than ``block`` tokens and the term
    overstates by at most ``block - 1`` tokens' K/V per KV head.
    """
    elt = torch.finfo(geo.dtype).bits // 8
    selected = min(context, geo.topk * geo.block)
    per_request = (context * geo.di + 2 * geo.hkv * selected * geo.d + 2 * geo.hkv * geo.d + geo.di) * elt
    return bs * per_request


# ----------------------------------------------------------------------------------------------------------------
# inputs: one paged cache + metadata shared by both implementations
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """SGLang layout. Request i owns seq_lens[i] tokens, the last ext_lens[i] of them new (written by the step)."""

    seq_lens_list: list
    ext_lens_list: list
    context_len: int  # req_to_token width (the server's --context-length)
    page_size: int  # the pool's page size (the server's --page-size); slots come in pages of it
    req_to_token: torch.Tensor  # int32 [rows, context_len]
    req_pool_indices: torch.Tensor  # int64 [bs]
    seq_lens: torch.Tensor  # int64 [bs]
    extend_seq_lens: torch.Tensor  # int32 [bs]
    extend_start_loc: torch.Tensor  # int32 [bs]
    out_cache_loc: torch.Tensor  # int64 [T] slots of the new tokens
    k_cache: torch.Tensor  # [slots, Hkv, D]
    v_cache: torch.Tensor  # [slots, Hkv, D]
    index_k_cache: torch.Tensor  # [slots, Di] (the in-tree kernels take the [slots, 1, Di] view)
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] new tokens' K / V / index key
    v: torch.Tensor
    index_q: torch.Tensor  # [T, Hkv, Di]
    index_k: torch.Tensor  # [T, Di]

    @property
    def bs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.q.shape[0]


def pool_slots(seq_lens, page_size: int = 1) -> int:
    """KV-pool rows ``make_batch`` allocates: each request's pages plus the padding page 0."""
    return (sum(-(-n // page_size) for n in seq_lens) + 1) * page_size


def cache_bytes(geo: Geometry, seq_lens, page_size: int = 1) -> int:
    elt = torch.finfo(geo.dtype).bits // 8
    return pool_slots(seq_lens, page_size) * (2 * geo.hkv * geo.d + geo.di) * elt


def make_batch(geo: Geometry, seq_lens, ext_lens, *, context_len: int, device, seed: int,
               page_size: int = 1) -> Batch:
    """Random caches (every slot filled), pool rows a random permutation. Slots come as SGLang's paged allocator
    hands them out (PagedTokenToKVPoolAllocator: pages of ``page_size`` contiguous slots, page 0 -- slot 0 at page
    size 1 -- reserved for padding): request i owns ceil(seq_lens[i] / page_size) pages, the batch's pages are a
    random permutation of 1..P, and the request's token j sits in slot page[j // page_size] * page_size +
    j % page_size (slots past its last token in its last page stay unused). Page size 1 gives the same tensors as
    the token-slot layout did: slots a random permutation of 1..N. The new tokens' slots hold stale values until
    the step writes them."""
    assert max(seq_lens) <= context_len
    g = torch.Generator(device=device).manual_seed(seed)
    bs, T = len(seq_lens), sum(ext_lens)

    def randn(*shape):
        return torch.empty(shape, dtype=geo.dtype, device=device).normal_(generator=g)

    n_pages = [-(-n // page_size) for n in seq_lens]
    pages = torch.randperm(sum(n_pages), generator=g, device=device).add_(1)
    slots = (pages[:, None] * page_size + torch.arange(page_size, device=device)).flatten().to(torch.int32)
    rows = torch.randperm(bs + 2, generator=g, device=device)[:bs]
    r2t = torch.zeros(bs + 2, context_len, dtype=torch.int32, device=device)
    new_locs, off = [], 0
    for row, n, e, p in zip(rows.tolist(), seq_lens, ext_lens, n_pages):
        r2t[row, :n] = slots[off: off + n]
        new_locs.append(slots[off + n - e: off + n])
        off += p * page_size
    ext = torch.tensor(ext_lens, dtype=torch.int32, device=device)
    n_slots = pool_slots(seq_lens, page_size)
    return Batch(
        list(seq_lens), list(ext_lens), context_len, page_size, r2t, rows.to(torch.int64),
        torch.tensor(seq_lens, dtype=torch.int64, device=device), ext, torch.cumsum(ext, 0, dtype=torch.int32) - ext,
        torch.cat(new_locs).to(torch.int64),
        randn(n_slots, geo.hkv, geo.d), randn(n_slots, geo.hkv, geo.d), randn(n_slots, geo.di),
        randn(T, geo.hq, geo.d), randn(T, geo.hkv, geo.d), randn(T, geo.hkv, geo.d),
        randn(T, geo.hkv, geo.di), randn(T, geo.di))
