"""M3SparseAttnBackend's kernel path (the one CUDA serving takes), on CPU under Triton's interpreter.

The backend is built as SGLang's model runner builds it (model config, our KV pool, a req_to_token table), with
the Triton kernels forced on (on CPU it would choose the torch reference), and driven the way SGLang drives it:
  * eager decode: ``init_forward_metadata`` of a DECODE batch, so the kernels get the graph-safe decode form of
    the metadata (extend tensors None);
  * eager extend: a chunk after a cached prefix, a fresh prefill and a one-token extend in one EXTEND batch;
  * the decode-graph path: ``init_cuda_graph_state`` (kernels.MSAWorkspace, warmup for every captured batch size,
    freeze, the preallocated top-k buffer), then ``init_forward_metadata_in_graph`` + the sparse layers for a
    batch padded to the captured size the way SGLang 0.5.17's decode graph runner pads it
    (cuda_graph_buffer_registry.build_decode_registry: req_pool_indices and out_cache_loc of padded rows are 0 --
    req_to_token row 0 and KV slot 0 are the pools' padding row/slot, never handed to a request -- and seq_lens
    is the backend's get_cuda_graph_seq_len_fill_value(), 1 for the triton dense backend), twice with new
    lengths, rows and slots (a replay recomputes the in-graph metadata), then an eager extend on the same backend.

Oracle: a float64 brute force of MSA (M3_SPEC §3.2-3.6) on each request's contiguous tensors, written here, not
taken from reference.py. A backend's block selection (read through a spy on its impl) must be a valid top-k:
forced blocks in, the right size, and no unchosen block scoring above a chosen one by more than SEL_TOL (near
ties may legitimately go either way in fp32); its output must equal the oracle's attention over *its own*
selection (fp32 vs float64: atol = rtol = 1e-4). The kernel path's output must also equal the torch path's
(same backend class on CPU, same inputs) within the same tolerance wherever both selected the same blocks.
Caches: every real new token's K, V and index key land at its slot, bit-exact on both paths; padded rows
write only slot 0; nothing else changes in any layer's buffers.

Runs in one worker subprocess (TRITON_INTERPRET must be set before triton is imported): ~30 s of interpreter
work (decode 5 s, extend 9 s, graph path 13 s on an idle 2-core machine) plus imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__" and "--worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

if __name__ != "__main__":  # under pytest: the in-process test's fixture (the worker process needs none)
    from tests.test_layers import sglang_env  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

# Tiny M3: 4 q heads, 2 KV heads (= index heads), D = Di = Dv = 32, 16-token blocks, top-2 (sparse past 32 tokens).
HQ, HKV, D, BLOCK, TOPK = 4, 2, 32, 16, 2
SPARSE_LAYERS = (1, 2, 3)
SLOTS = 400  # KV slots (slot 0 is the padding slot)
ROWS = 8  # req_to_token rows (row 0 is the padding row)
WIDTH = 160  # req_to_token width (context length)
SEL_TOL = 1e-5  # float64 block scores closer than this count as tied
OUT_TOL = dict(rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ worker side

def _setup():
    import torch

    if not torch.cuda.is_available():  # the sgl_kernel stand-in must never shadow the real one on a GPU host
        sys.path.insert(0, str(REPO / "cpu_shim"))
    from sglang_m3.attention.kernels import common

    from sglang.srt.runtime_context import get_parallel

    common._DEFAULT_SMS = 8  # tiny batches still take the split (+ merge) paths, as small batches do on a GPU
    torch.manual_seed(0)
    global _TP1
    _TP1 = get_parallel().override(tp_size=1, tp_rank=0)  # TP1 (no process groups in this worker); kept
    _TP1.__enter__()  # referenced so that the context is not closed by garbage collection


class FakeDense:
    """The dense delegate: records what reaches it (only dense layers and the metadata hooks should)."""

    def __init__(self):
        self.calls = []

    def init_forward_metadata(self, fb):
        self.calls.append("init_forward_metadata")

    def init_forward_metadata_out_graph(self, fb, in_capture=False):
        self.calls.append("out_graph")

    def init_forward_metadata_in_graph(self, fb):
        self.calls.append("in_graph")

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        self.calls.append(("init_cuda_graph_state", max_bs, max_num_tokens))

    def get_cuda_graph_seq_len_fill_value(self):
        return 1  # TritonAttnBackend's value (the dense delegate on CUDA)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self.calls.append(("forward_decode", layer.layer_id))
        return q

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self.calls.append(("forward_extend", layer.layer_id))
        return q


class SelectionSpy:
    """Stands in for the backend's impl module; records each selection it returns."""

    def __init__(self, impl):
        self.impl, self.selections, self.addresses = impl, [], []

    def __getattr__(self, name):
        return getattr(self.impl, name)

    def index_block_topk(self, *args, **kwargs):
        sel = self.impl.index_block_topk(*args, **kwargs)
        self.selections.append(sel.clone())  # (under a graph every layer writes the same buffer)
        self.addresses.append(sel.data_ptr())
        return sel


