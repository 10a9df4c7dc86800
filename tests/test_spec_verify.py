"""Target verify (speculative decoding) in the MSA reference: every draft node equals a prefill of prefix + its path.

The oracle shares no code with the module under test: per draft node it lays out the contiguous sequence
prefix + root-to-node path in float64 and runs the brute-force selection/attention of test_msa_reference
(Python loops over positions, blocks and keys). The module under test gets SGLang's TARGET_VERIFY layout:
paged caches with random slots (unused ones NaN), drafts in the slots after the prefix, the FULL_MASK
tree mask (built here with literal loops from the parent lists), and N queries per request.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from sglang_m3.attention import reference as ref
from tests.test_layers import sglang_env  # noqa: F401  (fixture: SGLang's parallel state on CPU)
from tests.test_msa_reference import (D, DI, DV, H, HQ, SM_SCALE, assert_agree_up_to_ties, assert_selection, bf_attend,
                                      bf_select)


def chain(n):
    return [-1] + list(range(n - 1))


def random_tree(n, g):
    """Parent of node j (> 0) is a random earlier node: a tree in SGLang's node order (parents first)."""
    return [-1] + [int(torch.randint(0, j, (1,), generator=g)) for j in range(1, n)]


def path(parents, x):
    """Root-to-x node list."""
    out = [x]
    while parents[out[-1]] >= 0:
        out.append(parents[out[-1]])
    return out[::-1]


def full_mask(prefix_lens, trees):
    """SGLang's FULL_MASK: per request N rows of (seq_len + N) columns, prefix columns true, then the
    tree part (draft j on node x's path), rows and requests concatenated."""
    flat = []
    for s, parents in zip(prefix_lens, trees):
        n = len(parents)
        for x in range(n):
            on = set(path(parents, x))
            flat += [True] * s + [j in on for j in range(n)]
    return torch.tensor(flat, dtype=torch.bool)


