"""End to end through `python -m sglang.launch_server --device cpu` with the plugin loaded.

Tiny fp32 checkpoints with `sparse_topk_blocks: 2`, block 128: prompts past 256 tokens are in the sparse
regime. Oracles: transformers 5.12.1 (exact MSA only with one KV head or below topk·block tokens — see
tests/hf_oracle.py), the same server with the radix cache flushed, and the same checkpoint unchunked.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import pytest
import torch

from tests.hf_oracle import hf_logits

pytestmark = pytest.mark.server

# fp32 end to end; the remaining difference is summation order (SGLang's kernels vs HF eager).
LOGPROB_TOL = 2e-4


def post(server, path: str, body: dict | None = None, timeout: float = 300):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{path} -> HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()


def flush(server, timeout: float = 120):
    """/flush_cache refuses (400) while requests are still in flight, e.g. a just-closed stream: retry."""
    deadline = time.time() + timeout
    while True:
        try:
            return post(server, "/flush_cache")
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def prompt_ids(n: int, seed: int) -> list[int]:
    """n byte-level token ids of readable text (ids 32..126 are printable bytes in the tiny tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).tolist()


def input_logprobs(server, ids: list[int], **extra) -> list[float]:
    out = post(server, "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                     "sampling_params": {"max_new_tokens": 1, "temperature": 0}, **extra})
    # The first input token has no logprob (nothing predicts it).
    return [lp for lp, _tok, _ in out["meta_info"]["input_token_logprobs"][1:]]


def hf_input_logprobs(ckpt, ids: list[int]) -> list[float]:
    logp = torch.log_softmax(hf_logits(ckpt, ids).double(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# ---- servers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vl_ckpt(tiny_dir):
    """Released (VL) packaging, 2 KV heads."""
    return tiny_dir()


@pytest.fixture(scope="module")
def one_kv_ckpt(tiny_dir):
    """Flat packaging, one KV head: HF's head-pooled selection is exact MSA at any length."""
    return tiny_dir(flat=True, num_key_value_heads=1)


@pytest.fixture(scope="module")
def vl_server(start_server, vl_ckpt):
    return start_server(vl_ckpt, "--reasoning-parser", "minimax-m3", "--tool-call-parser", "minimax-m3")


@pytest.fixture(scope="module")
def one_kv_server(start_server, one_kv_ckpt):
    return start_server(one_kv_ckpt)


@pytest.fixture(scope="module")
def one_kv_chunked_server(start_server, one_kv_ckpt):
    # 96: chunk boundaries fall mid-block and never on a multiple of 128.
    return start_server(one_kv_ckpt, "--chunked-prefill-size", "96")


# ---- logprobs against transformers ---------------------------------------------------------------------
def test_prompt_logprobs_match_hf_several_kv_heads_dense_regime(vl_server, vl_ckpt):
    ids = prompt_ids(200, seed=1)  # < topk·block = 256: MSA is exactly dense, HF's pooling is exact too
    ours, ref = input_logprobs(vl_server, ids), hf_input_logprobs(vl_ckpt, ids)
    diff = max_diff(ours, ref)
    print(f"VL packaging, 2 KV heads, 200 tokens: max |Δ logprob| = {diff:.2e}")
    assert diff < LOGPROB_TOL


def test_prompt_logprobs_match_hf_one_kv_head_sparse_regime(one_kv_server, one_kv_ckpt):
    ids = prompt_ids(777, seed=2)  # 7 blocks visible at the end, top-2 selected: deep in the sparse regime
    ours, ref = input_logprobs(one_kv_server, ids), hf_input_logprobs(one_kv_ckpt, ids)
    diff = max_diff(ours, ref)
    print(f"flat packaging, 1 KV head, 777 tokens: max |Δ logprob| = {diff:.2e}")
    assert diff < LOGPROB_TOL


def test_sparse_regime_differs_from_dense_attention(one_kv_server, one_kv_ckpt):
    """Guards the oracle comparison above: at 777 tokens the model must not be computing dense attention."""
    ids = prompt_ids(777, seed=2)
    cfg = json.loads((one_kv_ckpt / "config.json").read_text())
    dense_topk = math.ceil(len(ids) / cfg["sparse_attention_config"]["sparse_block_size"])
    ref_dense = hf_input_logprobs_with_topk(one_kv_ckpt, ids, dense_topk)
    assert max_diff(input_logprobs(one_kv_server, ids), ref_dense) > 10 * LOGPROB_TOL


def hf_input_logprobs_with_topk(ckpt, ids, topk):
    """HF logprobs of a copy of the checkpoint whose top-k covers every block (i.e. dense attention)."""
    import shutil
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    for f in ckpt.iterdir():
        shutil.copy(f, tmp / f.name)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["sparse_attention_config"]["sparse_topk_blocks"] = topk
    (tmp / "config.json").write_text(json.dumps(cfg))
    return hf_input_logprobs(tmp, ids)


def test_chunked_prefill_equals_unchunked(one_kv_server, one_kv_chunked_server):
    ids = prompt_ids(650, seed=3)
    whole, chunked = input_logprobs(one_kv_server, ids), input_logprobs(one_kv_chunked_server, ids)
    diff = max_diff(whole, chunked)
    print(f"chunked prefill (96) vs unchunked, 650 tokens: max |Δ logprob| = {diff:.2e}")
    assert diff < 1e-4


def test_decode_logprobs_equal_prefill_of_the_same_tokens(vl_server):
    """Decode steps (one token each, sparse regime, 2 KV heads) score what one prefill of prompt + output scores:
    the decode-path attention, index-key store and metadata against the extend path, at fp32."""
    ids = prompt_ids(700, seed=11)
    flush(vl_server)
    out = post(vl_server, "/generate", {"input_ids": ids, "return_logprob": True,
                                        "sampling_params": {"max_new_tokens": 24, "temperature": 0,
                                                            "ignore_eos": True}})
    decoded = out["meta_info"]["output_token_logprobs"]
    flush(vl_server)
    scored = input_logprobs(vl_server, ids + [t for _, t, _ in decoded])[len(ids) - 1:]
    diff = max_diff([lp for lp, _, _ in decoded], scored)
    print(f"24 decode steps after 700 prompt tokens vs one prefill: max |Δ logprob| = {diff:.2e}")
    assert diff < 1e-4


def test_generate_with_logprobs(vl_server):
    out = post(vl_server, "/generate", {"text": "Hello, MiniMax!", "return_logprob": True, "top_logprobs_num": 3,
                                        "sampling_params": {"max_new_tokens": 12, "temperature": 0}})
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 12 or meta["finish_reason"]["type"] == "stop"
    lps = meta["output_token_logprobs"]
    assert len(lps) == meta["completion_tokens"]
    for (lp, tok, _), top in zip(lps, meta["output_top_logprobs"]):
        assert lp <= 0 and math.isfinite(lp)
        assert tok == top[0][1] and abs(lp - top[0][0]) < 1e-6  # greedy: the chosen token is the top-1


# ---- OpenAI API with M3's parsers ----------------------------------------------------------------------
def test_openai_chat_streaming_with_parsers(vl_server):
    body = {"model": "default", "stream": True, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
            "chat_template_kwargs": {"thinking_mode": "disabled"}}
    req = urllib.request.Request(vl_server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks, "no streamed chunks"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    streamed = "".join((c["choices"][0]["delta"].get("content") or "") + (c["choices"][0]["delta"].get("reasoning_content") or "")
                       for c in chunks if c["choices"])
    full = post(vl_server, "/v1/chat/completions", {**body, "stream": False})
    message = full["choices"][0]["message"]
    assert streamed == (message.get("content") or "") + (message.get("reasoning_content") or "")


def test_chat_template_thinking_mode_reaches_the_prompt(vl_server):
    """`thinking_mode=enabled` ends the prompt with <mm:think>, so every output token is reasoning."""
    body = {"model": "default", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "2+2?"}], "chat_template_kwargs": {"thinking_mode": "enabled"}}
    msg = post(vl_server, "/v1/chat/completions", body)["choices"][0]["message"]
    assert msg.get("reasoning_content"), msg


# ---- frontend language ---------------------------------------------------------------------------------
def test_frontend_language_program(one_kv_server):
    # On the parser-free server: SGLang 0.5.17 cannot combine --reasoning-parser with llguidance's regex
    # grammars (ReasonerGrammarBackend calls GuidanceBackend.allocate_vocab_mask, which does not exist).
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(one_kv_server.url)

    @sgl.function
    def program(s):
        s += "Q: pick a color. A:"
        s += sgl.select("color", choices=["red", "green", "blue"])
        s += " Number:" + sgl.gen("number", regex=r"[0-9]{2}", max_tokens=4)
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sgl.gen("text", max_tokens=6, temperature=0)
        s += "Done:" + sgl.gen("tail", max_tokens=4, temperature=0)
        s["branches"] = [f["text"] for f in forks]

    state = program.run(backend=backend)
    assert state["color"] in ("red", "green", "blue")
    assert len(state["number"]) == 2 and state["number"].isdigit()
    assert len(state["branches"]) == 2
    assert state.text().startswith("Q: pick a color. A:")


# ---- radix cache across turns ---------------------------------------------------------------------------
def test_three_turn_chat_hits_radix_cache_and_matches_flushed(vl_server, vl_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vl_ckpt)
    user_turns = ["Tell me a long story about a lighthouse keeper. " * 6, "Continue, with more detail. " * 5,
                  "Now summarise it in one line. " * 4]

    def generate(ids):
        out = post(vl_server, "/generate", {"input_ids": ids, "return_logprob": True,
                                            "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
        lps = out["meta_info"]["output_token_logprobs"]
        return out, out["meta_info"]["cached_tokens"], [t for _, t, _ in lps], [lp for lp, _, _ in lps]

    flush(vl_server)
    messages, turns = [], []
    for text in user_turns:
        messages.append({"role": "user", "content": text})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking_mode="disabled")
        ids = tok.encode(text, add_special_tokens=False)
        out, hit, tokens, logprobs = generate(ids)
        turns.append((ids, hit, tokens, logprobs))
        messages.append({"role": "assistant", "content": out["text"]})

    assert len(turns[0][0]) > 256, "turn 1 must already be in the sparse regime"
    for n, (_, hit, _, _) in enumerate(turns[1:], start=2):
        assert hit > 0, f"turn {n} did not hit the radix cache"
    assert any(hit % 128 for _, hit, _, _ in turns[1:]), "expected a turn boundary in the middle of a block"

    for n, (ids, hit, tokens, logprobs) in enumerate(turns, start=1):
        flush(vl_server)
        _, fresh_hit, fresh_tokens, fresh_logprobs = generate(ids)
        assert fresh_hit == 0
        assert tokens == fresh_tokens, f"turn {n}: greedy tokens differ with and without the radix cache"
        diff = max_diff(logprobs, fresh_logprobs)
        print(f"turn {n}: prompt {len(ids)} tokens, cached {hit}, max |Δ logprob| vs flushed = {diff:.2e}")
        assert diff < 1e-4