def make_backend(kernels_on: bool):
    import torch

    from sglang_m3.attention import kernels, reference
    from sglang_m3.attention.backend import M3SparseAttnBackend
    from sglang_m3.attention.pool import M3KVPool
    from sglang_m3.config import MiniMaxM3Config
    from sglang_m3.tiny import build_text_config

    cfg = MiniMaxM3Config(**build_text_config(num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                                              block_size=BLOCK, topk_blocks=TOPK))
    pool = M3KVPool(SLOTS - 1, 1, torch.float32, HKV, D, 4, "cpu", False, start_layer=0, end_layer=4,
                    enable_alt_stream=False, enable_kv_cache_copy=False, sparse_layer_ids=SPARSE_LAYERS,
                    index_dim=D)
    r2t = torch.zeros(ROWS, WIDTH, dtype=torch.int32)  # row 0: the padding row (all slot 0), as in ReqToTokenPool
    runner = type("Runner", (), dict(model_config=type("MC", (), dict(hf_config=cfg))(), token_to_kv_pool=pool,
                                     req_to_token_pool=type("R2T", (), dict(req_to_token=r2t))(), device="cpu",
                                     spec_algorithm=None, server_args=None))()
    backend = M3SparseAttnBackend(runner, FakeDense())
    assert not backend.use_kernels  # what it picks on CPU; the kernel path is forced below
    if kernels_on:
        backend.use_kernels, backend.impl = True, kernels
    assert backend.impl is (kernels if kernels_on else reference)
    backend.impl = SelectionSpy(backend.impl)
    return backend


def layer(layer_id):
    """The RadixAttention the model builds for a layer (what the backend reads head counts, scale, id from)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    return RadixAttention(HQ, D, D ** -0.5, HKV, layer_id, v_head_dim=D)


def fill_background(backend, seed):
    """Every cache row random (slot 0 included), so any write shows; returns nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = backend.token_to_kv_pool
    for buf in [*pool.k_buffer, *pool.v_buffer, *pool.index_k_buffer]:
        buf.copy_(torch.randn(buf.shape, generator=g))


def snapshot(backend):
    pool = backend.token_to_kv_pool
    return {f"{kind}{i}": b.clone() for kind, bufs in (("k", pool.k_buffer), ("v", pool.v_buffer),
                                                       ("ik", pool.index_k_buffer)) for i, b in enumerate(bufs)}


def make_requests(specs, seed, used_rows=(), used_slots=()):
    """specs: [(seq_len, new_tokens)]. Each request gets a free req_to_token row (never 0) and random free
    slots (never 0), and per sparse layer contiguous float32 tensors for all its positions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    free_rows = [r for r in torch.randperm(ROWS - 1, generator=g).add(1).tolist() if r not in used_rows]
    free_slots = [s for s in torch.randperm(SLOTS - 1, generator=g).add(1).tolist() if s not in used_slots]
    reqs = []
    for n, ext in specs:
        slots, free_slots = free_slots[:n], free_slots[n:]
        data = {lid: dict(iq=torch.randn(n, HKV, D, generator=g), ik=torch.randn(n, D, generator=g),
                          q=torch.randn(n, HQ, D, generator=g), k=torch.randn(n, HKV, D, generator=g),
                          v=torch.randn(n, HKV, D, generator=g)) for lid in SPARSE_LAYERS}
        reqs.append(dict(n=n, ext=ext, row=free_rows.pop(0), slots=torch.tensor(slots), data=data))
    return reqs


def install_prefixes(backend, reqs):
    """What earlier forwards left behind: req_to_token rows and the cached prefix's K, V and index keys."""
    pool = backend.token_to_kv_pool
    r2t = backend.req_to_token_pool.req_to_token
    for r in reqs:
        r2t[r["row"], : r["n"]] = r["slots"].to(r2t.dtype)
        pre = r["slots"][: r["n"] - r["ext"]]
        for lid, t in r["data"].items():
            pool.k_buffer[lid][pre] = t["k"][: len(pre)]
            pool.v_buffer[lid][pre] = t["v"][: len(pre)]
            pool.get_index_k_buffer(lid)[pre] = t["ik"][: len(pre)]