def make_batch(prefix_lens, trees, seed=0, dv=DV):
    """Random prefix and draft tensors, and the paged TARGET_VERIFY batch holding them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    n = len(trees[0])
    reqs = [dict(pre=dict(iq=r(s, H, DI), ik=r(s, DI), q=r(s, HQ, D), k=r(s, H, D), v=r(s, H, dv)),
                 draft=dict(iq=r(n, H, DI), ik=r(n, DI), q=r(n, HQ, D), k=r(n, H, D), v=r(n, H, dv)))
            for s in prefix_lens]
    bs = len(prefix_lens)
    n_slots = sum(prefix_lens) + bs * n + 5
    perm = torch.randperm(n_slots, generator=g)
    nan_slot = int(perm[-1])
    rows = torch.randperm(bs + 2, generator=g)[:bs]
    r2t = torch.full((bs + 2, max(prefix_lens) + n + 3), nan_slot, dtype=torch.int32)
    ik_cache = torch.full((n_slots, DI), float("nan"))
    k_cache = torch.full((n_slots, H, D), float("nan"))
    v_cache = torch.full((n_slots, H, dv), float("nan"))
    out_loc, off = [], 0
    for i, (s, rq) in enumerate(zip(prefix_lens, reqs)):
        slots = perm[off: off + s + n]
        off += s + n
        r2t[rows[i], : s + n] = slots.to(torch.int32)
        # prefix: in the cache since earlier forwards; drafts: written by the verify forward before indexing
        for part, sl in (("pre", slots[:s]), ("draft", slots[s:])):
            ref.store_index_k(ik_cache, sl, rq[part]["ik"])
            k_cache[sl], v_cache[sl] = rq[part]["k"], rq[part]["v"]
        out_loc.append(slots[s:])
    return dict(
        reqs=reqs, trees=trees, prefix_lens=prefix_lens, n=n,
        index_q=torch.cat([rq["draft"]["iq"] for rq in reqs]), q=torch.cat([rq["draft"]["q"] for rq in reqs]),
        ik_cache=ik_cache, k_cache=k_cache, v_cache=v_cache, req_to_token=r2t, req_pool_indices=rows,
        seq_lens=torch.tensor(prefix_lens, dtype=torch.int64), out_cache_loc=torch.cat(out_loc).long(),
        custom_mask=full_mask(prefix_lens, trees))


def run_tree(b, block_size, topk, init_blocks=0, local_blocks=1, mask=None):
    virt, node_lens = ref.verify_tree_rows(b["custom_mask"] if mask is None else mask, b["seq_lens"],
                                           b["req_pool_indices"], b["out_cache_loc"], b["req_to_token"], b["n"])
    t = node_lens.numel()
    meta = dict(req_to_token=virt, req_pool_indices=torch.arange(t), seq_lens=node_lens,
                extend_seq_lens=torch.ones(t, dtype=torch.int32), extend_start_loc=torch.arange(t, dtype=torch.int32))
    return _run(b, meta, block_size, topk, init_blocks, local_blocks), node_lens


def run_chain(b, block_size, topk, init_blocks=0, local_blocks=1):
    total, ext, start = ref.verify_chain_layout(b["seq_lens"], b["n"])
    meta = dict(req_to_token=b["req_to_token"], req_pool_indices=b["req_pool_indices"], seq_lens=total,
                extend_seq_lens=ext, extend_start_loc=start)
    return _run(b, meta, block_size, topk, init_blocks, local_blocks)


def _run(b, meta, block_size, topk, init_blocks, local_blocks):
    sel = ref.index_block_topk(b["index_q"], b["ik_cache"], **meta, block_size=block_size, topk_blocks=topk,
                               init_blocks=init_blocks, local_blocks=local_blocks)
    o = ref.sparse_attention(b["q"], b["k_cache"], b["v_cache"], **meta, block_topk=sel, block_size=block_size,
                             sm_scale=SM_SCALE)
    return sel, o


def check_bruteforce(b, sel, o, block_size, topk, init_blocks=0, local_blocks=1):
    """Row i*N + x must be the last row of a float64 prefill of request i's prefix + path(x)."""
    n, group = b["n"], HQ // H
    for i, (s, rq, parents) in enumerate(zip(b["prefix_lens"], b["reqs"], b["trees"])):
        for x in range(n):
            nodes = path(parents, x)
            seq = {k: torch.cat([rq["pre"][k], rq["draft"][k][nodes]]).double() for k in rq["pre"]}
            p = s + len(nodes) - 1  # the node's position: prefix length + depth
            t = i * n + x
            for h in range(H):
                dots = [None] * p + [(seq["ik"][: p + 1] @ seq["iq"][p, h]).tolist()]
                assert_selection(sel[t, h].tolist(), *bf_select(dots, p, block_size, topk, init_blocks,
                                                                local_blocks), topk)
            for qh in range(HQ):
                blocks = [blk for blk in sel[t, qh // group].tolist() if blk >= 0]
                want = bf_attend(seq["q"], seq["k"], seq["v"], p, qh, blocks, group, block_size)
                torch.testing.assert_close(o[t, qh].double(), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (1, 1), (0, 2)])
def test_chain_verify_equals_prefill_of_prefix_and_drafts(init_blocks, local_blocks):
    # prefixes end mid-block (block 4), one at a block boundary; 5 drafts cross block boundaries
    prefix_lens, n, bsz, topk = [13, 22, 8, 31], 5, 4, 3
    b = make_batch(prefix_lens, [chain(n)] * len(prefix_lens), seed=1)
    sel, o = run_chain(b, bsz, topk, init_blocks, local_blocks)
    check_bruteforce(b, sel, o, bsz, topk, init_blocks, local_blocks)
    assert (sel >= 0).sum(-1).max() == topk  # sparse rows exist


@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (1, 1), (0, 2)])
def test_tree_verify_equals_prefill_of_prefix_and_path(init_blocks, local_blocks):
    g = torch.Generator().manual_seed(7)
    prefix_lens, n, bsz, topk = [17, 10, 26], 8, 4, 3
    trees = [random_tree(n, g) for _ in prefix_lens]
    assert any(t != chain(n) for t in trees)
    b = make_batch(prefix_lens, trees, seed=2)
    (sel, o), node_lens = run_tree(b, bsz, topk, init_blocks, local_blocks)
    check_bruteforce(b, sel, o, bsz, topk, init_blocks, local_blocks)
    # node x of request i is the last token of prefix + path(x): seq_len + depth + 1 visible keys
    assert node_lens.tolist() == [s + len(path(t, x)) for s, t in zip(prefix_lens, trees) for x in range(n)]


def test_ngram_like_tree_with_padding_nodes():
    """NGRAM's trees: an irregular BFS tree whose padding nodes hang off the root (ngram result.cpp)."""
    n, bsz, topk = 7, 4, 2
    trees = [[-1, 0, 1, 1, 0, 0, 0], [-1, 0, 0, 1, 2, 3, 4]]
    b = make_batch([9, 14], trees, seed=3)
    (sel, o), _ = run_tree(b, bsz, topk)
    check_bruteforce(b, sel, o, bsz, topk)


def test_dense_to_sparse_switch_inside_the_draft_at_block_128():
    """Real block size: prefix 250 sees 2 blocks (all kept with top-2); drafts past position 255 see 3, so the
    selection turns sparse in the middle of the draft, for the chain and for a tree."""
    bsz, topk, n = 128, 2, 9
    g = torch.Generator().manual_seed(11)
    for trees, run in (([chain(n)] * 2, "chain"), ([random_tree(n, g), [-1] + list(range(n - 1))], "tree")):
        b = make_batch([250, 251], trees, seed=4)
        sel, o = run_chain(b, bsz, topk) if run == "chain" else run_tree(b, bsz, topk)[0]
        check_bruteforce(b, sel, o, bsz, topk)
        n_sel = (sel >= 0).sum(-1)
        assert n_sel.min() == 2 and n_sel.max() == 2
        assert (sel[:, :, 0] != 0).any() and (sel[:, :, 0] == 0).any()  # some rows drop block 0


