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
def stream_chat(server, body: dict) -> list[dict]:
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def joined(chunks: list[dict], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


@pytest.mark.parametrize("mode", ["disabled", "enabled"])
def test_openai_chat_streamed_equals_non_streamed(vl_server, mode):
    """Greedy, 16 tokens forced (ignore_eos): the streamed content and reasoning are exactly the non-streamed
    ones, and not empty (disabled: the text is content; enabled: the prompt opens <mm:think>, so it is reasoning)."""
    body = {"model": "default", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            "chat_template_kwargs": {"thinking_mode": mode}}
    chunks = stream_chat(vl_server, body)
    assert chunks, "no streamed chunks"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    full = post(vl_server, "/v1/chat/completions", body)
    message = full["choices"][0]["message"]
    assert full["usage"]["completion_tokens"] == 16
    content, reasoning = joined(chunks, "content"), joined(chunks, "reasoning_content")
    assert content == (message.get("content") or "")
    assert reasoning == (message.get("reasoning_content") or "")
    main = content if mode == "disabled" else reasoning
    assert main.strip(), f"thinking_mode={mode}: nothing in the expected field (content {content!r}, " \
                         f"reasoning {reasoning!r})"


def test_openai_chat_streaming_with_tools(vl_server):
    """A chat with tools through the tool-call parser: streamed and non-streamed agree and the stream ends properly.
    The random tiny model never emits a call, so this checks the wiring, not call parsing; that the template's call
    format parses with SGLang's minimax-m3 detector is test_tiny.py's round-trip test."""
    body = {"model": "default", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
            "chat_template_kwargs": {"thinking_mode": "disabled"}}
    chunks = stream_chat(vl_server, body)
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("length", "tool_calls")
    message = post(vl_server, "/v1/chat/completions", body)["choices"][0]["message"]
    streamed = joined(chunks, "content") + joined(chunks, "reasoning_content")
    calls = [c for ch in chunks if ch["choices"] for c in ch["choices"][0]["delta"].get("tool_calls") or []]
    assert streamed or calls, "16 forced tokens produced neither text nor a tool call"
    assert streamed == (message.get("content") or "") + (message.get("reasoning_content") or "")
    assert bool(calls) == bool(message.get("tool_calls"))


def test_grammar_requests_get_a_clear_refusal_under_the_reasoning_parser(vl_server):
    """SGLang 0.5.17's llguidance backend cannot constrain decoding under --reasoning-parser (vl_server has both;
    conftest's CPU flags pick llguidance): a regex on /generate, and a chat whose tool_choice names a function (which
    SGLang turns into a grammar), get a 400 that says so, and the server serves the next request. (Before, SGLang's
    own 400 named only a missing `allocate_vocab_mask` attribute.)"""
    def status_and_message(path, body):
        try:
            post(vl_server, path, body)
        except AssertionError as e:
            return str(e)
        return "HTTP 200"

    msg = status_and_message("/generate", {"text": "Q:", "sampling_params": {"max_new_tokens": 4, "regex": "[0-9]+"}})
    assert "HTTP 400" in msg and "--reasoning-parser" in msg and "llguidance" in msg, msg
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    msg = status_and_message("/v1/chat/completions", {
        "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "Weather?"}], "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert "HTTP 400" in msg and "--reasoning-parser" in msg, msg
    out = post(vl_server, "/generate", {"text": "Q:", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert out["meta_info"]["completion_tokens"] == 3


def render_template(ckpt, messages, **kwargs) -> str:
    """The checkpoint's chat template rendered here with plain jinja2 (as transformers does: trim_blocks,
    lstrip_blocks, raise_exception), independent of the server's rendering."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string((ckpt / "chat_template.jinja").read_text()).render(
        messages=messages, add_generation_prompt=True, tools=None, **kwargs)


def test_chat_template_thinking_mode_reaches_the_prompt(vl_server, vl_ckpt):
    """The server's prompt token ids are exactly the template rendered here with the request's thinking_mode,
    and the three modes render differently (so a server ignoring the kwarg fails)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vl_ckpt)
    messages = [{"role": "user", "content": "2+2?"}]
    rendered = {}
    for mode in ("enabled", "disabled", "adaptive", None):
        body = {"model": "default", "max_tokens": 1, "temperature": 0, "messages": messages,
                "return_prompt_token_ids": True}
        if mode is not None:
            body["chat_template_kwargs"] = {"thinking_mode": mode}
        served = post(vl_server, "/v1/chat/completions", body)["choices"][0]["prompt_token_ids"]
        text = render_template(vl_ckpt, messages, **({} if mode is None else {"thinking_mode": mode}))
        assert f"Current thinking mode: {mode or 'adaptive'}" in text
        assert served == tok.encode(text, add_special_tokens=False), f"thinking_mode={mode}"
        rendered[mode] = text
    # The template's generation prompt: <mm:think> (enabled), </mm:think> (disabled), nothing (adaptive).
    assert rendered["enabled"].endswith("]~b]ai\n<mm:think>")
    assert rendered["disabled"].endswith("]~b]ai\n</mm:think>")
    assert rendered["adaptive"].endswith("]~b]ai\n") and rendered[None] == rendered["adaptive"]
    assert len(set(rendered.values())) == 3


# ---- frontend language ---------------------------------------------------------------------------------
def test_frontend_language_program(one_kv_server):
    """A program with select, a regex-constrained gen, a fork and plain gens (all greedy) gives exactly what the
    same requests give when sent by hand to /generate."""
    # On the parser-free server: SGLang 0.5.17 cannot combine --reasoning-parser with llguidance's regex
    # grammars (ReasonerGrammarBackend calls GuidanceBackend.allocate_vocab_mask, which does not exist).
    import sglang as sgl

    import sglang_m3.frontend  # noqa: F401  (M3's roles for sgl.system / user / assistant: test_frontend_template.py)

    backend = sgl.RuntimeEndpoint(one_kv_server.url)
    assert backend.chat_template.name.startswith("minimax-m3:")  # the served checkpoint's template, found by path
    choices = ["red", "green", "blue"]

    @sgl.function
    def program(s):
        s += "Q: pick a color. A:"
        s += sgl.select("color", choices=choices, temperature=0)
        s += " Number:" + sgl.gen("number", regex=r"[0-9]{2}", max_tokens=4, temperature=0)
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sgl.gen("text", max_tokens=6, temperature=0)
        s += "Done:" + sgl.gen("tail", max_tokens=4, temperature=0)
        s["branches"] = [f["text"] for f in forks]

    state = program.run(backend=backend)

    def gen(text, max_new_tokens, **params):
        return post(one_kv_server, "/generate", {"text": text, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0, **params}})["text"]

    def mean_logprob(prefix, choice):
        # select's default (token_length_normalized): mean logprob of the choice's tokens and of the prefix's
        # last two tokens (its token-healing window), the same for every choice.
        n = post(one_kv_server, "/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}})
        out = post(one_kv_server, "/generate", {
            "text": prefix + choice, "return_logprob": True,
            "logprob_start_len": max(n["meta_info"]["prompt_tokens"] - 2, 0),
            "sampling_params": {"max_new_tokens": 0, "temperature": 0}})
        lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"] if lp]
        return sum(lps) / len(lps)

    q = "Q: pick a color. A:"
    scores = [mean_logprob(q, c) for c in choices]
    assert state["color"] == choices[max(range(3), key=scores.__getitem__)]
    assert state.get_meta_info("color")["normalized_prompt_logprobs"] == pytest.approx(scores, abs=1e-5)
    prefix = q + state["color"] + " Number:"
    number = gen(prefix, 4, regex=r"[0-9]{2}")
    assert len(number) == 2 and number.isdigit()
    assert state["number"] == number
    prefix += number
    assert state["branches"] == [gen(prefix + f" Branch {i}:", 6) for i in range(2)]
    assert state["tail"] == gen(prefix + "Done:", 4)
    assert state.text() == prefix + "Done:" + state["tail"]


def test_engine_after_enable(one_kv_ckpt, tmp_path):
    """`sgl.Engine` in a fresh process after `sglang_m3.enable()`: the ServerArgs built in that process go through
    the plugin's per-architecture checks (HiCache is refused with sglang-m3's message; without enable() the flat
    checkpoint's config is not even readable there), it serves with this package's MSA backend, and its prompt
    logprobs in the sparse regime equal HF's (1 KV head: HF is exact)."""
    import subprocess
    import sys

    from tests.conftest import cpu_env

    ids = prompt_ids(300, seed=5)
    script = tmp_path / "engine.py"
    script.write_text(f"""
import json, sys
import sglang_m3
sglang_m3.enable()
import sglang as sgl
if __name__ == "__main__":
    args = dict(model_path={str(one_kv_ckpt)!r}, device="cpu", dtype="float32", max_total_tokens=4096,
                sleep_on_idle=True, log_level="info")
    try:
        sgl.Engine(**args, enable_hierarchical_cache=True)
        print("HICACHE accepted")
    except ValueError as e:
        print("HICACHE refused: " + str(e).splitlines()[0])
    llm = sgl.Engine(**args)
    out = llm.generate(input_ids={ids!r}, sampling_params={{"max_new_tokens": 1, "temperature": 0}},
                       return_logprob=True, logprob_start_len=0)
    llm.shutdown()
    print("RESULT " + json.dumps(out["meta_info"]["input_token_logprobs"]))
""")
    p = subprocess.run([sys.executable, str(script)], env=cpu_env(), capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "sglang-m3 MSA backend" in log, log[-4000:]
    assert "HICACHE refused: sglang-m3: --enable-hierarchical-cache" in p.stdout, log[-4000:]
    result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    diff = max_diff([lp for lp, _, _ in result[1:]], hf_input_logprobs(one_kv_ckpt, ids))
    print(f"sgl.Engine after enable(), 300 tokens, 1 KV head: max |Δ logprob| vs HF = {diff:.2e}")
    assert diff < LOGPROB_TOL


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
