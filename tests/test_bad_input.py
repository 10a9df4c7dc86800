"""Bad input fails loudly, naming the problem: never random weights, never silent garbage, never a lost request."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request

import pytest
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.server


def broken_copy(src, dst, *, drop=(), add=None, config=None):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def launch_fails(start_server, ckpt, *flags) -> str:
    server = start_server(ckpt, *flags, wait=False)
    try:
        rc = server.wait_exit(timeout=600)
    finally:
        log = server.log()
        server.stop()
    assert rc != 0, f"server started although it should have refused:\n{log[-3000:]}"
    return log


@pytest.fixture(scope="module")
def flat(tiny_dir):
    return tiny_dir(flat=True)


def test_missing_tensor_is_an_error_naming_it(start_server, flat, tmp_path):
    ckpt = broken_copy(flat, tmp_path / "ckpt", drop=["model.layers.2.self_attn.index_k_proj.weight",
                                                      "model.layers.1.block_sparse_moe.experts.3.w3.weight"])
    log = launch_fails(start_server, ckpt)
    assert "were not (fully) loaded" in log
    assert "model.layers.2.self_attn.index_k_proj.weight" in log
    assert "model.layers.1.block_sparse_moe.experts.w13_weight" in log


def test_unexpected_tensor_is_an_error_naming_it(start_server, flat, tmp_path):
    import torch

    extra = {"model.layers.1.self_attn.index_v_proj.weight": torch.zeros(32, 128)}
    log = launch_fails(start_server, broken_copy(flat, tmp_path / "ckpt", add=extra))
    assert "map to no parameter" in log and "model.layers.1.self_attn.index_v_proj.weight" in log


def test_unsupported_config_value_names_the_field(start_server, flat, tmp_path):
    def gate_on(cfg):
        cfg["attention_output_gate"] = True

    log = launch_fails(start_server, broken_copy(flat, tmp_path / "ckpt", config=gate_on))
    assert "attention_output_gate" in log and "unsupported MiniMax-M3 config" in log


def test_hierarchical_cache_is_refused(start_server, flat):
    log = launch_fails(start_server, flat, "--enable-hierarchical-cache")
    assert "--enable-hierarchical-cache is not supported for MiniMax-M3" in log


def test_over_long_prompt_is_a_clear_error_and_the_server_lives_on(start_server, flat):
    server = start_server(flat, "--context-length", "1024")
    body = {"input_ids": [65] * 1500, "sampling_params": {"max_new_tokens": 4}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=120)
    message = err.value.read().decode()
    assert err.value.code == 400 and "context length" in message.lower(), message
    ok = {"input_ids": [65] * 300, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(ok).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert json.loads(r.read())["meta_info"]["completion_tokens"] == 4


# ---- requests the server refuses, staying up (sglang_m3/request_validation.py through the plugin's hooks) ----

def _post(server, path: str, body: dict):
    """(status, parsed JSON body) — a 4xx is returned, not raised."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, (json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode())


def _reference(server) -> list:
    """A sparse-regime greedy request (300 prompt tokens > top-2 · 128), served from a flushed cache:
    [(logprob, token)] of its 8 new tokens."""
    assert _post(server, "/flush_cache", {})[0] == 200
    status, out = _post(server, "/generate", {"input_ids": [(7 * i) % 200 + 32 for i in range(300)],
                                              "return_logprob": True,
                                              "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                  "ignore_eos": True}})
    assert status == 200, out
    return [(lp, t) for lp, t, _ in out["meta_info"]["output_token_logprobs"]]


def _prefill_lines(server) -> int:
    return server.log().count("Prefill batch")


def test_out_of_vocabulary_id_is_refused_and_the_server_answers_as_before(start_server, flat):
    server = start_server(flat, "--context-length", "1024")
    before = _reference(server)
    vocab = json.loads((flat / "config.json").read_text())["vocab_size"]
    prefills = _prefill_lines(server)
    for ids, where in (([5, 999999], "input_ids[1] = 999999"), ([vocab, 5], f"input_ids[0] = {vocab}"),
                       ([5, 6, -1], "input_ids[2] = -1"),
                       ([[5, 6], [7, 8], [9, vocab]], f"input_ids[1] (batch item 2) = {vocab}")):
        status, out = _post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 4}})
        assert status == 400 and where in out["error"]["message"], (ids, status, out)
        assert f"outside the vocabulary [0, {vocab})" in out["error"]["message"]
    status, out = _post(server, "/v1/completions", {"model": "x", "prompt": [5, 6, vocab + 3], "max_tokens": 4})
    assert status == 400 and f"input_ids[2] = {vocab + 3}" in out["message"], out
    time.sleep(1)
    assert _prefill_lines(server) == prefills  # refused before the scheduler saw any of them
    # same request, same (flushed) cache state, same server: the same arithmetic, so the same bits
    assert _reference(server) == before