def test_prefix_ending_on_a_block_boundary_at_block_128():
    """Prefixes of exactly 1 and 2 blocks (128, 256): the first draft opens a new block, which is its own local
    block, so every draft row keeps it; chain and tree."""
    bsz, topk, n = 128, 2, 6
    g = torch.Generator().manual_seed(13)
    for trees, run in (([chain(n)] * 2, "chain"), ([random_tree(n, g), random_tree(n, g)], "tree")):
        b = make_batch([256, 128], trees, seed=14)
        sel, o = run_chain(b, bsz, topk) if run == "chain" else run_tree(b, bsz, topk)[0]
        check_bruteforce(b, sel, o, bsz, topk)
        first_req = sel[:n]  # prefix 256: 3 blocks seen by every draft, top-2 of them
        assert ((first_req == 2).any(-1)).all() and (first_req >= 0).sum(-1).eq(2).all()


def test_chain_layout_and_tree_rows_agree_on_a_chain():
    """On a chain, the extend layout (N queries of one request in one score tile) and the tree rows (N one-query
    requests over virtual req_to_token rows) compute the same function by different arithmetic (other matmul
    shapes): selections equal up to near-tie swaps (float64 scores within 1e-4), outputs within 1e-6 where the
    selections agree, and each side's output the brute-force attention over its own selection
    (test_msa_reference.assert_agree_up_to_ties). Both sides are also held to the brute-force selection."""
    prefix_lens, n = [6, 19, 33], 4
    b = make_batch(prefix_lens, [chain(n)] * 3, seed=5)
    sel_c, o_c = run_chain(b, 4, 3)
    (sel_t, o_t), _ = run_tree(b, 4, 3)
    check_bruteforce(b, sel_c, o_c, 4, 3)
    check_bruteforce(b, sel_t, o_t, 4, 3)
    # request i's contiguous sequence: prefix + all drafts (a chain's last path); row i*N + x is position s_i + x
    seqs = [{k: torch.cat([rq["pre"][k], rq["draft"][k]]) for k in rq["pre"]} for rq in b["reqs"]]
    rows = [(i, s + x) for i, s in enumerate(prefix_lens) for x in range(n)]
    assert_agree_up_to_ties(sel_c, o_c, sel_t, o_t, seqs, rows, 4)
    assert (sel_c >= 0).sum(-1).max() == 3 and max(prefix_lens) + n > 3 * 4  # sparse rows exist


def test_uint8_mask_and_graph_buffers():
    """The CUDA-graph form: uint8 mask in a larger buffer (trailing garbage), outputs into fixed buffers."""
    g = torch.Generator().manual_seed(9)
    trees = [random_tree(6, g) for _ in range(2)]
    b = make_batch([11, 5], trees, seed=6)
    (sel, o), lens = run_tree(b, 4, 2)
    buf = torch.ones(b["custom_mask"].numel() + 50, dtype=torch.uint8)
    buf[: b["custom_mask"].numel()] = b["custom_mask"].to(torch.uint8)
    out_r2t = torch.full((20, b["req_to_token"].shape[1] + 1), -7, dtype=torch.int32)
    out_lens = torch.zeros(20, dtype=torch.int64)
    virt, lens2 = ref.verify_tree_rows(buf, b["seq_lens"], b["req_pool_indices"], b["out_cache_loc"],
                                       b["req_to_token"], 6, out_req_to_token=out_r2t, out_seq_lens=out_lens)
    assert virt.data_ptr() == out_r2t.data_ptr() and torch.equal(lens2, lens) and torch.equal(out_lens[:12], lens)
    assert (out_r2t[12:] == -7).all()
    bufs = tuple(torch.zeros(8, dtype=torch.int32) for _ in range(3))
    total, ext, start = ref.verify_chain_layout(b["seq_lens"], 6, out=bufs)
    assert total.data_ptr() == bufs[0].data_ptr()
    assert bufs[0][:2].tolist() == [17, 11] and bufs[1][:2].tolist() == [6, 6] and bufs[2][:2].tolist() == [0, 6]


def test_bad_verify_arguments_raise():
    b = make_batch([5], [chain(3)], seed=0)
    with pytest.raises(ValueError, match="out_cache_loc"):
        ref.verify_tree_rows(b["custom_mask"], b["seq_lens"], b["req_pool_indices"], b["out_cache_loc"][:2],
                             b["req_to_token"], 3)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        ref.verify_chain_layout(b["seq_lens"], 0)


