"""A bounded API fuzz campaign against an SGLang server: malformed and edge-case requests through `/generate`,
`/v1/completions` and `/v1/chat/completions`, sent while a well-formed greedy stream runs.

Pass criteria (issue 8):
  - every reply is a 2xx with a valid body, or a 4xx with a message (a `/generate` stream may also refuse with
    SGLang's in-stream error event carrying code 4xx: its HTTP status is sent before the request is checked);
    a case that must be refused (out-of-vocabulary id, empty prompt, ...) gets a 4xx, one that must be served a 2xx;
  - the well-formed greedy stream's tokens equal those of the same request served alone, before the campaign;
  - after the campaign the same request, alone again, gives the same tokens and logprobs (the server answers the
    next request exactly as before), `/health_generate` answers, the server process is alive;
  - SGLang's idle pool-leak check ("... memory leak detected!", scheduler_components/invariant_checker.py) is silent
    in the server log (checked when the log is readable: a server this script starts, or --server-log).

    python scripts/fuzz_api.py --url http://127.0.0.1:30000 [--server-log LOG] [--out results.json]
    python scripts/fuzz_api.py --model-path CKPT [--cpu] [--flags "--tp 8 ..."] [--out results.json]
    python scripts/fuzz_api.py --tiny [--cpu] ...        # writes the tiny fp32 checkpoint itself and serves it

`--subset ci` runs a smaller campaign (the CPU test, tests/test_fuzz.py). Exit status 0 iff everything passed.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

LEAK_MARK = "memory leak detected"  # SGLang's InvariantChecker._report_leak (pool and req_to_token pool)
# The well-formed stream after the campaign vs before it: same tokens, and log-probabilities within this bound. Not 0:
# both are cold prefills (extra_key) of the same ids, yet a CI run saw 6e-8 in fp32 -- CPU GEMMs may block their
# sums differently for differently placed buffers (other KV slots, other allocations after the campaign); that is
# different arithmetic, not a corrupted request, which would move them by orders of magnitude more.
STREAM_LOGPROB_TOL = 1e-4
ENDPOINTS = ("/generate", "/v1/completions", "/v1/chat/completions")


@dataclass
class Case:
    """One request. `expect`: "reject" (must be a 4xx), "accept" (must be a 2xx) or "either"."""

    name: str
    kind: str
    endpoint: str
    body: object  # JSON-able, or bytes sent as-is
    expect: str = "either"
    ci: bool = False  # part of the small CPU campaign
    result: dict = field(default_factory=dict)


def ids(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(32, 127) for _ in range(n)]


def build_cases(info: dict) -> list[Case]:
    """The campaign. `info`: vocab_size, hidden_size, context_len of the served model."""
    V, H, C = info["vocab_size"], info["hidden_size"], info["context_len"]
    p = ids(20, 1)
    short = {"max_new_tokens": 4, "temperature": 0}
    cases: list[Case] = []

    def gen(name, kind, body, expect="either", ci=False):
        cases.append(Case(name, kind, "/generate", body, expect, ci))

    def cmpl(name, kind, body, expect="either", ci=False):
        cases.append(Case(name, kind, "/v1/completions", {"model": "default", **body}, expect, ci))

    def chat(name, kind, body, expect="either", ci=False):
        msgs = body.pop("messages", [{"role": "user", "content": "Hello there"}])
        cases.append(Case(name, kind, "/v1/chat/completions",
                          {"model": "default", "messages": msgs, "max_tokens": 4, "temperature": 0, **body},
                          expect, ci))

    # -- token ids outside [0, vocab_size) ------------------------------------------------------------------
    for bad, ci in ((V, True), (V + 1, False), (999999, True), (-1, True), (2**31, False), (2**63 - 1, False)):
        gen(f"input_ids with {bad}", "token_ids", {"input_ids": p[:5] + [bad] + p[5:], "sampling_params": short},
            "reject", ci)
    gen("batch, one id = vocab_size in item 2", "token_ids",
        {"input_ids": [p, p[:3] + [V], p[:7]], "sampling_params": short}, "reject", True)
    gen("input_ids with vocab_size, streamed", "token_ids",
        {"input_ids": [5, V], "sampling_params": short, "stream": True}, "reject", True)
    gen("input_ids with 2**64 (not an int64)", "token_ids", {"input_ids": [5, 2**64]}, "reject")
    gen("input_ids with vocab_size - 1 (last id)", "token_ids", {"input_ids": p + [V - 1], "sampling_params": short},
        "accept", True)
    gen("input_ids with 0", "token_ids", {"input_ids": [0] + p, "sampling_params": short}, "accept")
    cmpl("prompt ids with vocab_size", "token_ids", {"prompt": p + [V], "max_tokens": 4}, "reject", True)
    cmpl("prompt ids batch with -5", "token_ids", {"prompt": [p, [-5, 6]], "max_tokens": 4}, "reject")
    cmpl("prompt ids with vocab_size, streamed", "token_ids", {"prompt": [7, V], "max_tokens": 4, "stream": True},
         "reject", True)
    gen("token_ids_logprob with vocab_size", "token_ids",
        {"input_ids": p, "return_logprob": True, "token_ids_logprob": [1, V], "sampling_params": short}, "reject")
    gen("logit_bias key vocab_size", "token_ids",
        {"input_ids": p, "sampling_params": {**short, "logit_bias": {str(V): 1.0}}}, "reject")
    gen("stop_token_ids with vocab_size", "token_ids",
        {"input_ids": p, "sampling_params": {**short, "stop_token_ids": [V]}}, "reject")

    # -- empty prompts --------------------------------------------------------------------------------------
    gen("input_ids []", "empty", {"input_ids": []}, "reject", True)
    gen("batch with an empty prompt in the middle", "empty",
        {"input_ids": [p, [], [5]], "sampling_params": short}, "reject", True)
    gen("batch [[]]", "empty", {"input_ids": [[]]}, "reject")
    gen("text ''", "empty", {"text": "", "sampling_params": short}, "reject", True)
    gen("text batch with ''", "empty", {"text": ["hi", ""], "sampling_params": short}, "reject", True)
    gen("batch with an empty prompt, n=2", "empty",
        {"input_ids": [p, []], "sampling_params": {**short, "n": 2}}, "reject")
    cmpl("prompt ''", "empty", {"prompt": "", "max_tokens": 4}, "reject", True)
    cmpl("prompt []", "empty", {"prompt": [], "max_tokens": 4}, "reject")
    cmpl("prompt batch ['a', '']", "empty", {"prompt": ["a", ""], "max_tokens": 4}, "reject")
    cmpl("prompt batch [[5], []]", "empty", {"prompt": [[5], []], "max_tokens": 4}, "reject", True)
    chat("messages []", "empty", {"messages": []}, "reject", True)

    # -- wrong types ------------------------------------------------------------------------------------------
    gen("input_ids a string", "types", {"input_ids": "1 2 3"}, "reject", True)
    gen("input_ids floats", "types", {"input_ids": [1.5, 2.0]}, "reject")
    gen("input_ids mixed nesting", "types", {"input_ids": [[1, 2], 3]}, "reject", True)
    gen("input_ids booleans", "types", {"input_ids": [True, False]}, "either")
    gen("input_ids nested too deep", "types", {"input_ids": [[[1, 2]]]}, "reject")
    gen("text a number", "types", {"text": 5}, "reject", True)
    gen("text list of numbers", "types", {"text": [1, 2]}, "reject")
    gen("text and input_ids", "types", {"text": "hi", "input_ids": p}, "either")
    gen("no prompt at all", "types", {"sampling_params": short}, "reject", True)
    gen("sampling_params a string", "types", {"input_ids": p, "sampling_params": "greedy"}, "reject", True)
    gen("sampling_params a list for one prompt", "types", {"input_ids": p, "sampling_params": [short]}, "reject")
    gen("sampling_params list shorter than batch", "types",
        {"input_ids": [p, p[:5]], "sampling_params": [short]}, "reject", True)
    gen("sampling_params unknown key", "types", {"input_ids": p, "sampling_params": {**short, "tempreature": 0}},
        "reject", True)
    gen("max_new_tokens a string", "types", {"input_ids": p, "sampling_params": {"max_new_tokens": "ten"}},
        "reject", True)
    gen("max_new_tokens a float", "types", {"input_ids": p, "sampling_params": {"max_new_tokens": 2.5}}, "reject")
    gen("temperature a string", "types", {"input_ids": p, "sampling_params": {"temperature": "hot"}}, "reject", True)
    gen("top_k a float", "types", {"input_ids": p, "sampling_params": {"top_k": 1.5, "max_new_tokens": 2}},
        "reject")
    gen("stop a number", "types", {"input_ids": p, "sampling_params": {**short, "stop": 5}}, "reject", True)
    gen("stop list with a number", "types", {"input_ids": p, "sampling_params": {**short, "stop": ["a", 5]}},
        "reject")
    gen("stop_token_ids strings", "types", {"input_ids": p, "sampling_params": {**short, "stop_token_ids": ["a"]}},
        "reject", True)
    gen("ignore_eos a string", "types", {"input_ids": p, "sampling_params": {**short, "ignore_eos": "yes"}},
        "reject")
    gen("n a string", "types", {"input_ids": p, "sampling_params": {**short, "n": "2"}}, "reject", True)
    gen("logit_bias a list", "types", {"input_ids": p, "sampling_params": {**short, "logit_bias": [1, 2]}},
        "reject")
    gen("logit_bias key not a number", "types",
        {"input_ids": p, "sampling_params": {**short, "logit_bias": {"abc": 1}}}, "reject")
    # Typed top-level fields go through SGLang's pydantic schema, which coerces "yes"/"0" in lax mode.
    gen("return_logprob a string", "types", {"input_ids": p, "return_logprob": "yes", "sampling_params": short},
        "either")
    gen("logprob_start_len a string", "types",
        {"input_ids": p, "return_logprob": True, "logprob_start_len": "0", "sampling_params": short}, "either")
    gen("rid a number", "types", {"input_ids": p, "rid": 5, "sampling_params": short}, "reject")
    gen("duplicate rids in a batch", "types", {"input_ids": [p, p], "rid": ["x", "x"], "sampling_params": short},
        "reject")
    gen("custom_params not a dict", "types",
        {"input_ids": p, "sampling_params": {**short, "custom_params": [1]}}, "reject")
    gen("body a JSON list", "types", [1, 2, 3], "reject", True)
    gen("body not JSON", "types", b"{\"input_ids\": [1, 2", "reject", True)
    for raw, kind in (([1, 2, 3], "array"), ("hello", "string"), (None, "null")):  # SGLang's chat validators: 500
        cases.append(Case(f"chat body a JSON {kind}", "types", "/v1/chat/completions", raw, "reject", kind == "null"))
    # nested 100,000 deep: json.loads' RecursionError in the plugin's body check was a 500 (session 19)
    cases.append(Case("chat body an array nested 100000 deep", "types", "/v1/chat/completions",
                      b"[" * 100_000 + b"]" * 100_000, "reject", True))
    gen("rid a list for a single prompt", "types", {"input_ids": p, "rid": ["a", "b"], "sampling_params": short},
        "reject", True)
    cmpl("max_tokens a string", "types", {"prompt": "hi", "max_tokens": "four"}, "reject", True)
    cmpl("prompt a dict", "types", {"prompt": {"text": "hi"}, "max_tokens": 4}, "reject")
    cmpl("temperature a string", "types", {"prompt": "hi", "max_tokens": 4, "temperature": "x"}, "reject")
    cmpl("stop a number", "types", {"prompt": "hi", "max_tokens": 4, "stop": 7}, "reject")
    chat("messages a string", "types", {"messages": "hello"}, "reject", True)
    chat("message without content", "types", {"messages": [{"role": "user"}]}, "either")
    chat("unknown role", "types", {"messages": [{"role": "alien", "content": "hi"}]}, "reject", True)
    chat("content a number", "types", {"messages": [{"role": "user", "content": 5}]}, "reject")
    chat("content part of unknown type", "types",
         {"messages": [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}]}, "reject")
    chat("tools malformed", "types", {"tools": [{"type": "function"}]}, "reject")
    chat("tool_choice names a missing tool", "types",
         {"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "reject")

    # -- sampling ranges --------------------------------------------------------------------------------------
    for name, sp, expect, ci in (
        ("max_new_tokens -1", {"max_new_tokens": -1}, "reject", True),
        ("max_new_tokens 0", {"max_new_tokens": 0}, "accept", True),
        ("max_new_tokens 10**12", {"max_new_tokens": 10**12}, "reject", True),
        ("max_new_tokens 10**30", {"max_new_tokens": 10**30}, "reject", False),
        ("max_new_tokens = context", {"max_new_tokens": C}, "reject", False),
        ("min_new_tokens > max_new_tokens", {"max_new_tokens": 2, "min_new_tokens": 5}, "reject", False),
        ("temperature -1", {"temperature": -1.0, "max_new_tokens": 2}, "reject", True),
        ("top_p 0", {"top_p": 0.0, "max_new_tokens": 2}, "reject", False),
        ("top_p 1.5", {"top_p": 1.5, "max_new_tokens": 2}, "reject", False),
        ("top_k 0", {"top_k": 0, "max_new_tokens": 2}, "reject", True),
        ("top_k -1 (disabled)", {"top_k": -1, "max_new_tokens": 2, "temperature": 0}, "accept", False),
        ("top_k past the vocabulary", {"top_k": V * 4, "max_new_tokens": 2}, "accept", False),
        # sampler tensors are int32 / float32: these once ended the server inside the scheduler
        ("top_k 2**31", {"top_k": 2**31, "max_new_tokens": 2}, "reject", True),
        ("logit_bias 1e39", {"logit_bias": {"5": 1e39}, "max_new_tokens": 2}, "reject", True),
        ("logit_bias -1e308", {"logit_bias": {"5": -1e308}, "max_new_tokens": 2}, "reject", False),
        ("min_p 2", {"min_p": 2.0, "max_new_tokens": 2}, "reject", False),
        ("repetition_penalty 0", {"repetition_penalty": 0.0, "max_new_tokens": 2}, "reject", False),
        ("frequency_penalty 9", {"frequency_penalty": 9.0, "max_new_tokens": 2}, "reject", False),
        ("n 0", {"n": 0, "max_new_tokens": 2}, "reject", True),
        ("n -3", {"n": -3, "max_new_tokens": 2}, "reject", False),
        ("n 3, temperature 1", {"n": 3, "max_new_tokens": 2, "temperature": 1.0}, "accept", True),
        # n copies of the request are queued: 10**6 of them crowded out every other request for minutes
        ("n 10**6", {"n": 10**6, "max_new_tokens": 2}, "reject", True),
        ("stream_interval 0", {"stream_interval": 0, "max_new_tokens": 2}, "reject", False),
        ("stop ''", {"stop": "", "max_new_tokens": 2}, "either", False),
        ("stop_regex invalid", {"stop_regex": "(", "max_new_tokens": 2}, "reject", True),
        # the scheduler re-searches the output with it after every token: exponential backtracking froze it
        ("stop_regex (a|a)*c", {"stop_regex": "(a|a)*c", "max_new_tokens": 2}, "reject", True),
        ("stop_regex a+ (unbounded tail)", {"stop_regex": "a+", "max_new_tokens": 2}, "reject", False),
        ("stop_regex (?:.|.) x 30", {"stop_regex": "(?:.|.)" * 30 + "c", "max_new_tokens": 2}, "reject", False),
        ("stop_regex a{2**32}", {"stop_regex": "a{4294967296}", "max_new_tokens": 2}, "reject", False),
        ("sampling_seed negative", {"sampling_seed": -1, "max_new_tokens": 2, "temperature": 1.0}, "either", False),
        ("all defaults", {}, "accept", False),
    ):
        gen(name, "sampling", {"input_ids": p, "sampling_params": sp}, expect, ci)
    cmpl("max_tokens -1", "sampling", {"prompt": "hi", "max_tokens": -1}, "reject", True)
    chat("logit_bias 1e39", "sampling", {"logit_bias": {"5": 1e39}}, "reject", True)
    chat("top_k 2**31", "sampling", {"top_k": 2**31}, "reject", False)
    cmpl("max_tokens 10**12", "sampling", {"prompt": "hi", "max_tokens": 10**12}, "reject")
    cmpl("n 0", "sampling", {"prompt": "hi", "max_tokens": 2, "n": 0}, "reject")
    # a batch of prompts is copied n times too: 100 × 100 sequences held the next chat for 95 s
    cmpl("100 prompts × n 100", "sampling", {"prompt": ["hi"] * 100, "max_tokens": 1, "n": 100,
                                              "temperature": 1.0}, "reject", True)
    chat("n 10**6", "sampling", {"n": 10**6}, "reject", True)
    cmpl("n 2 greedy", "sampling", {"prompt": "hi", "max_tokens": 2, "n": 2, "temperature": 0}, "either")
    cmpl("temperature -1", "sampling", {"prompt": "hi", "max_tokens": 2, "temperature": -1}, "reject")
    chat("max_tokens -1", "sampling", {"max_tokens": -1}, "reject", True)
    chat("max_completion_tokens 10**12", "sampling", {"max_completion_tokens": 10**12}, "reject")
    chat("n 0", "sampling", {"n": 0}, "reject")
    chat("top_p 5", "sampling", {"top_p": 5}, "reject")

    # -- logprobs -------------------------------------------------------------------------------------------
    lp = {"input_ids": p, "return_logprob": True, "sampling_params": short}
    gen("logprob_start_len past the prompt", "logprobs", {**lp, "logprob_start_len": len(p) + 5}, "reject", True)
    gen("logprob_start_len = prompt length", "logprobs", {**lp, "logprob_start_len": len(p)}, "accept")
    gen("logprob_start_len -5", "logprobs", {**lp, "logprob_start_len": -5}, "reject", True)
    gen("logprob_start_len 0", "logprobs", {**lp, "logprob_start_len": 0}, "accept", True)
    gen("top_logprobs_num past the vocabulary", "logprobs", {**lp, "top_logprobs_num": V + 1}, "reject", True)
    gen("top_logprobs_num = vocabulary", "logprobs", {**lp, "top_logprobs_num": V}, "accept")
    gen("top_logprobs_num 10**9", "logprobs", {**lp, "top_logprobs_num": 10**9}, "reject")
    gen("top_logprobs_num -1", "logprobs", {**lp, "top_logprobs_num": -1}, "reject", True)
    gen("top_logprobs_num 5 with prompt logprobs", "logprobs",
        {**lp, "top_logprobs_num": 5, "logprob_start_len": 0}, "accept")
    gen("batch: logprob_start_len list past one prompt", "logprobs",
        {"input_ids": [p, p[:3]], "return_logprob": True, "logprob_start_len": [0, 10], "sampling_params": short},
        "reject")
    gen("batch: top_logprobs_num list wrong length", "logprobs",
        {"input_ids": [p, p[:3]], "return_logprob": True, "top_logprobs_num": [1], "sampling_params": short},
        "reject")
    cmpl("logprobs past the vocabulary", "logprobs", {"prompt": "hi", "max_tokens": 2, "logprobs": V + 1},
         "reject", True)
    cmpl("logprobs -1", "logprobs", {"prompt": "hi", "max_tokens": 2, "logprobs": -1}, "reject")
    cmpl("echo with logprobs", "logprobs", {"prompt": "hi there", "max_tokens": 2, "logprobs": 2, "echo": True},
         "accept", True)
    chat("top_logprobs past the vocabulary", "logprobs", {"logprobs": True, "top_logprobs": V + 1}, "reject", True)
    chat("top_logprobs -1", "logprobs", {"logprobs": True, "top_logprobs": -1}, "reject")
    chat("top_logprobs 3", "logprobs", {"logprobs": True, "top_logprobs": 3}, "accept")

    # -- input_embeds ---------------------------------------------------------------------------------------
    gen("input_embeds of width 3", "embeds", {"input_embeds": [[0.1] * 3] * 4, "sampling_params": short},
        "reject", True)
    gen("input_embeds ragged rows", "embeds",
        {"input_embeds": [[0.1] * H, [0.1] * (H - 1)], "sampling_params": short}, "reject")
    gen("input_embeds []", "embeds", {"input_embeds": [], "sampling_params": short}, "reject", True)
    gen("input_embeds of the model width", "embeds", {"input_embeds": [[0.01] * H] * 3, "sampling_params": short},
        "reject")  # M3: refused (SGLang cannot batch it with token-id requests)
    gen("input_embeds with NaN", "embeds", {"input_embeds": [[math.nan] * H] * 2, "sampling_params": short},
        "reject")

    # -- grammars -------------------------------------------------------------------------------------------
    for name, sp, expect, ci in (
        ("regex invalid", {"regex": "(ab"}, "reject", True),
        ("regex valid", {"regex": "[ab]{3}"}, "accept", True),
        ("json_schema not JSON", {"json_schema": "{not json"}, "reject", True),
        ("json_schema invalid type", {"json_schema": json.dumps({"type": "nonsense"})}, "reject", False),
        ("json_schema valid", {"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                          "required": ["a"]})}, "accept", False),
        ("ebnf invalid", {"ebnf": "root ::= (("}, "reject", False),
        ("regex and json_schema together", {"regex": "a", "json_schema": "{}"}, "reject", False),
        ("regex a number", {"regex": 5}, "reject", False),
    ):
        gen(name, "grammar", {"input_ids": p, "sampling_params": {"max_new_tokens": 6, "temperature": 0, **sp}},
            expect, ci)
    cmpl("regex invalid", "grammar", {"prompt": "hi", "max_tokens": 4, "regex": "[unclosed"}, "reject")
    cmpl("json_schema response_format malformed", "grammar",
         {"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                "schema": {"type": "bogus"}}}}, "reject")
    chat("response_format unknown type", "grammar", {"response_format": {"type": "yaml"}}, "reject", True)
    chat("response_format json_schema malformed", "grammar",
         {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "reject", True)
    chat("regex invalid", "grammar", {"regex": "("}, "reject")
    chat("ebnf invalid", "grammar", {"ebnf": "root ::= (("}, "reject")
    chat("ebnf empty rule", "grammar", {"ebnf": "root ::= "}, "either")

    # -- chat template kwargs ---------------------------------------------------------------------------------
    chat("chat_template_kwargs a string", "chat", {"chat_template_kwargs": "thinking"}, "reject", True)
    chat("chat_template_kwargs a list", "chat", {"chat_template_kwargs": ["thinking_mode"]}, "reject")
    chat("thinking_mode unknown value", "chat", {"chat_template_kwargs": {"thinking_mode": "sometimes"}},
         "reject", True)
    chat("thinking_mode a number", "chat", {"chat_template_kwargs": {"thinking_mode": 5}}, "reject")
    chat("thinking_mode disabled", "chat", {"chat_template_kwargs": {"thinking_mode": "disabled"}}, "accept", True)
    chat("unknown template kwarg", "chat", {"chat_template_kwargs": {"flavour": "x"}}, "either")
    chat("image part on a text-only model", "chat",
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
             "url": "data:image/png;base64,iVBORw0KGgo="}}, {"type": "text", "text": "what is this"}]}]}, "reject")
    chat("assistant prefill (continue_final_message)", "chat",
         {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
          "continue_final_message": True, "add_generation_prompt": False}, "either")
    chat("streamed, thinking_mode unknown", "chat",
         {"chat_template_kwargs": {"thinking_mode": "sometimes"}, "stream": True}, "reject", True)

    # -- context ----------------------------------------------------------------------------------------------
    gen("prompt longer than the context", "context", {"input_ids": ids(C + 10, 3), "sampling_params": short},
        "reject", True)
    cmpl("prompt longer than the context", "context", {"prompt": ids(C + 10, 4), "max_tokens": 2}, "reject")
    gen("prompt + max_new_tokens past the context", "context",
        {"input_ids": ids(C - 10, 5), "sampling_params": {"max_new_tokens": 50}}, "reject")

    # -- misc fields --------------------------------------------------------------------------------------------
    gen("return_hidden_states without the server flag", "misc",
        {"input_ids": p, "return_hidden_states": True, "sampling_params": short}, "reject")
    gen("custom_logit_processor without the server flag", "misc",
        {"input_ids": p, "custom_logit_processor": "garbage", "sampling_params": short}, "reject", True)
    gen("lora_path on a server without LoRA", "misc", {"input_ids": p, "lora_path": "x", "sampling_params": short},
        "reject")
    gen("routed_dp_rank 7", "misc", {"input_ids": p, "routed_dp_rank": 7, "sampling_params": short}, "reject")
    gen("image_data on a text-only model", "misc",
        {"text": "look", "image_data": "data:image/png;base64,iVBORw0KGgo=", "sampling_params": short}, "reject",
        True)
    gen("video_data on a text-only model", "misc", {"input_ids": p, "video_data": "x.mp4", "sampling_params": short},
        "reject")
    gen("session_params of an unknown session", "misc",
        {"input_ids": p, "session_params": {"id": "nope"}, "sampling_params": short}, "either")
    gen("priority a string", "misc", {"input_ids": p, "priority": "high", "sampling_params": short}, "reject")
    gen("return_routed_experts without the server flag", "misc",
        {"input_ids": p, "return_routed_experts": True, "sampling_params": short}, "either")
    gen("a well-formed batch of 3, greedy", "misc", {"input_ids": [p, p[:9], ids(33, 9)], "sampling_params": short},
        "accept", True)
    gen("a well-formed text request, streamed", "misc",
        {"text": "Once upon a time", "sampling_params": short, "stream": True}, "accept", True)
    cmpl("a well-formed completion", "misc", {"prompt": "Once upon", "max_tokens": 4, "temperature": 0}, "accept",
         True)
    chat("a well-formed chat, streamed", "misc", {"stream": True}, "accept", True)
    return cases


# ---------------------------------------------------------------------------------------------- sending, judging

def send(url: str, case: Case, timeout: float) -> dict:
    """POST the case; classify the reply. Returns {status, outcome, detail}; outcome is one of
    accepted (2xx, valid body), rejected (4xx with a message, or an in-stream 4xx error event), invalid (anything
    else: 5xx, 2xx with a malformed or error body, 4xx without a message, no reply)."""
    data = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    stream = isinstance(case.body, dict) and bool(case.body.get("stream"))
    t0 = time.time()
    try:
        r = requests.post(url + case.endpoint, data=data, headers={"Content-Type": "application/json"},
                          timeout=timeout, stream=stream)
        status = r.status_code
        raw = r.text  # reads a stream to its end
    except requests.RequestException as e:
        return {"status": None, "outcome": "invalid", "detail": f"no reply: {e!r}"[:500], "s": time.time() - t0}
    res = {"status": status, "s": round(time.time() - t0, 3)}
    if 400 <= status < 500:
        msg = _error_message(raw)
        res.update(outcome="rejected" if msg else "invalid", detail=(msg or f"4xx without a message: {raw[:300]}"))
    elif 200 <= status < 300:
        ok, detail, stream_error = _valid_body(case, raw, stream)
        if stream_error is not None:
            code, msg = stream_error
            good = isinstance(code, int) and 400 <= code < 500 and msg
            res.update(outcome="rejected" if good else "invalid", detail=f"in-stream error {code}: {msg}"[:500])
        else:
            res.update(outcome="accepted" if ok else "invalid", detail=detail[:500])
    else:
        res.update(outcome="invalid", detail=f"HTTP {status}: {raw[:400]}")
    return res


def _error_message(raw: str) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
        else:
            msg = err
        msg = msg or body.get("message") or body.get("detail")
        return msg if isinstance(msg, str) else json.dumps(msg) if msg else ""
    return ""


def _valid_body(case: Case, raw: str, stream: bool):
    """(ok, detail, stream_error): stream_error is (code, message) when a stream carried an error event."""
    if stream:
        events = [ln[len("data:"):].strip() for ln in raw.splitlines() if ln.startswith("data:")]
        if not events or events[-1] != "[DONE]":
            return False, f"stream not ended by [DONE]: {raw[-300:]}", None
        chunks = []
        for ev in events[:-1]:
            try:
                chunks.append(json.loads(ev))
            except ValueError:
                return False, f"stream event not JSON: {ev[:200]}", None
        for c in chunks:
            if isinstance(c, dict) and "error" in c:
                err = c["error"]
                return False, "", ((err.get("code") if isinstance(err, dict) else None),
                                   (err.get("message") if isinstance(err, dict) else str(err)))
        if not chunks:
            return False, "stream without chunks", None
        return _shape_ok(case.endpoint, chunks[-1], stream=True)
    try:
        body = json.loads(raw)
    except ValueError:
        return False, f"2xx body not JSON: {raw[:300]}", None
    return _shape_ok(case.endpoint, body, stream=False)


def _shape_ok(endpoint: str, body, stream: bool):
    if endpoint == "/generate":
        items = body if isinstance(body, list) else [body]
        for it in items:
            if not (isinstance(it, dict) and isinstance(it.get("text"), str) and isinstance(it.get("meta_info"), dict)):
                return False, f"/generate item without text/meta_info: {str(it)[:300]}", None
            fr = it["meta_info"].get("finish_reason")
            if isinstance(fr, dict) and fr.get("type") == "abort":
                return False, f"2xx with an aborted request: {fr}", None
        return True, f"{len(items)} item(s)", None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or (not stream and not choices):
        return False, f"OpenAI body without choices: {str(body)[:300]}", None
    return True, f"{len(choices)} choice(s)", None


# ---------------------------------------------------------------------------------------------- the campaign

class Stream:
    """The well-formed greedy request (/generate, streamed): prompt of `n` ids past the dense limit of M3's tiny
    checkpoints, `new` greedy tokens. `extra_key` keeps every run out of the others' radix-cache entries, so each
    run is a cold prefill followed by decode (same arithmetic alone and during the campaign)."""

    def __init__(self, url: str, n: int, new: int):
        self.url, self.n, self.new = url, n, new
        self.count = 0

    def run(self, tag: str) -> dict:
        self.count += 1
        body = {"input_ids": ids(self.n, 77), "stream": True, "return_logprob": True, "extra_key": f"fuzz-{tag}",
                "sampling_params": {"max_new_tokens": self.new, "temperature": 0, "ignore_eos": True}}
        r = requests.post(self.url + "/generate", json=body, stream=True, timeout=1200)
        r.raise_for_status()
        last = None
        for line in r.iter_lines():
            if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                last = json.loads(line[5:])
                if "error" in last:
                    raise RuntimeError(f"well-formed stream failed: {last}")
        meta = last["meta_info"]
        return {"tokens": [t for _, t, _ in meta["output_token_logprobs"]],
                "logprobs": [lp for lp, _, _ in meta["output_token_logprobs"]],
                "cached_tokens": meta.get("cached_tokens")}


def model_info(url: str, args) -> dict:
    """vocab_size, hidden_size (from the checkpoint's config.json) and the served context length."""
    info = {"vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "context_len": args.context_len}
    if not (info["vocab_size"] and info["hidden_size"]):
        path = Path(requests.get(url + "/model_info", timeout=30).json()["model_path"])
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        info["vocab_size"] = info["vocab_size"] or cfg["vocab_size"]
        info["hidden_size"] = info["hidden_size"] or cfg["hidden_size"]
    if not info["context_len"]:
        srv = requests.get(url + "/server_info", timeout=60).json()
        info["context_len"] = srv.get("context_length") or srv.get("max_req_input_len")
        if not srv.get("context_length"):  # max_req_input_len is a few tokens short of the context
            info["context_len"] += 8
    return info


def campaign(url: str, args, log_text=None) -> dict:
    info = model_info(url, args)
    cases = build_cases(info)
    if args.subset == "ci":
        cases = [c for c in cases if c.ci]
    if args.kinds:
        cases = [c for c in cases if c.kind in args.kinds.split(",")]
    stream = Stream(url, args.stream_prompt, args.stream_tokens)
    alone = stream.run("alone-before")

    # The well-formed stream runs (repeatedly) for as long as the campaign does.
    during: list = []
    done = threading.Event()
    failure: list = []

    def streamer():
        while not done.is_set():
            try:
                during.append(stream.run(f"during-{len(during)}"))
            except Exception as e:  # recorded: the verdict fails on it
                failure.append(repr(e))
                return

    th = threading.Thread(target=streamer, daemon=True)
    th.start()
    time.sleep(args.stream_head_start)
    t0 = time.time()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for case, res in zip(cases, pool.map(lambda c: send(url, c, args.timeout), cases)):
            case.result = res
    campaign_s = time.time() - t0
    done.set()
    th.join(timeout=1200)
    try:
        after = stream.run("alone-after")
    except Exception as e:  # the server died or refused the well-formed request: recorded, the verdict fails
        failure.append(f"after the campaign: {e!r}"[:1000])
        after = {"tokens": None, "logprobs": [], "cached_tokens": None}

    # Judge.
    rows, failures = [], []
    for c in cases:
        r = c.result
        ok = r["outcome"] != "invalid" and not (c.expect == "reject" and r["outcome"] != "rejected") and not (
            c.expect == "accept" and r["outcome"] != "accepted")
        rows.append({"name": c.name, "kind": c.kind, "endpoint": c.endpoint, "expect": c.expect, "ok": ok, **r})
        if not ok:
            failures.append(rows[-1])
    health = _alive(url)
    by_kind = collections.defaultdict(collections.Counter)
    for r in rows:
        by_kind[r["kind"]][r["outcome"]] += 1
    by_endpoint = collections.defaultdict(collections.Counter)
    for r in rows:
        by_endpoint[r["endpoint"]][r["outcome"]] += 1
    streams_equal = [d["tokens"] == alone["tokens"] for d in during]
    result = {
        "model": info, "cases": len(rows), "failed": len(failures), "campaign_s": round(campaign_s, 1),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "by_endpoint": {k: dict(v) for k, v in sorted(by_endpoint.items())},
        "stream": {"prompt": args.stream_prompt, "new_tokens": args.stream_tokens, "runs_during": len(during),
                   "runs_during_equal_alone": sum(streams_equal), "errors": failure,
                   "after_equal_before": after["tokens"] == alone["tokens"],
                   "after_logprob_max_abs_diff": max((abs(a - b) for a, b in zip(after["logprobs"],
                                                                                 alone["logprobs"])), default=0.0),
                   "cached_tokens": [alone["cached_tokens"], after["cached_tokens"]]},
        "alive": health,
        "failures": failures,
        "results": rows,
    }
    if log_text is not None:
        text = log_text()
        result["leak_lines"] = [ln for ln in text.splitlines() if LEAK_MARK in ln][:20]
    verdict = (not failures and not failure and during and all(streams_equal)
               and result["stream"]["after_equal_before"] and result["stream"]["after_logprob_max_abs_diff"] <= STREAM_LOGPROB_TOL
               and health and not result.get("leak_lines"))
    result["pass"] = bool(verdict)
    return result


def _alive(url: str) -> bool:
    try:
        return requests.get(url + "/health_generate", timeout=120).status_code == 200
    except requests.RequestException:
        return False


def summary(res: dict) -> str:
    lines = [f"fuzz campaign: {res['cases']} cases in {res['campaign_s']} s, {res['failed']} failed; "
             f"verdict {'PASS' if res['pass'] else 'FAIL'}",
             "  by kind (outcomes):"]
    for k, v in res["by_kind"].items():
        lines.append(f"    {k:10s} " + ", ".join(f"{o} {n}" for o, n in sorted(v.items())))
    lines.append("  by endpoint:")
    for k, v in res["by_endpoint"].items():
        lines.append(f"    {k:22s} " + ", ".join(f"{o} {n}" for o, n in sorted(v.items())))
    s = res["stream"]
    lines.append(f"  well-formed stream ({s['prompt']} + {s['new_tokens']} tokens): {s['runs_during']} runs during the "
                 f"campaign, {s['runs_during_equal_alone']} equal to alone; after == before: {s['after_equal_before']} "
                 f"(max |d logprob| {s['after_logprob_max_abs_diff']:.3g})" + "".join(f"; error {e}" for e in s["errors"]))
    lines.append(f"  server alive: {res['alive']}; pool-leak lines in log: "
                 f"{len(res['leak_lines']) if 'leak_lines' in res else 'log not read'}")
    for f in res["failures"]:
        lines.append(f"  FAIL [{f['kind']}] {f['endpoint']} {f['name']}: expected {f['expect']}, got "
                     f"{f['status']} {f['outcome']}: {f['detail'][:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="fuzz a running server")
    src.add_argument("--model-path", help="start a server on this checkpoint and fuzz it")
    src.add_argument("--tiny", action="store_true", help="write the tiny fp32 checkpoint, serve it, fuzz it")
    ap.add_argument("--cpu", action="store_true", help="start the server with the CPU flags the tests use")
    ap.add_argument("--flags", default="", help="extra launch flags for a server this script starts")
    ap.add_argument("--server-log", help="log of the server under --url (for the pool-leak check)")
    ap.add_argument("--subset", choices=("all", "ci"), default="all")
    ap.add_argument("--kinds", help="only these kinds of case (comma-separated)")
    ap.add_argument("--out", help="write the JSON results here")
    ap.add_argument("--concurrency", type=int, default=4, help="fuzz requests in flight at once")
    ap.add_argument("--stream-prompt", type=int, default=300)
    ap.add_argument("--stream-tokens", type=int, default=48)
    ap.add_argument("--stream-head-start", type=float, default=0.5, help="seconds the stream runs before the cases")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--context-len", type=int)
    args = ap.parse_args(argv)

    server = None
    if args.url:
        url = args.url.rstrip("/")
        log_text = (lambda: Path(args.server_log).read_text(errors="replace")) if args.server_log else None
    else:
        work = Path(tempfile.mkdtemp(prefix="m3_fuzz_"))
        ckpt = args.model_path
        if args.tiny:
            from sglang_m3.tiny import write_tiny_checkpoint

            ckpt = write_tiny_checkpoint(work / "ckpt", flat=True, dtype="float32")
        flags = args.flags.split()
        if args.cpu:
            from tests.conftest import Server as CpuServer  # the CPU launcher of the tests

            server = CpuServer(Path(ckpt), *flags, log_dir=work)
        else:
            from servers import Server

            from tests.conftest import free_port

            server = Server("fuzz", Path(ckpt), flags, log_dir=work, port=free_port())
        server.wait(timeout=900)
        url, log_text = server.url, server.log
    try:
        res = campaign(url, args, log_text)
        if server is not None:
            res["alive"] = res["alive"] and server.proc.poll() is None
            res["pass"] = res["pass"] and res["alive"]
            res["server_log"] = str(server.log_path)
    finally:
        if server is not None:
            server.stop()
    print(summary(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