def test_empty_prompt_anywhere_in_a_batch_is_refused(start_server, flat):
    server = start_server(flat, "--context-length", "1024")
    prefills = _prefill_lines(server)
    for body, where in (({"input_ids": [list(range(40, 60)), [], [5]]}, "batch item 1"),
                        ({"text": ["hello", "there", ""]}, "text (batch item 2) is empty"),
                        ({"input_ids": [[]]}, "batch item 0")):
        status, out = _post(server, "/generate", {**body, "sampling_params": {"max_new_tokens": 3}})
        assert status == 400 and where in out["error"]["message"] and "empty" in out["error"]["message"], out
    status, out = _post(server, "/v1/completions", {"model": "x", "prompt": ["a", ""], "max_tokens": 3})
    assert status == 400 and "batch item 1" in out["message"], out
    time.sleep(1)
    # nothing of these batches reached the scheduler (SGLang sends a text batch item by item: items before the
    # empty one would otherwise have been prefilled for nothing)
    assert _prefill_lines(server) == prefills
    status, out = _post(server, "/generate", {"input_ids": [list(range(40, 60)), [5]],
                                              "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert status == 200 and [o["meta_info"]["completion_tokens"] for o in out] == [3, 3]


def test_single_prompt_with_n_takes_a_list_of_one_sampling_params(start_server, flat):
    """A single prompt with n = 2 and sampling_params as a list of one object is a batch of one to SGLang: served as
    the same request with the object itself (the oracle: SGLang's own path, untouched by the checks); with n = 1 the
    list would reach SamplingParams(**list) (HTTP 500): refused with 400."""
    server = start_server(flat, "--context-length", "1024")
    params = {"n": 2, "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    outs = []
    for sampling_params in ([params], params):
        status, out = _post(server, "/generate", {"text": "Hello there", "sampling_params": sampling_params})
        assert status == 200 and len(out) == 2, out
        outs.append([(o["text"], o["meta_info"]["completion_tokens"]) for o in out])
    assert outs[0] == outs[1] and outs[0][0][1] == 3
    status, out = _post(server, "/generate", {"text": "Hello there", "sampling_params": [{"max_new_tokens": 3}]})
    assert status == 400 and "single prompt must be a JSON object" in out["error"]["message"], out


def test_chat_body_that_is_not_a_json_object_is_refused_naming_its_type(start_server, flat):
    """SGLang 0.5.17 answered these with HTTP 500 (its chat request validators call .get on the raw body);
    the plugin's JsonObjectBody middleware answers 400 first, and the next well-formed chat is served."""
    server = start_server(flat, "--context-length", "1024")
    for body, kind in (([1, 2, 3], "array"), ("hello", "string"), (None, "null"), (42, "number"), (True, "boolean")):
        status, out = _post(server, "/v1/chat/completions", body)
        assert status == 400 and f"got a JSON {kind}" in out["message"], (body, status, out)
    for path, raw in (("/v1/chat/completions", b" " * 100 + b"[1, 2]"), ("/invocations", b"[1]")):
        req = urllib.request.Request(server.url + path, data=raw, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400 and b"got a JSON array" in err.value.read(), (path, raw[:20])
    # a refused streamed /generate: the error inside the stream, and no traceback from SGLang's abort task 2 s later
    req = urllib.request.Request(server.url + "/generate", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"text": "hi", "rid": ["a", "b"], "stream": True,
                                                  "sampling_params": {"max_new_tokens": 2}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        streamed = r.read().decode()
    assert "rid must be a string" in streamed and "[DONE]" in streamed, streamed
    time.sleep(3)
    assert "Exception in ASGI application" not in server.log(), server.log()[-3000:]
    status, out = _post(server, "/v1/chat/completions", {"model": "x", "max_tokens": 3,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and out["usage"]["completion_tokens"] == 3, out


def test_a_check_after_tokenization_names_the_batch_item(start_server, flat):
    """A text batch's prompt lengths are known once SGLang has tokenized each item: item 1's logprob_start_len past
    its prompt was refused without saying which prompt it was (newcomer probe, session 20)."""
    server = start_server(flat, "--context-length", "1024")
    for text, where in ((["abcdefghij", "abc"], " (batch item 1)"), ("abc", "")):
        status, out = _post(server, "/generate", {"text": text, "return_logprob": True, "logprob_start_len": 5,
                                                  "sampling_params": {"max_new_tokens": 2}})
        assert status == 400, out
        assert f"logprob_start_len{where} = 5 is past the prompt (3 tokens)" in out["error"]["message"], out


def test_ollama_chat_refusal_names_what_sglang_passed(start_server, flat):
    """SGLang 0.5.17's /api/chat passes transformers 5's apply_chat_template(tokenize=True) result, a BatchEncoding,
    as input_ids, and its Ollama routes answer a ValueError with a bare 500 (README, Known limitations): the
    refusal in the log names the type, where it said "input_ids is empty" (newcomer probe, session 20)."""
    server = start_server(flat, "--context-length", "1024")
    status, _ = _post(server, "/api/chat", {"model": "x", "stream": False, "options": {"num_predict": 2},
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert status == 500
    refusal = "input_ids must be a list of token ids or a list of lists of ids, got BatchEncoding"
    for _ in range(50):  # (the traceback reaches the log after the access line)
        if refusal in server.log():
            break
        time.sleep(0.1)
    assert refusal in server.log(), server.log()[-3000:]
    status, out = _post(server, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and out["meta_info"]["completion_tokens"] == 2, out


def test_token_ids_logprob_beside_a_running_request_keeps_the_server(start_server, flat):
    """sgl-project/sglang#34719 (a breaker found it here): a request with `token_ids_logprob`, or a /v1/score, decoded
    in one batch with a request without it ended the scheduler and every request in flight. Now both answer and the
    asked log-probabilities are those of the same request served alone (oracle; CPU fp32, another batch: 1e-4)."""
    import threading

    server = start_server(flat, "--context-length", "1024")
    asked = {"input_ids": [(5 * i) % 200 + 40 for i in range(20)], "return_logprob": True,
             "token_ids_logprob": [5, 6], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    status, alone = _post(server, "/generate", asked)
    assert status == 200, alone
    running = {}

    def long_decode():
        running["reply"] = _post(server, "/generate", {"input_ids": [(3 * i) % 200 + 32 for i in range(300)],
                                                       "sampling_params": {"max_new_tokens": 400, "temperature": 0,
                                                                           "ignore_eos": True}})

    offset = len(server.log())  # the log from here on is the long request's (the first one has finished)
    thread = threading.Thread(target=long_decode)
    thread.start()
    try:
        deadline = time.time() + 120
        while not re.search(r"Decode batch.*#running-req: 1,", server.log()[offset:]):
            assert time.time() < deadline, "the long request logged no decode batch in 120 s"
            time.sleep(0.2)  # until it decodes (SGLang logs every 40th decode step; 360 of its 400 steps remain)
        status, mixed = _post(server, "/generate", asked)
        assert status == 200, mixed
        status, score = _post(server, "/v1/score", {"query": "hello", "items": [" a", " b"],
                                                    "label_token_ids": [65, 66]})
        assert status == 200, score
    finally:
        thread.join(timeout=600)
    assert running["reply"][0] == 200, running["reply"]
    # the asked request was prefilled while the long one ran: its prefill line counts one running request
    assert re.search(r"Prefill batch.*#running-req: 1,", server.log()[offset:]), server.log()[offset:][-3000:]
    pairs = list(zip(alone["meta_info"]["output_token_ids_logprobs"], mixed["meta_info"]["output_token_ids_logprobs"]))
    assert len(pairs) == 4
    for a, b in pairs:
        assert [t for _, t, _ in a] == [t for _, t, _ in b] == [5, 6]
        assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4, (a, b)
    with urllib.request.urlopen(server.url + "/health_generate", timeout=120) as r:
        assert r.status == 200


def test_sampling_that_would_leave_no_token_is_refused_and_the_server_answers_as_before(start_server, flat):
    """Two requests a breaker found to end the scheduler, every request in flight with it: a logit_bias that fits
    float32 but overflows once the sampler divides by a temperature below 1 (NaN probabilities, multinomial
    raises), and a grammar whose match ends before min_new_tokens (every token masked). Both are now a 400 naming
    the fields; the server then answers a reference request with the same bits."""
    server = start_server(flat, "--context-length", "1024")
    before = _reference(server)
    for body, words in (
            ({"text": "Hi", "sampling_params": {"max_new_tokens": 4, "temperature": 0.5, "logit_bias": {"65": 3e38}}},
             ["logit_bias[65]", "temperature 0.5", "float32"]),
            ({"text": "Hello there", "sampling_params": {"max_new_tokens": 8, "regex": "a", "min_new_tokens": 5}},
             ["min_new_tokens", "regex"])):
        status, out = _post(server, "/generate", body)
        assert status == 400 and all(w in out["error"]["message"] for w in words), (body, status, out)
    status, out = _post(server, "/v1/chat/completions", {"model": "x", "max_tokens": 4, "temperature": 0.5,
                                                         "messages": [{"role": "user", "content": "Hi"}],
                                                         "logit_bias": {"65": 3e38}})
    assert status == 400 and "logit_bias[65]" in json.dumps(out), out
    # the same bias at temperature 1 is served (the sampler's float32 holds it)
    status, out = _post(server, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2,
                                                                               "logit_bias": {"65": 3e38}}})
    assert status == 200 and out["meta_info"]["completion_tokens"] == 2, out
    assert _reference(server) == before


def test_weight_update_from_a_refused_checkpoint_keeps_the_server_and_its_weights(start_server, flat, tmp_path):
    """/update_weights_from_disk with a checkpoint our loader refuses (an extra tensor, every other one changed)
    ended the server: SGLang's rollback re-read the new path. Now it is a 400 naming the tensor, the original
    weights are back (a reference request gives the same bits as before), also after an earlier failed update; an
    unknown load_format, or one whose loader SGLang cannot update from, is a 400 that touches nothing."""
    import torch

    server = start_server(flat, "--context-length", "1024")
    before = _reference(server)
    # first a failure SGLang answers itself (no such path) but which left its model_path on the new path, so that
    # the next failed update's rollback read that one (a reviewer's sequence)
    status, out = _post(server, "/update_weights_from_disk", {"model_path": str(tmp_path / "nowhere")})
    assert status == 400 and not out["success"], out
    scaled = {name: t * 1.5 for name, t in load_file(flat / "model.safetensors").items()}
    ckpt = broken_copy(flat, tmp_path / "ckpt",
                       add={**scaled, "model.layers.1.self_attn.index_v_proj.weight": torch.zeros(32, 128)})
    status, out = _post(server, "/update_weights_from_disk", {"model_path": str(ckpt)})
    assert status == 400 and not out["success"], out
    assert "index_v_proj" in out["message"] and "original weights were reloaded" in out["message"], out
    assert _reference(server) == before
    for fmt, words in (("bogus", ["'bogus'", "not a valid LoadFormat"]), ("dummy", ["DummyModelLoader"])):
        status, out = _post(server, "/update_weights_from_disk", {"model_path": str(flat), "load_format": fmt})
        assert status == 400 and all(w in out["message"] for w in words), out
    assert _reference(server) == before