# ----------------------------------------------------------------------------------------------
# the backend's TARGET_VERIFY path (torch twin, CPU), driven as SGLang 0.5.17 drives it
# ----------------------------------------------------------------------------------------------

BLOCK, TOPK = 4, 3
SPARSE = (1, 2)


class _Dense:
    """The dense delegate (Triton on CUDA): only metadata hooks and dense layers may reach it."""

    verify_mask = None

    def __init__(self):
        self.calls = []

    def init_forward_metadata(self, fb):
        self.calls.append("init_forward_metadata")

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        self.calls.append("update_verify_buffers_to_fill_after_draft")

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        self.calls.append("init_cuda_graph_state")

    def init_forward_metadata_out_graph(self, fb, in_capture=False):
        self.calls.append("out_graph")

    def init_forward_metadata_in_graph(self, fb):
        self.calls.append("in_graph")


def _backend(algorithm, topk, n, r2t):
    import types

    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_m3.attention.backend import M3SparseAttnBackend
    from sglang_m3.attention.pool import M3KVPool
    from sglang_m3.config import MiniMaxM3Config
    from sglang_m3.tiny import build_text_config

    cfg = MiniMaxM3Config(**build_text_config(num_attention_heads=HQ, num_key_value_heads=H, head_dim=D,
                                              block_size=BLOCK, topk_blocks=TOPK, num_hidden_layers=3))
    pool = M3KVPool(300, 1, torch.float32, H, D, 3, "cpu", False, start_layer=0, end_layer=3,
                    enable_alt_stream=False, enable_kv_cache_copy=True, sparse_layer_ids=SPARSE, index_dim=D)
    runner = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=cfg), token_to_kv_pool=pool,
        req_to_token_pool=types.SimpleNamespace(req_to_token=r2t), device="cpu",
        spec_algorithm=SpeculativeAlgorithm.from_string(algorithm),
        server_args=types.SimpleNamespace(speculative_num_draft_tokens=n, speculative_eagle_topk=topk))
    return M3SparseAttnBackend(runner, _Dense())


@pytest.mark.parametrize("algorithm,topk", [("EAGLE3", 1), ("EAGLE3", 4), ("NGRAM", 4)])
def test_backend_target_verify_equals_prefill_of_each_path(sglang_env, algorithm, topk):  # noqa: F811
    """TARGET_VERIFY as SGLang hands it over: extend_* None, seq_lens = committed prefix, the drafts' slots in
    out_cache_loc, the tree mask in spec_info; the backend stores each draft's K/V and index key, then attends."""
    import types

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    g = torch.Generator().manual_seed(21)
    n = 5
    trees = [chain(n)] * 3 if topk == 1 else [random_tree(n, g) for _ in range(3)]
    b = make_batch([9, 14, 3], trees, seed=8, dv=D)
    r2t = torch.zeros(b["req_to_token"].shape[0], 40, dtype=torch.int32)
    r2t[:, : b["req_to_token"].shape[1]] = b["req_to_token"]
    backend = _backend(algorithm, topk, n, r2t)
    assert backend.verify_is_chain == (topk == 1) and backend.num_draft_tokens == n
    pool = backend.token_to_kv_pool
    n_slots = b["ik_cache"].shape[0]
    pre = [s for i, s0 in enumerate(b["prefix_lens"])
           for s in r2t[b["req_pool_indices"][i], :s0].tolist()]  # the committed prefix: cached earlier
    fb = types.SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, req_pool_indices=b["req_pool_indices"], seq_lens=b["seq_lens"],
        out_cache_loc=b["out_cache_loc"], extend_seq_lens=None, extend_start_loc=None,
        spec_info=types.SimpleNamespace(custom_mask=b["custom_mask"], draft_token_num=n))
    backend.init_forward_metadata(fb)
    draft_k = torch.cat([rq["draft"]["k"] for rq in b["reqs"]])
    draft_v = torch.cat([rq["draft"]["v"] for rq in b["reqs"]])
    draft_ik = torch.cat([rq["draft"]["ik"] for rq in b["reqs"]])
    for lid in SPARSE:
        pool.k_buffer[lid][:n_slots][pre] = b["k_cache"][pre]
        pool.v_buffer[lid][:n_slots][pre] = b["v_cache"][pre]
        pool.get_index_k_buffer(lid)[:n_slots][pre] = b["ik_cache"][pre]
        layer = types.SimpleNamespace(layer_id=lid, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D,
                                      scaling=SM_SCALE, k_scale=None, v_scale=None)
        out = backend.forward(b["q"].reshape(-1, HQ * D), draft_k, draft_v, layer, fb,
                              index_q=b["index_q"], index_k=draft_ik)
        sel = ref.index_block_topk(b["index_q"], pool.get_index_k_buffer(lid), *_meta(backend),
                                   block_size=BLOCK, topk_blocks=TOPK)
        check_bruteforce(b, sel, out.view(-1, HQ, D), BLOCK, TOPK)
        assert torch.equal(pool.get_index_k_buffer(lid)[b["out_cache_loc"]], draft_ik)  # stored before indexing
        assert torch.equal(pool.k_buffer[lid][b["out_cache_loc"]], draft_k)
    assert backend.dense.calls == ["init_forward_metadata"]  # no sparse layer reached the dense delegate