def forward_batch(reqs, mode, pad_to=None, fill_value=1, seed=0):
    """The ForwardBatch fields the backend reads, plus each sparse layer's new-token inputs (padded rows last)."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    ext = torch.tensor([r["ext"] for r in reqs], dtype=torch.int32)
    fb = type("FB", (), {})()
    fb.forward_mode = mode
    fb.req_pool_indices = torch.tensor([r["row"] for r in reqs], dtype=torch.int64)
    fb.seq_lens = torch.tensor([r["n"] for r in reqs], dtype=torch.int64)
    fb.out_cache_loc = torch.cat([r["slots"][r["n"] - r["ext"]: r["n"]] for r in reqs]).long()
    if mode == ForwardMode.EXTEND:
        fb.extend_seq_lens, fb.extend_start_loc = ext, torch.cumsum(ext, 0) - ext
    inputs = {}
    for lid in SPARSE_LAYERS:
        cat = lambda name: torch.cat([r["data"][lid][name][r["n"] - r["ext"]: r["n"]] for r in reqs])  # noqa: E731
        inputs[lid] = dict(q=cat("q").reshape(-1, HQ * D), k=cat("k"), v=cat("v"), index_q=cat("iq"),
                           index_k=cat("ik"))
    if pad_to is not None:  # SGLang's decode-graph padding (see the module docstring)
        pad = pad_to - len(reqs)
        g = torch.Generator().manual_seed(seed)
        fb.req_pool_indices = torch.cat([fb.req_pool_indices, torch.zeros(pad, dtype=torch.int64)])
        fb.seq_lens = torch.cat([fb.seq_lens, torch.full((pad,), fill_value, dtype=torch.int64)])
        fb.out_cache_loc = torch.cat([fb.out_cache_loc, torch.zeros(pad, dtype=torch.int64)])
        for x in inputs.values():
            for name, t in x.items():
                x[name] = torch.cat([t, torch.randn((pad, *t.shape[1:]), generator=g)])
    return fb, inputs


def run_layers(backend, fb, inputs, decode):
    """Every sparse layer, then dense layer 0, in the order a forward calls them; returns {layer: output}."""
    outs = {}
    for lid in SPARSE_LAYERS:
        x = inputs[lid]
        fwd = backend.forward_decode if decode else backend.forward_extend
        outs[lid] = fwd(x["q"], x["k"], x["v"], layer(lid), fb, index_q=x["index_q"], index_k=x["index_k"])
    dense_q = inputs[1]["q"]
    fwd = backend.forward_decode if decode else backend.forward_extend
    assert fwd(dense_q, None, None, layer(0), fb) is dense_q  # dense layer: the delegate, untouched
    return outs


# ---- the float64 oracle ----------------------------------------------------------------------------------------

def oracle_check(reqs, outs, selections, label):
    """Each selection row must be a valid top-k (near ties allowed), each output the float64 attention over the
    backend's own selection. Returns the number of (token, head) rows that differ from a strict top-k."""
    import torch

    near_ties = 0
    for k_layer, lid in enumerate(SPARSE_LAYERS):
        sel, out = selections[k_layer], outs[lid].reshape(-1, HQ, D)
        t = 0
        for r in reqs:
            d = {name: x.double() for name, x in r["data"][lid].items()}
            for p in range(r["n"] - r["ext"], r["n"]):
                nb = p // BLOCK + 1
                for h in range(HKV):
                    s = d["ik"][: p + 1] @ d["iq"][p, h]  # [p+1]
                    score = torch.nn.functional.pad(s, (0, nb * BLOCK - (p + 1)), value=float("-inf"))
                    score = score.view(nb, BLOCK).amax(-1)
                    row = sel[t, h].tolist()
                    got = [b for b in row if b >= 0]
                    where = f"{label} layer {lid} pos {p} head {h}: selection {row}"
                    assert got == sorted(set(got)) and row[len(got):] == [-1] * (TOPK - len(got)), where
                    assert len(got) == min(TOPK, nb) and all(0 <= b < nb for b in got), where
                    forced = {b for b in range(nb) if b >= nb - 1}  # M3: init 0, local 1
                    assert forced <= set(got), f"{where} lacks the forced blocks {forced}"
                    chosen = [float(score[b]) for b in got if b not in forced]
                    left = [float(score[b]) for b in range(nb) if b not in got]
                    if chosen and left:
                        assert max(left) <= min(chosen) + SEL_TOL, f"{where}; scores {score.tolist()}"
                        near_ties += max(left) > min(chosen)
                for qh in range(HQ):
                    h = qh // (HQ // HKV)
                    keys = [j for j in range(p + 1) if j // BLOCK in got_blocks(sel[t, h])]
                    logits = (d["k"][keys, h] @ d["q"][p, qh]) * D ** -0.5
                    want = torch.softmax(logits, 0) @ d["v"][keys, h]
                    torch.testing.assert_close(out[t, qh].double(), want, **OUT_TOL,
                                               msg=lambda m: f"{label} layer {lid} pos {p} q head {qh}: {m}")
                t += 1
    return near_ties


def got_blocks(row):
    return {b for b in row.tolist() if b >= 0}


def check_writes(before, after, reqs, fb_loc, real_tokens, inputs, label):
    """Real new tokens' K/V/index keys at their slots (bit-exact); padded rows only at slot 0; nothing else."""
    import torch

    real = fb_loc[:real_tokens]
    allowed = torch.zeros(SLOTS, dtype=torch.bool)
    allowed[real] = True
    padded = fb_loc[real_tokens:]
    assert bool((padded == 0).all()), padded
    allowed[0] = True  # the padding slot
    for k_layer, lid in enumerate(SPARSE_LAYERS):
        pool_idx = {"k": lid, "v": lid, "ik": k_layer}
        src = {"k": inputs[lid]["k"], "v": inputs[lid]["v"], "ik": inputs[lid]["index_k"]}
        for kind in ("k", "v", "ik"):
            b, a = before[f"{kind}{pool_idx[kind]}"], after[f"{kind}{pool_idx[kind]}"]
            assert torch.equal(a[real], src[kind][:real_tokens]), f"{label}: layer {lid} {kind} of new tokens"
            assert torch.equal(a[~allowed], b[~allowed]), f"{label}: layer {lid} {kind} written outside the batch"
    # dense layer 0 has no index lane and its K/V belong to the dense delegate (a fake here): untouched
    assert torch.equal(after["k0"], before["k0"]) and torch.equal(after["v0"], before["v0"]), label


def compare_paths(outs_k, sel_k, outs_t, sel_t, real_tokens, label):
    """Kernel path vs torch path: same output wherever both selected the same blocks."""
    import torch

    same_rows = 0
    for k_layer, lid in enumerate(SPARSE_LAYERS):
        sk, st = sel_k[k_layer][:real_tokens], sel_t[k_layer][:real_tokens]
        same = (sk == st).all(-1)  # [T, Hkv]
        same_q = same.repeat_interleave(HQ // HKV, dim=1)  # [T, Hq]
        ok, ot = outs_k[lid][:real_tokens].reshape(-1, HQ, D), outs_t[lid].reshape(-1, HQ, D)
        torch.testing.assert_close(ok[same_q], ot[same_q], **OUT_TOL,
                                   msg=lambda m: f"{label} layer {lid}: kernel vs torch path: {m}")
        same_rows += int(same.sum())
    return same_rows


def run_path(kernels_on, reqs, mode, seed, pad_to=None):
    backend = make_backend(kernels_on)
    fill_background(backend, seed)
    install_prefixes(backend, reqs)
    fb, inputs = forward_batch(reqs, mode, pad_to=pad_to, seed=seed)
    before = snapshot(backend)
    backend.init_forward_metadata(fb)
    outs = run_layers(backend, fb, inputs, decode=mode.is_decode_or_idle())
    return backend, fb, inputs, before, outs


# ---- cases -----------------------------------------------------------------------------------------------------

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _eager(mode_name, specs, seed):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    mode = getattr(ForwardMode, mode_name)
    reqs = make_requests(specs, seed)
    res = {}
    paths = {}
    for kernels_on in (True, False):
        backend, fb, inputs, before, outs = run_path(kernels_on, reqs, mode, seed)
        label = f"{mode_name} {'kernels' if kernels_on else 'torch'}"
        sels = backend.impl.selections
        assert len(sels) == len(SPARSE_LAYERS)
        res[f"near_ties_{label}"] = oracle_check(reqs, outs, sels, label)
        T = fb.out_cache_loc.numel()
        check_writes(before, snapshot(backend), reqs, fb.out_cache_loc, T, inputs, label)
        paths[kernels_on] = (outs, sels, T)
    res["same_selection_rows"] = compare_paths(paths[True][0], paths[True][1], paths[False][0], paths[False][1],
                                               paths[True][2], mode_name)
    return res


@case
def eager_decode():
    """Decode of 3 requests: sparse (70 tokens), first sparse length (33), dense (17); kernels get extend=None."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    reqs = make_requests([(70, 1), (33, 1), (17, 1)], seed=1)
    backend = make_backend(True)
    fb, _ = forward_batch(reqs, ForwardMode.DECODE)
    backend.init_forward_metadata(fb)
    meta, plan = backend._meta
    assert meta["extend_seq_lens"] is None and meta["extend_start_loc"] is None  # the graph-safe decode form
    assert plan["workspace"] is None and plan["meta"].num_tokens == 3
    return _eager("DECODE", [(70, 1), (33, 1), (17, 1)], seed=1)


@case
def eager_extend():
    """A 30-token chunk after a 40-token cached prefix (ends mid-block), a fresh 50-token prefill and a
    one-token extend at length 65, in one EXTEND batch."""
    return _eager("EXTEND", [(70, 30), (50, 50), (65, 1)], seed=2)


@case
def graph_decode_padded():
    """init_cuda_graph_state, then two replays padded to the captured size, then an eager extend."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    max_bs = 4
    backend = make_backend(True)
    backend.init_cuda_graph_state(max_bs, max_bs)
    ws = backend._graph_workspace
    assert ws is not None and ws.frozen and backend._workspace is None
    assert ("init_cuda_graph_state", max_bs, max_bs) in backend.dense.calls
    topk_buf = backend._graph_block_topk
    assert tuple(topk_buf.shape) == (max_bs, HKV, TOPK) and topk_buf.dtype == torch.int32
    ptrs = {name: b.data_ptr() for name, b in ws._bufs.items()}
    assert ptrs  # warmup sized the scratch
    fill = backend.get_cuda_graph_seq_len_fill_value()
    assert fill == 1
    fill_background(backend, 3)
    res = {}
    used_rows, used_slots = set(), set()
    for replay, specs in enumerate(([(70, 1), (33, 1), (17, 1)], [(100, 1), (48, 1)])):
        reqs = make_requests(specs, seed=10 + replay, used_rows=used_rows, used_slots=used_slots)
        used_rows |= {r["row"] for r in reqs}
        used_slots |= {s for r in reqs for s in r["slots"].tolist()}
        install_prefixes(backend, reqs)
        fb, inputs = forward_batch(reqs, ForwardMode.DECODE, pad_to=max_bs, fill_value=fill, seed=20 + replay)
        before = snapshot(backend)
        backend.impl.selections.clear()
        backend.impl.addresses.clear()
        backend.init_forward_metadata_out_graph(fb)
        backend.init_forward_metadata_in_graph(fb)  # what the captured graph recomputes at each replay
        assert backend._workspace is ws and backend._meta[1]["workspace"] is ws
        outs = run_layers(backend, fb, inputs, decode=True)
        sels = backend.impl.selections
        # the selection lands in the preallocated buffer (fixed address under a graph)
        assert backend.impl.addresses == [topk_buf.data_ptr()] * len(SPARSE_LAYERS)
        assert all(sel.shape[0] == max_bs for sel in sels)
        n = len(reqs)
        label = f"graph replay {replay}"
        res[f"near_ties_{label}"] = oracle_check(reqs, {k: v[:n] for k, v in outs.items()}, sels, label)
        check_writes(before, snapshot(backend), reqs, fb.out_cache_loc, n, inputs, label)
        for lid in SPARSE_LAYERS:
            assert torch.isfinite(outs[lid][n:]).all(), f"{label}: padded rows' output is not finite"
        # the torch path on the unpadded batch, from the same cache state
        ref_backend = make_backend(False)
        for name, buf in before.items():
            kind, i = name.rstrip("0123456789"), int(name.lstrip("ikv"))
            {"k": ref_backend.token_to_kv_pool.k_buffer, "v": ref_backend.token_to_kv_pool.v_buffer,
             "ik": ref_backend.token_to_kv_pool.index_k_buffer}[kind][i].copy_(buf)
        ref_backend.req_to_token_pool.req_to_token.copy_(backend.req_to_token_pool.req_to_token)
        fb_ref, inputs_ref = forward_batch(reqs, ForwardMode.DECODE)
        ref_backend.init_forward_metadata(fb_ref)
        outs_ref = run_layers(ref_backend, fb_ref, inputs_ref, decode=True)
        res[f"same_selection_rows_{label}"] = compare_paths(outs, sels, outs_ref, ref_backend.impl.selections, n,
                                                            label)
        assert {name: b.data_ptr() for name, b in ws._bufs.items()} == ptrs, f"{label}: workspace reallocated"
    # an eager extend on the same backend uses no frozen workspace (it would have to grow)
    reqs = make_requests([(70, 30), (40, 40)], seed=30, used_rows=used_rows, used_slots=used_slots)
    install_prefixes(backend, reqs)
    fb, inputs = forward_batch(reqs, ForwardMode.EXTEND)
    backend.impl.selections.clear()
    backend.init_forward_metadata(fb)
    assert backend._workspace is None
    outs = run_layers(backend, fb, inputs, decode=False)
    res["near_ties_extend_after_graph"] = oracle_check(reqs, outs, backend.impl.selections, "extend after graph")
    return res


def _worker(names):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _setup()
    results = {}
    for name in names:
        t0 = time.time()
        try:
            info = CASES[name]()
            results[name] = {"ok": True, "seconds": round(time.time() - t0, 1), **(info or {})}
        except BaseException:  # noqa: BLE001 -- reported to the parent test
            results[name] = {"ok": False, "error": traceback.format_exc()}
    print("@@RESULTS@@" + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------------------ pytest side

@pytest.fixture(scope="module")
def worker_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", SGLANG_USE_CPU_ENGINE="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(REPO / "cpu_shim"), str(REPO),
                                                      os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([sys.executable, __file__, "--worker", *CASES], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")]
    if not line:
        raise RuntimeError(f"backend worker died (rc={proc.returncode}):\n{proc.stdout[-6000:]}")
    return json.loads(line[-1][len("@@RESULTS@@"):])


@pytest.mark.parametrize("name", list(CASES))
def test_backend_kernel_path(name, worker_results):
    r = worker_results[name]
    assert r["ok"], r.get("error")
    print(name, r)



def test_unfused_store_path_torch(sglang_env):  # noqa: F811
    """The sparse layers' other store path (backend.fused_store False: a pool whose K/V write is not the plain row
    scatter the one-launch store assumes, e.g. a subclass with its own _store_kv_layer): K/V through the pool's
    set_kv_buffer, then the index key. Torch path, in process (no Triton). Same oracle as the worker cases: every
    new token's K, V and index key at its slot, nothing else written, outputs the float64 attention over a valid
    top-k selection of the index keys just stored."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.runtime_context import get_parallel

    from sglang_m3.attention.pool import M3KVPool

    class OwnRowStore(M3KVPool):
        def _store_kv_layer(self, layer_idx, loc, cache_k, cache_v):
            self.k_buffer[layer_idx][loc] = cache_k
            self.v_buffer[layer_idx][loc] = cache_v

    with get_parallel().override(tp_size=1, tp_rank=0):
        backend = make_backend(False)
        backend.token_to_kv_pool.__class__ = OwnRowStore
        assert not backend.fused_store
        reqs = make_requests([(70, 30), (40, 40), (65, 1)], seed=5)
        fill_background(backend, 5)
        install_prefixes(backend, reqs)
        fb, inputs = forward_batch(reqs, ForwardMode.EXTEND)
        before = snapshot(backend)
        backend.init_forward_metadata(fb)
        outs = run_layers(backend, fb, inputs, decode=False)
    check_writes(before, snapshot(backend), reqs, fb.out_cache_loc, fb.out_cache_loc.numel(), inputs, "unfused")
    oracle_check(reqs, outs, backend.impl.selections, "unfused")


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1:] or list(CASES))