def _meta(backend):
    m, _ = backend._meta
    return (m["req_to_token"], m["req_pool_indices"], m["seq_lens"], m["extend_seq_lens"], m["extend_start_loc"])


def test_backend_forwards_the_spec_members_base_class_attributes_shadow(sglang_env):  # noqa: F811
    """AttentionBackend defines verify_mask / update_verify_buffers_to_fill_after_draft, so __getattr__ never
    reaches the dense backend for them: they must be forwarded explicitly."""
    backend = _backend("NGRAM", 4, 3, torch.zeros(2, 8, dtype=torch.int32))
    backend.dense.verify_mask = marker = object()
    assert backend.verify_mask is marker
    backend.update_verify_buffers_to_fill_after_draft(None, None)
    assert backend.dense.calls == ["update_verify_buffers_to_fill_after_draft"]


# ----------------------------------------------------------------------------------------------
# EAGLE3 target interface (model.py) and the plugin's speculative flags
# ----------------------------------------------------------------------------------------------


class _Layer(torch.nn.Module):
    """Stand-in decoder layer: (hidden, residual) -> (f(stream), stream) with stream = hidden + residual."""

    def __init__(self, i):
        super().__init__()
        self.i = i

    def forward(self, positions, hidden, fb, residual):
        stream = hidden if residual is None else hidden + residual
        return torch.sin(stream * (self.i + 1)), stream


def _model(n_layers):
    import types

    from sglang_m3.model import M3Model, MiniMaxM3SparseForCausalLM

    m = M3Model.__new__(M3Model)
    torch.nn.Module.__init__(m)
    m.embed_tokens = torch.nn.Embedding(10, 4)
    m.layers = torch.nn.ModuleList(_Layer(i) for i in range(n_layers))
    m.norm = lambda h, r: (h + r, h + r)
    m.layers_to_capture = ()
    top = MiniMaxM3SparseForCausalLM.__new__(MiniMaxM3SparseForCausalLM)
    torch.nn.Module.__init__(top)
    top.model, top.view = m, types.SimpleNamespace(num_layers=n_layers)
    top.logits_processor = lambda ids, h, head, fb, aux=None: (h, aux)
    top.lm_head = None
    return top


def test_eagle3_captures_the_residual_stream_entering_the_layers():
    top = _model(6)
    ids = torch.tensor([1, 4, 7])
    h_plain, aux = top.forward(ids, None, None)
    assert aux is None and not top.capture_aux_hidden_states  # nothing captured until asked
    streams, h = [], top.model.embed_tokens(ids)  # independent walk: the stream entering each layer
    stream = h
    for i in range(6):
        streams.append(stream)
        stream = torch.sin(stream * (i + 1)) + stream
    top.set_eagle3_layers_to_capture([0, 2, 4])  # draft ids: the outputs of layers 0, 2, 4
    assert top.model.layers_to_capture == (1, 3, 5) and top.capture_aux_hidden_states
    h_cap, aux = top.forward(ids, None, None)
    assert torch.equal(h_cap, h_plain) and len(aux) == 3
    for got, want in zip(aux, (streams[1], streams[3], streams[5])):
        torch.testing.assert_close(got, want)
    top8 = _model(8)
    top8.set_eagle3_layers_to_capture(None)  # M3_SPEC §6.2 default: entering layers 2, L/2, L-3
    assert top8.model.layers_to_capture == (2, 4, 5)
    top.set_eagle3_layers_to_capture([5])  # the output of the last layer: the stream before the final norm
    _, aux = top.forward(ids, None, None)
    torch.testing.assert_close(aux[0], stream)
    with pytest.raises(ValueError, match="distinct"):
        top.set_eagle3_layers_to_capture([1, 1, 2])
    with pytest.raises(ValueError, match="distinct"):
        top.set_eagle3_layers_to_capture([6])
    with pytest.raises(ValueError, match=r"default .*\[2, 2, 1\].*eagle_aux_hidden_state_layer_ids"):
        _model(4).set_eagle3_layers_to_capture(None)  # 4 layers: 2, 4 // 2, 4 - 3 collide; the message says so


def test_plugin_speculative_flags():
    import types

    from sglang_m3.plugin import _speculative_overrides

    def args(algo, **kw):
        return types.SimpleNamespace(speculative_algorithm=algo, device="cuda", **kw)

    assert _speculative_overrides(args(None)) == {}
    assert _speculative_overrides(args("EAGLE3", speculative_draft_attention_backend=None)) == {}
    assert _speculative_overrides(args("NGRAM", speculative_draft_attention_backend=None)) == {}
    with pytest.raises(ValueError, match="m3_msa is for the M3 target"):
        _speculative_overrides(args("EAGLE", speculative_draft_attention_backend="m3_msa"))
    for algo in ("STANDALONE", "FROZEN_KV_MTP", "DFLASH"):
        with pytest.raises(ValueError, match=f"--speculative-algorithm {algo} is not supported"):
            _speculative_overrides(args(algo, speculative_draft_attention_backend=None))


def test_tiny_eagle3_draft_matches_the_target(tmp_path):
    import json

    from safetensors.torch import load_file

    from sglang_m3.tiny import write_tiny_checkpoint
    from sglang_m3.tiny_eagle3 import write_tiny_eagle3

    target = write_tiny_checkpoint(tmp_path / "m3", flat=True, config_only=True, num_hidden_layers=8)
    draft = write_tiny_eagle3(tmp_path / "draft", target)
    tc, dc = json.loads((target / "config.json").read_text()), json.loads((draft / "config.json").read_text())
    tc = tc.get("text_config", tc)
    assert dc["architectures"] == ["LlamaForCausalLMEagle3"] and dc["num_hidden_layers"] == 1
    assert dc["hidden_size"] == dc["target_hidden_size"] == tc["hidden_size"]
    assert dc["vocab_size"] == dc["draft_vocab_size"] == tc["vocab_size"]
    assert dc["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # entering layers 2, 4, 5
    w = load_file(str(draft / "model.safetensors"))
    h = tc["hidden_size"]
    assert w["fc.weight"].shape == (h, 3 * h)
    assert w["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * h  # [embedding ; fc output]
    assert w["lm_head.weight"].shape == (tc["vocab_size"], h)
    assert not any(k.startswith("embed_tokens") or k in ("d2t", "t2d") for k in w)  # shared with the target


# ----------------------------------------------------------------------------------------------
# the kernel path (what CUDA serving runs) under the verify CUDA-graph protocol, on CPU under Triton's
# interpreter (in a subprocess: TRITON_INTERPRET must be set before triton is imported)
# ----------------------------------------------------------------------------------------------


def _graph_case(algorithm, topk):
    """init_cuda_graph_state (warmup, frozen workspace, verify buffers), then two 'replays' of a batch padded to
    the captured size: out_graph (the live tree mask into the captured buffer) + in_graph + the sparse layers."""
    import types

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_m3.attention import kernels
    from sglang_m3.attention.kernels import common

    common._DEFAULT_SMS = 8  # small batches still take the split + merge paths, as on a GPU
    n, max_bs = 4, 3
    for replay in range(2):
        g = torch.Generator().manual_seed(40 + replay)
        trees = [chain(n)] * 2 if topk == 1 else [random_tree(n, g) for _ in range(2)]
        b = make_batch([10 + 7 * replay, 5], trees, seed=30 + replay, dv=D)
        r2t = torch.zeros(b["req_to_token"].shape[0], 40, dtype=torch.int32)
        r2t[:, : b["req_to_token"].shape[1]] = b["req_to_token"]
        if replay == 0:
            backend = _backend(algorithm, topk, n, r2t)
            backend.use_kernels, backend.impl = True, kernels
            backend.init_cuda_graph_state(max_bs, max_bs * n)
            assert backend._graph_workspace.frozen and backend._graph_block_topk.shape[0] == max_bs * n
        backend.req_to_token_pool.req_to_token.copy_(r2t)
        pool = backend.token_to_kv_pool
        spare_row = [r for r in range(r2t.shape[0]) if r not in b["req_pool_indices"].tolist()][0]
        pad_slot = int(r2t[spare_row, 0])  # the NaN slot: no real token lives there
        fb = types.SimpleNamespace(
            forward_mode=ForwardMode.TARGET_VERIFY,
            req_pool_indices=torch.cat([b["req_pool_indices"], torch.tensor([spare_row])]),
            seq_lens=torch.cat([b["seq_lens"], torch.tensor([1])]),  # Triton's seq-len fill value
            out_cache_loc=torch.cat([b["out_cache_loc"], torch.full((n,), pad_slot)]),
            spec_info=types.SimpleNamespace(custom_mask=b["custom_mask"], draft_token_num=n))
        backend.init_forward_metadata_out_graph(fb)
        backend.init_forward_metadata_in_graph(fb)
        assert backend._meta[1]["workspace"] is backend._graph_workspace
        n_slots = b["ik_cache"].shape[0]
        pre = [s for i, s0 in enumerate(b["prefix_lens"]) for s in r2t[b["req_pool_indices"][i], :s0].tolist()]
        def cat(part, k):  # the real requests' drafts, then a padded request's (random)
            return torch.cat([rq[part][k] for rq in b["reqs"]] + [torch.randn(n, *b["reqs"][0][part][k].shape[1:])])
        for lid in SPARSE:
            pool.k_buffer[lid][:n_slots][pre] = b["k_cache"][pre]
            pool.v_buffer[lid][:n_slots][pre] = b["v_cache"][pre]
            pool.get_index_k_buffer(lid)[:n_slots][pre] = b["ik_cache"][pre]
            layer = types.SimpleNamespace(layer_id=lid, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D,
                                          scaling=SM_SCALE, k_scale=None, v_scale=None)
            out = backend.forward(cat("draft", "q").reshape(-1, HQ * D), cat("draft", "k"), cat("draft", "v"),
                                  layer, fb, index_q=cat("draft", "iq"), index_k=cat("draft", "ik"))
            sel = backend._graph_block_topk[: 3 * n]
            assert torch.isfinite(out).all()
            real = 2 * n
            check_bruteforce(b, sel[:real], out[:real].view(-1, HQ, D), BLOCK, TOPK)
    return "ok"


def _worker():
    from sglang.srt.runtime_context import get_parallel

    ctx = get_parallel().override(tp_size=1, tp_rank=0)
    ctx.__enter__()
    res = {}
    for algorithm, topk in (("EAGLE3", 1), ("EAGLE3", 4), ("NGRAM", 4)):
        try:
            res[f"{algorithm}-{topk}"] = _graph_case(algorithm, topk)
        except BaseException:  # noqa: BLE001 -- reported to the parent test
            import traceback

            res[f"{algorithm}-{topk}"] = traceback.format_exc()
    print("@@RESULTS@@" + __import__("json").dumps(res), flush=True)


def test_kernel_path_under_the_verify_graph_protocol():
    """Chain (EAGLE3 topk 1: the kernels' extend form) and trees (EAGLE3 topk 4, NGRAM: decode rows over the
    virtual req_to_token), with the graph workspace frozen after warmup and the batch padded; ~1 min."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", SGLANG_USE_CPU_ENGINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(repo / "cpu_shim"), str(repo),
                                                      os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([sys.executable, __file__, "--worker"], cwd=repo, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")]
    assert line, f"worker died (rc={proc.returncode}):\n{proc.stdout[-5000:]}"
    results = json.loads(line[-1][len("@@RESULTS@@"):])
    assert all(r == "ok" for r in results.values()), "\n".join(f"{c}: {r}" for c, r in results.items())


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()


_DRAFT_PROBE = """
import json, types, sglang_m3
sglang_m3.enable()
from sglang.srt.speculative.draft_utils import DraftBackendFactory
def server_args(arch, **kw):
    cfg = types.SimpleNamespace(hf_config=types.SimpleNamespace(architectures=[arch]))
    sa = dict(speculative_draft_attention_backend=None, decode_attention_backend=None,
              prefill_attention_backend=None, attention_backend="m3_msa", get_model_config=lambda: cfg,
              speculative_algorithm="EAGLE")
    sa.update(kw)
    return types.SimpleNamespace(**sa)
def pick(arch="MiniMaxM3SparseForCausalLM", **kw):
    sa = server_args(arch, **kw)  # the draft's runner carries the server's flags, EAGLE's included
    runner = types.SimpleNamespace(device="cuda", server_args=sa)
    return DraftBackendFactory(sa, runner, 1, 3).draft_attn_backend
picks = [pick(), pick(attention_backend="flashinfer"), pick(speculative_draft_attention_backend="fa3"),
         pick(attention_backend="triton", decode_attention_backend="m3_msa")]
print(json.dumps({"picks": picks}))
"""


@pytest.fixture(scope="module")
def draft_probe():
    """SGLang's DraftBackendFactory with the plugin's hook, in a fresh interpreter."""
    import json
    import subprocess
    import sys

    from tests.conftest import cpu_env

    out = subprocess.run([sys.executable, "-c", _DRAFT_PROBE], env=cpu_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_eagle_draft_never_gets_the_m3_backend(draft_probe):
    """SGLang's DraftBackendFactory picks the draft's decode/extend backends from the draft flag, else the target's
    backend names; with ours (the M3 default) the plugin hands the dense Llama-style draft the dense backend."""
    assert draft_probe["picks"] == ["triton", None, "fa3", "triton"]


def test_second_verify_after_moving_the_accepted_path_equals_prefill(sglang_env):  # noqa: F811
    """Two tree-verify steps as SGLang runs them: after step 1 the accepted path's K/V and index keys are moved to
    the slots right after the prefix (pool.move_kv_cache, 0.5.17 eagle_worker_common.py), the rejected drafts'
    slots are left stale, and step 2 drafts from the new committed length. Every step-2 node must equal a prefill
    of prefix + accepted path + its own path: the index lane moved with K/V, stale slots overwritten before read."""
    import types

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    g = torch.Generator().manual_seed(51)
    n = 5
    trees1 = [[-1, 0, 0, 2, 3], [-1, 0, 1, 0, 3]]
    # accepted paths that skip rejected nodes, so their slots really move: nodes 0,2,3,4 and 0,3,4
    accepted = [path(trees1[0], 4), path(trees1[1], 4)]
    assert accepted == [[0, 2, 3, 4], [0, 3, 4]]
    b1 = make_batch([9, 6], trees1, seed=12, dv=D)
    r2t = torch.zeros(b1["req_to_token"].shape[0], 40, dtype=torch.int32)
    r2t[:, : b1["req_to_token"].shape[1]] = b1["req_to_token"]
    backend = _backend("EAGLE3", 4, n, r2t)
    pool = backend.token_to_kv_pool
    rows = b1["req_pool_indices"].tolist()
    n_slots = b1["ik_cache"].shape[0]
    pre = [s for i, s0 in enumerate(b1["prefix_lens"]) for s in r2t[rows[i], :s0].tolist()]

    def layer(lid):
        return types.SimpleNamespace(layer_id=lid, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D,
                                     scaling=SM_SCALE, k_scale=None, v_scale=None)

    def verify(b, parts):
        fb = types.SimpleNamespace(
            forward_mode=ForwardMode.TARGET_VERIFY, req_pool_indices=b["req_pool_indices"], seq_lens=b["seq_lens"],
            out_cache_loc=b["out_cache_loc"], extend_seq_lens=None, extend_start_loc=None,
            spec_info=types.SimpleNamespace(custom_mask=b["custom_mask"], draft_token_num=n))
        backend.init_forward_metadata(fb)
        outs = {}
        for lid in SPARSE:
            out = backend.forward(parts["q"].reshape(-1, HQ * D), parts["k"], parts["v"], layer(lid), fb,
                                  index_q=parts["iq"], index_k=parts["ik"])
            sel = ref.index_block_topk(parts["iq"], pool.get_index_k_buffer(lid), *_meta(backend),
                                       block_size=BLOCK, topk_blocks=TOPK)
            outs[lid] = sel, out.view(-1, HQ, D)
        return outs

    for lid in SPARSE:
        pool.k_buffer[lid][:n_slots][pre] = b1["k_cache"][pre]
        pool.v_buffer[lid][:n_slots][pre] = b1["v_cache"][pre]
        pool.get_index_k_buffer(lid)[:n_slots][pre] = b1["ik_cache"][pre]
    cat1 = {k: torch.cat([rq["draft"][k] for rq in b1["reqs"]]) for k in ("q", "k", "v", "iq", "ik")}
    for sel, out in verify(b1, cat1).values():
        check_bruteforce(b1, sel, out, BLOCK, TOPK)

    # acceptance: the accepted nodes' slots -> the slots at positions seq_len .. seq_len + accepted - 1
    src = torch.cat([b1["out_cache_loc"][i * n + torch.tensor(acc)] for i, acc in enumerate(accepted)])
    tgt = torch.cat([r2t[rows[i], s: s + len(acc)].long() for i, (s, acc) in
                     enumerate(zip(b1["prefix_lens"], accepted))])
    pool.move_kv_cache(tgt, src)

    # step 2: committed = prefix + accepted path; new drafts in the slots after it (stale rejected slots reused,
    # fresh slots past the old drafts' end)
    prefix2 = [s + len(acc) for s, acc in zip(b1["prefix_lens"], accepted)]
    trees2 = [random_tree(n, g) for _ in prefix2]
    fresh = iter(range(200, 260))
    out_loc = []
    for i, s in enumerate(prefix2):
        for p in range(s, s + n):
            if p >= b1["prefix_lens"][i] + n:
                r2t[rows[i], p] = next(fresh)
        out_loc.append(r2t[rows[i], s: s + n].long())
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    drafts2 = [dict(iq=r(n, H, DI), ik=r(n, DI), q=r(n, HQ, D), k=r(n, H, D), v=r(n, H, D)) for _ in prefix2]
    reqs2 = [dict(pre={k: torch.cat([rq["pre"][k], rq["draft"][k][acc]]) for k in rq["pre"]}, draft=d)
             for rq, acc, d in zip(b1["reqs"], accepted, drafts2)]
    b2 = dict(reqs=reqs2, trees=trees2, prefix_lens=prefix2, n=n, req_pool_indices=b1["req_pool_indices"],
              seq_lens=torch.tensor(prefix2, dtype=torch.int64), out_cache_loc=torch.cat(out_loc),
              custom_mask=full_mask(prefix2, trees2))
    cat2 = {k: torch.cat([d[k] for d in drafts2]) for k in ("q", "k", "v", "iq", "ik")}
    for sel, out in verify(b2, cat2).values():
        check_bruteforce(b2, sel, out, BLOCK, TOPK)
        assert (sel >= 0).sum(-1).max() == TOPK  # sparse rows exist
