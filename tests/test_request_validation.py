"""sglang_m3/request_validation.py on its own (no server): what is refused, and that the message names the field,
the batch item, the id and its position. The served behaviour (HTTP 400, server alive) is in test_bad_input.py
and the fuzz campaign (test_fuzz.py)."""

from __future__ import annotations

import json

import pytest

from sglang_m3.request_validation import (Limits, M3RequestError, check_batch, check_request, check_sampling_params,
                                          SAMPLING_EPS, check_shape, check_token_ids)

LIMITS = Limits(vocab_size=512)


def req(**fields):
    """A GenerateReqInput as SGLang builds it from the JSON body."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    return GenerateReqInput(**fields)


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(M3RequestError) as err:
        fn(*args, **kwargs)
    assert isinstance(err.value, ValueError)  # SGLang answers ValueErrors with HTTP 400
    return str(err.value)


@pytest.mark.parametrize("bad,pos", [(512, 3), (-1, 0), (2**40, 6), (10**6, 1)])
def test_token_id_outside_the_vocabulary_is_named_with_its_position(bad, pos):
    ids = [5, 6, 7, 8, 9, 10, 11]
    ids[pos] = bad
    msg = refused(check_token_ids, ids, 512)
    assert f"input_ids[{pos}]" in msg and str(bad) in msg and "[0, 512)" in msg


def test_token_ids_at_the_edges_of_the_vocabulary_pass():
    check_token_ids([0, 511, 17], 512)
    check_token_ids(list(range(512)), 512)


def test_non_integer_ids_are_refused():
    assert "input_ids[1]" in refused(check_token_ids, [3, 2.5], 512)
    assert "input_ids[0]" in refused(check_token_ids, [True, 3], 512)
    assert "empty" in refused(check_token_ids, [], 512)


@pytest.mark.parametrize("bad", [True, False, 2.0, 2.5, "3", None])
def test_a_non_integer_id_between_integers_is_refused(bad):
    # min/max of the list are then valid ints (True == 1, 2.0 == 2): the check must not stop at them
    for ids, pos in (([1, bad, 5], 1), ([0, 1, 3, bad, 4, 5], 3)):  # (list.index(True) would find the 1)
        msg = refused(check_token_ids, ids, 512)
        assert f"input_ids[{pos}]" in msg and repr(bad) in msg


def test_empty_prompt_anywhere_in_a_batch():
    obj = req(input_ids=[[5] * 20, [], [5]], sampling_params={"max_new_tokens": 2})
    check_shape(obj, LIMITS)  # a list of lists: the shape is fine
    obj.normalize_batch_and_arguments()
    msg = refused(check_batch, obj, LIMITS)
    assert "batch item 1" in msg and "empty" in msg
    obj = req(text=["hi", ""])
    obj.normalize_batch_and_arguments()
    assert "text (batch item 1) is empty" in refused(check_batch, obj, LIMITS)
    assert "text is empty" in refused(check_shape, req(text=""), LIMITS)


def test_out_of_vocabulary_id_in_a_batch_names_the_item():
    obj = req(input_ids=[[5, 6], [7, 8], [9, 512]])
    obj.normalize_batch_and_arguments()
    msg = refused(check_batch, obj, LIMITS)
    assert "input_ids[1] (batch item 2) = 512" in msg


def test_final_token_ids_are_checked_after_tokenization():
    # `_validate_one_request` passes the prompt's final ids (e.g. from a text or a chat template)
    obj = req(text="hello")
    obj.normalize_batch_and_arguments()
    check_request(obj, LIMITS, [104, 101], tokenized=True)
    assert "input_ids[1] = 600" in refused(check_request, obj, LIMITS, [104, 600], tokenized=True)
    assert "empty" in refused(check_request, obj, LIMITS, [], tokenized=True)


def test_a_check_after_tokenization_names_the_batch_item():
    """A text batch's prompt lengths are known only once SGLang tokenizes each item (`_validate_one_request(obj[i],
    ids)`): item 1's logprob_start_len past its 3 tokens was refused without saying which of the prompts it was
    (newcomer probe, session 20). SGLang's obj[i] returns the same cached item object every time."""
    obj = req(text=["abcdefgh", "abc"], return_logprob=True, logprob_start_len=5)
    obj.normalize_batch_and_arguments()
    check_batch(obj, LIMITS)  # (text: the lengths are not known yet)
    assert obj[1] is obj[1]
    check_request(obj[0], LIMITS, [97] * 8, tokenized=True)
    message = refused(check_request, obj[1], LIMITS, [97] * 3, tokenized=True)
    assert "logprob_start_len (batch item 1) = 5 is past the prompt (3 tokens)" in message, message
    assert "(batch item" not in refused(check_request, req(text="abc", return_logprob=True, logprob_start_len=5),
                                        LIMITS, [97] * 3, tokenized=True)


@pytest.mark.parametrize("params,words", [
    ({"max_new_tokens": "ten"}, ["max_new_tokens", "integer"]),
    ({"max_new_tokens": 2.5}, ["max_new_tokens", "integer"]),
    ({"n": "2"}, ["n", "integer"]),
    ({"n": 0}, ["n", "between 1 and 128", "got 0"]),
    ({"n": 129}, ["n", "between 1 and 128", "got 129"]),
    ({"n": 10**9}, ["n", "between 1 and 128"]),
    ({"temperature": "hot"}, ["temperature", "number"]),
    ({"top_p": float("nan")}, ["top_p", "finite"]),
    ({"ignore_eos": "yes"}, ["ignore_eos", "true or false"]),
    ({"stop": 5}, ["stop", "string"]),
    ({"stop": ["a", 5]}, ["stop", "string"]),
    ({"stop_regex": "("}, ["stop_regex", "regular expression"]),
    ({"stop_token_ids": [3, 512]}, ["stop_token_ids[1]", "512", "vocabulary"]),
    ({"stop_token_ids": "3"}, ["stop_token_ids", "list"]),
    ({"logit_bias": {"512": 1.0}}, ["logit_bias", "512", "vocabulary"]),
    ({"logit_bias": {"x": 1.0}}, ["logit_bias", "'x'", "not a token id"]),
    ({"logit_bias": [1]}, ["logit_bias", "object"]),
    ({"logit_bias": {"5": -3e38}, "temperature": 0.5}, ["logit_bias[5]", "temperature 0.5", "float32"]),
    ({"regex": "a", "min_new_tokens": 5}, ["min_new_tokens", "regex", "stop token"]),
    ({"json_schema": "{}", "min_new_tokens": 1}, ["min_new_tokens", "json_schema"]),
    ({"tempreature": 0}, ["unknown", "tempreature"]),
    ({"regex": "(ab"}, ["regex", "regular expression"]),
    ({"regex": "(" * 500 + "a" + ")" * 500}, ["regex", "RecursionError", "1001 characters"]),
    ({"regex": 5}, ["regex", "string"]),
    ({"json_schema": "{not json"}, ["json_schema", "JSON"]),
    ({"regex": "a", "json_schema": "{}"}, ["at most one"]),
    ({"stream_interval": 0}, ["stream_interval"]),
    ({"custom_params": [1]}, ["custom_params", "object"]),
])
def test_sampling_params_name_the_bad_field(params, words):
    msg = refused(check_sampling_params, params, 512)
    assert all(w in msg for w in words), msg


def test_sampler_tensor_bounds_are_the_tensors_own():
    """top_k / min_new_tokens and the float fields go into int32 / float32 tensors in SGLang's scheduler, where a value
    that does not fit raised and ended the server (top_k 2**31, logit_bias 1e39): the validator's bounds are
    exactly what torch can hold (the oracle: torch building those tensors the way the scheduler does)."""
    import torch

    i32, f32 = torch.iinfo(torch.int32), torch.finfo(torch.float32)
    for v in (i32.max, i32.max + 1, 2**63):
        fits = True
        try:
            torch.tensor([v], dtype=torch.int32)
        except (RuntimeError, OverflowError, ValueError):
            fits = False
        for name in ("top_k", "min_new_tokens"):
            params = {name: v, "max_new_tokens": 4}
            if fits:
                check_sampling_params(params, 512)
            else:
                msg = refused(check_sampling_params, params, 512)
                assert name in msg and "int32" in msg and str(v) in msg, msg
    for v in (f32.max, -f32.max, 3.5e38, 1e39, -1e308):
        row = torch.zeros(4)
        try:
            row[1] = v  # sampling_batch_info: logit_bias[i, int(key)] = value
            fits = bool(torch.isfinite(torch.tensor([v], dtype=torch.float32)).all())
        except RuntimeError:
            fits = False
        for params, field in (({"logit_bias": {"5": v}}, "logit_bias[5]"), ({"temperature": v}, "temperature")):
            if fits and field == "logit_bias[5]":
                check_sampling_params(params, 512)
            elif not fits:
                msg = refused(check_sampling_params, params, 512)
                assert field in msg and "float32" in msg, msg


def test_logit_bias_bound_is_the_samplers_float32_after_the_temperature():
    """Oracle: the sampler's own arithmetic in float32 (sglang/srt/layers/sampler.py: bias added to the logits, then
    divided by the temperature). A bias is accepted exactly when every logit stays finite; a temperature below
    SAMPLING_EPS is greedy (nothing divided) and takes any bias that fits float32. Values away from the boundary,
    where float64 (ours) and float32 (the sampler's) division agree."""
    import torch
    from sglang.srt.sampling.sampling_params import _SAMPLING_EPS

    assert SAMPLING_EPS == _SAMPLING_EPS
    for value in (3e38, -3e38, 1e38, 2e38, 3.3e38, 1e30, 1e33, 7.0):
        for temperature in (1.0, 0.9, 0.5, 1e-6, 0.0, 1e-7, 2.0):
            params = {"logit_bias": {"5": value}, "temperature": temperature}
            logits = torch.zeros(8, dtype=torch.float32)
            logits[5] += value
            if temperature >= SAMPLING_EPS:
                logits /= temperature
            if bool(torch.isfinite(logits).all()):
                check_sampling_params(params, 512)
            else:
                msg = refused(check_sampling_params, params, 512)
                assert "logit_bias[5]" in msg and f"temperature {temperature!r}" in msg, msg


def test_preferred_sampling_params_count_as_the_requests_own():
    """SGLang merges --preferred-sampling-params under each request's sampling_params before the scheduler sees them
    (TokenizerManager: {**preferred, **request}); a preferred temperature of 0.5 therefore bounds a request's
    logit_bias as its own would, and the request's own temperature still wins."""
    limits = Limits(vocab_size=512, preferred_sampling_params={"temperature": 0.5})
    body = dict(input_ids=[5, 6], sampling_params={"max_new_tokens": 2, "logit_bias": {"5": 3e38}})
    msg = refused(check_request, req(**body), limits, [5, 6], tokenized=True)
    assert "temperature 0.5" in msg and "--preferred-sampling-params" in msg, msg
    check_request(req(**body), LIMITS, [5, 6], tokenized=True)
    own = dict(body, sampling_params={**body["sampling_params"], "temperature": 1.0})
    check_request(req(**own), limits, [5, 6], tokenized=True)


def test_integer_messages_fit_the_field():
    """The top_k hint appears for top_k only; an integer literal beyond 64 bits, which SGLang's JSON parsing hands
    over as a float (seen on a served request: sampling_seed 2**70 arrived as 1.1805916207174113e+21), is called out
    of range, not "not an integer"; a real fraction is still "must be an integer"."""
    msg = refused(check_sampling_params, {"min_new_tokens": 10**12}, 512)
    assert "min_new_tokens" in msg and "int32" in msg and "top_k" not in msg, msg
    assert "top_k at or above" in refused(check_sampling_params, {"top_k": 10**12}, 512)
    msg = refused(check_sampling_params, {"sampling_seed": float(2**70)}, 512)
    assert "sampling_seed" in msg and "64-bit range" in msg, msg
    msg = refused(check_sampling_params, {"sampling_seed": 2**63}, 512)  # an int that int64 cannot hold
    assert "sampling_seed" in msg and "64-bit" in msg, msg
    check_sampling_params({"sampling_seed": 2**63 - 1}, 512)
    msg = refused(check_sampling_params, {"sampling_seed": 1.5}, 512)
    assert "must be an integer, got 1.5" in msg, msg


def test_grammar_refusal_applies_to_grammar_requests_only():
    """A server that cannot constrain decoding (Limits.grammar_refusal) refuses every grammar field with that message,
    and serves the rest; a server that can does not."""
    limits = Limits(vocab_size=512, grammar_refusal="no grammars here: --reasoning-parser with llguidance")
    for name, value in (("regex", "[ab]+"), ("json_schema", '{"type": "object"}'), ("ebnf", 'root ::= "a"'),
                        ("structural_tag", "{}")):
        r = req(input_ids=[1, 2], sampling_params={name: value, "max_new_tokens": 2})
        assert refused(check_request, r, limits) == limits.grammar_refusal
        check_request(r, LIMITS)
    check_request(req(input_ids=[1, 2], sampling_params={"max_new_tokens": 2, "regex": ""}), limits)
    check_request(req(input_ids=[1, 2], sampling_params={"max_new_tokens": 2}), limits)


# Rust regex syntax that llguidance takes and Python's `re` does not, then patterns no backend takes.
_LLGUIDANCE_ONLY = [r"\p{Lu}[a-z]{2,5}", r"\x{41}[a-z]{2}", r"(?<w>[a-z]{3})", r"[a-z]{3}\z", "a**"]
_INVALID_EVERYWHERE = ["(ab", r"(a)\1", "(?=a)a", "(" * 500 + "a" + ")" * 500, "a{4294967296}"]


@pytest.mark.parametrize("pattern", _LLGUIDANCE_ONLY + _INVALID_EVERYWHERE + ["[ab]{3}"])
def test_grammar_regex_is_judged_by_the_llguidance_backend_that_compiles_it(pattern):
    """On an llguidance server (`--grammar-backend llguidance`, what CPU servers use) a `regex` grammar is refused
    exactly when SGLang's own GuidanceBackend cannot compile it (the oracle: its dispatch_regex over the tiny
    checkpoint's tokenizer returns an InvalidGrammarObject), with the field named; before, Python's `re` judged and
    refused valid patterns such as `\\p{Lu}` (a newcomer probe)."""
    import re

    from sglang.srt.constrained.base_grammar_backend import InvalidGrammarObject
    from sglang.srt.constrained.llguidance_backend import GuidanceBackend
    from transformers import PreTrainedTokenizerFast

    from sglang_m3.tiny_tokenizer import build_tokenizer

    backend = GuidanceBackend(PreTrainedTokenizerFast(tokenizer_object=build_tokenizer()))
    backend_refuses = isinstance(backend.dispatch_regex(pattern), InvalidGrammarObject)
    assert backend_refuses == (pattern in _INVALID_EVERYWHERE)  # the lists say what they claim
    if pattern in _LLGUIDANCE_ONLY:  # (each is one Python's `re` refuses: the case the old check got wrong)
        with pytest.raises(re.error):
            re.compile(pattern)
    limits = Limits(vocab_size=512, grammar_backend="llguidance")
    r = req(input_ids=[1, 2], sampling_params={"max_new_tokens": 2, "regex": pattern})
    if backend_refuses:
        msg = refused(check_request, r, limits)
        assert "sampling_params.regex" in msg and "llguidance" in msg, msg
        assert "sampling_params.regex" in refused(check_shape, r, limits)
    else:
        check_request(r, limits)
        check_shape(r, limits)


def test_grammar_regex_that_is_not_unicode_is_refused_naming_the_field():
    # JSON's "\ud800" decodes to a lone surrogate, which llguidance's parser cannot take (a UnicodeEncodeError)
    limits = Limits(vocab_size=512, grammar_backend="llguidance")
    msg = refused(check_request, req(input_ids=[1, 2], sampling_params={"regex": "a\ud800"}), limits)
    assert "sampling_params.regex" in msg and "Unicode" in msg, msg


def test_well_formed_sampling_params_pass():
    check_sampling_params({"max_new_tokens": 0, "temperature": 0, "top_k": -1, "stop": ["\n"], "regex": "[ab]{3}",
                           "logit_bias": {"5": -1.5}, "stop_token_ids": [511], "n": 2, "ignore_eos": True,
                           "sampling_seed": 3, "custom_params": {"a": 1}}, 512)
    check_sampling_params({"json_schema": '{"type": "object"}', "stop_regex": ["a{1,8}", "b"]}, 512)
    check_sampling_params({"n": 128, "max_new_tokens": 2}, 512)  # MAX_PARALLEL_SAMPLES itself
    check_sampling_params(None, 512)
    check_sampling_params({"max_new_tokens": None, "temperature": None}, 512)  # None means "default" in SGLang


def test_logprob_fields():
    def one(**fields):
        obj = req(input_ids=[5] * 10, **fields)
        obj.normalize_batch_and_arguments()
        return obj

    check_request(one(return_logprob=True, logprob_start_len=10), LIMITS)  # = prompt length: output tokens only
    check_request(one(return_logprob=True, logprob_start_len=-1, top_logprobs_num=512), LIMITS)
    assert "past the prompt (10 tokens)" in refused(check_request, one(return_logprob=True, logprob_start_len=11),
                                                    LIMITS)
    assert "logprob_start_len = -5" in refused(check_request, one(return_logprob=True, logprob_start_len=-5), LIMITS)
    assert ") = 513 is outside" in refused(check_request, one(return_logprob=True, top_logprobs_num=513), LIMITS)
    assert "logprobs) = -1 is outside" in refused(check_request, one(return_logprob=True, top_logprobs_num=-1), LIMITS)


def test_input_embeds_are_refused():
    for embeds in ([[0.1] * 8] * 3, [[[0.1] * 8], [[0.1] * 8]], [[0.1] * 3]):
        assert "input_embeds is not supported" in refused(check_shape, req(input_embeds=embeds), LIMITS)


def test_shape_before_normalization():
    # each of these makes SGLang's normalize_batch_and_arguments raise TypeError/IndexError (HTTP 500) or
    # serve something else than asked
    assert "no prompt" in refused(check_shape, req(sampling_params={}), LIMITS)
    assert "text and input_ids" in refused(check_shape, req(text="a", input_ids=[5]), LIMITS)
    assert "single prompt" in refused(check_shape, req(input_ids=[5], sampling_params=[{}]), LIMITS)
    assert "list of 1" in refused(check_shape, req(input_ids=[[5], [6]], sampling_params=[{}]), LIMITS)
    assert "sampling_params.n" in refused(check_shape, req(input_ids=[5], sampling_params={"n": "2"}), LIMITS)
    assert "top_logprobs_num is a list of 1" in refused(check_shape, req(input_ids=[[5], [6]], top_logprobs_num=[1]),
                                                        LIMITS)
    assert "image_data" in refused(check_shape, req(text="look", image_data="data:image/png;base64,AAAA"), LIMITS)
    check_shape(req(input_ids=[[5], [6]], sampling_params=[{}, {"max_new_tokens": 3}]), LIMITS)
    check_shape(req(text=["a", "b"], sampling_params={"max_new_tokens": 3}), LIMITS)


def test_input_ids_that_are_not_a_list_are_named_by_type_not_called_empty():
    """SGLang's Ollama /api/chat passes transformers 5's apply_chat_template(tokenize=True) result, a BatchEncoding
    (a dict), as input_ids; the refusal called a whole chat prompt "empty" (newcomer probe, session 20)."""
    from transformers import BatchEncoding

    encoding = BatchEncoding({"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]})
    for value, kind in ((encoding, "BatchEncoding"), ((5, 6), "tuple"), (5, "int")):
        message = refused(check_shape, req(input_ids=value), LIMITS)
        assert "empty" not in message and "input_ids must be a list" in message and kind in message, message
    assert "input_ids is empty" in refused(check_shape, req(input_ids=[]), LIMITS)


@pytest.mark.parametrize("body, kind", [(b'{"a": 1}', "object"), (b"[1, 2]", "array"), (b'"x"', "string"),
                                        (b"null", "null"), (b"4.5", "number"), (b"-1", "number"),
                                        (b"false", "boolean"), (b" \n\t true", "boolean"), (b"", None),
                                        (b"\xef\xbb\xbf [2]", "array"), (b"<xml/>", None), (b"nope", None),
                                        (b"12ab", None), ('[1, 2]'.encode("utf-16"), "array"),
                                        ('[1, 2]'.encode("utf-16-be"), "array"), ('"x"'.encode("utf-32"), "string"),
                                        ('{"a": 1}'.encode("utf-16-le"), "object"),
                                        # an object or array is not parsed (SGLang's parse judges the rest):
                                        (b"{not json", "object"), (b"[1,", "array"),
                                        (b" " * 64 + b"[1, 2]", "array"), (b"\n" * 100 + b"null", "null"),
                                        (("\n" * 100 + "[1]").encode("utf-16"), "array"),
                                        (b"[" * 100_000 + b"]" * 100_000, "array")])  # json.loads: RecursionError
def test_json_kind(body, kind):
    """Oracle: json.loads where it can parse the body (the kind of the value it returns) and the JSON grammar's
    value openers (RFC 8259 §3) where it cannot."""
    from sglang_m3.json_body import json_kind

    assert json_kind(body) == kind
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return
    assert kind == {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
                    int: "number", float: "number"}[type(value)]


def test_rid_must_be_a_string_or_one_per_prompt():
    """SGLang keys its request table by rid: a single prompt's list reached it unhashable (TypeError, HTTP 500).
    Every shape accepted here is one SGLang's own normalization takes (checked: normalize_batch_and_arguments)."""
    from sglang_m3.request_validation import check_shape

    assert "a string for a single prompt" in refused(check_shape, req(text="hi", rid=["a", "b"]), LIMITS)
    assert "one string per prompt (2)" in refused(check_shape, req(text=["a", "b"], rid=["x"]), LIMITS)
    assert "one string per prompt (2)" in refused(check_shape, req(text=["a", "b"], rid=["x", {"y": 1}]), LIMITS)
    assert "rid must be" in refused(check_shape, req(input_ids=[5], rid=7), LIMITS)
    assert "one string per prompt (1)" in refused(check_shape, req(text="hi", rid=["a", "b"],
                                                                   sampling_params={"n": 2}), LIMITS)
    for ok in (req(text="hi", rid="a"), req(text=["a", "b"], rid=["x", "y"]), req(text=["a", "b"], rid="x"),
               req(input_ids=[5]), req(text="hi", rid=["a"], sampling_params={"n": 2})):  # SGLang: a batch of one
        check_shape(ok, LIMITS)
        ok.normalize_batch_and_arguments()


def test_single_prompt_with_n_takes_a_list_of_one_sampling_params():
    """A single prompt with n > 1 is a batch of one to SGLang (n read from the list's first object), so a list of
    one sampling_params object is its per-prompt list. Oracle: SGLang's own normalize_batch_and_arguments, then
    SamplingParams(**params) on each item as the tokenizer manager builds it."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    for ok in (req(text="hi", sampling_params=[{"n": 2, "max_new_tokens": 3}]),
               req(input_ids=[5, 6], sampling_params=[{"n": 2}], rid=["a"])):
        check_shape(ok, LIMITS)
        ok.normalize_batch_and_arguments()
        check_batch(ok, LIMITS)
        assert ok.batch_size == 1 and ok.parallel_sample_num == 2
        SamplingParams(**ok[0].sampling_params)
    # n = 1: SGLang keeps the list as one prompt's sampling_params, and SamplingParams(**list) is a TypeError (500)
    for n1 in ([{}], [{"n": 1}]):
        bad = req(text="hi", sampling_params=n1)
        assert "single prompt must be a JSON object" in refused(check_shape, bad, LIMITS)
        bad.normalize_batch_and_arguments()
        assert bad.is_single and isinstance(bad.sampling_params, list)
        with pytest.raises(TypeError):
            SamplingParams(**bad.sampling_params)
    # a list of 2 for the one prompt: SGLang takes it but serves the first object only (a batch of one item)
    two = req(text="hi", sampling_params=[{"n": 2}, {"n": 2, "temperature": 0.5}])
    assert "list of 2: give one object per prompt (1)" in refused(check_shape, two, LIMITS)
    two.normalize_batch_and_arguments()
    assert two.batch_size == 1 and two[0].sampling_params == {"n": 2}
    # an empty list: SGLang's n lookup is an IndexError (500)
    assert "single prompt must be a JSON object" in refused(check_shape, req(text="hi", sampling_params=[]), LIMITS)
    with pytest.raises(IndexError):
        req(text="hi", sampling_params=[]).normalize_batch_and_arguments()
    # n is checked inside the list as everywhere
    assert "sampling_params.n (batch item 0) must be between 1 and 128" in refused(
        check_shape, req(text="hi", sampling_params=[{"n": 129}]), LIMITS)
    # n = 2.0 passes SGLang's `> 1` and then breaks its batch expansion (TypeError, 500): the refusal names n's type
    assert "sampling_params.n (batch item 0) must be an integer" in refused(
        check_shape, req(text="hi", sampling_params=[{"n": 2.0}]), LIMITS)
    with pytest.raises(TypeError):
        req(text="hi", sampling_params=[{"n": 2.0}]).normalize_batch_and_arguments()


@pytest.mark.parametrize("pattern,words", [
    ("(a|a)*c", ["unbounded", "at most 256"]),                # froze the scheduler (exponential backtracking)
    ("a+", ["unbounded"]),                                     # SGLang then re-searches the whole output per token
    ("x(?=y)", ["cannot size", "ASSERT", "lookarounds"]),     # a construct SGLang's sizing does not bound
    ("a{0,257}", ["sizes its longest match as 257 characters"]),
    ("(a|a){0,30}c", ["too many ways"]),                      # bounded, still 2**30 ways
    ("(?:a{0,5}){0,5}", ["too many ways"]),
    ("(?:.|.)" * 30 + "\\x00", ["too many ways"]),           # no repetition at all: 2**30 ways written out
    (".?" * 12 + "[\\x00\\x01]" + ".{240}", ["too many ways"]),
    ("a{0,20}a{0,20}a{0,20}", ["too many ways"]),
    ("a" * 257, ["longer than 256 characters"]),
    ("a{4294967296}", ["not a valid regular expression", "OverflowError"]),
])
def test_stop_regex_that_would_stall_the_scheduler_is_refused(pattern, words):
    msg = refused(check_sampling_params, {"stop_regex": ["\\n", pattern]}, 512)
    assert "sampling_params.stop_regex" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_stop_regex_ways_count_against_brute_force():
    # The oracle: every way a pattern can match, enumerated by expanding it (alternatives and repetition counts)
    # with itertools, for small patterns; _ways must equal it.
    import itertools

    from sglang_m3.request_validation import _ways, sre_parse

    def count(slots):  # slots: per position of the pattern, its alternatives -> number of distinct sequences
        return len(list(itertools.product(*slots)))

    cases = {
        "x": 1,
        "(?:ab|cd|ef)": count([["ab", "cd", "ef"]]),
        "(?:ab|cd|ef)?": 1 + count([["ab", "cd", "ef"]]),                  # 0 or 1 time
        "(?:ab|cd){2}": count([["ab", "cd"]] * 2),
        "(?:ab|cd){1,3}": sum(count([["ab", "cd"]] * k) for k in (1, 2, 3)),
        "\\s{0,8}END\\s{0,8}": count([range(9), ["END"], range(9)]),    # the two repetition counts
        "(?:foo\\s{0,16}|bar\\s{0,16}|baz)": count([range(17)]) * 2 + 1,
        "(?:.|.)(?:.|.)(?:.|.)": count([["left", "right"]] * 3),
        "(?:x|(?:ab|cd){0,2})": 1 + sum(count([["ab", "cd"]] * k) for k in (0, 1, 2)),
    }
    for pattern, expected in cases.items():
        assert _ways(sre_parse.parse(pattern), 10**9) == expected, pattern
    assert _ways(sre_parse.parse("(?:.|.)" * 40), 4097) == 4097  # counted only up to the cap


def test_stop_regex_limits_follow_sglangs_own_sizing():
    # The width bound is SGLang's get_max_seq_length, the tail length its scheduler re-searches (the oracle here).
    from sglang.srt.sampling.sampling_params import get_max_seq_length

    from sglang_m3.request_validation import STOP_REGEX_MAX_WIDTH, stop_regex_work

    for pattern in ("\\n\\n", "```", "\\s{0,8}END\\s{0,8}$", "(ab){1,4}", "(?i)the end", "\\n{2,32}",
                    "[^ab]x", "(a|b){1,5}", "(foo|bar)", "(?:Final Answer|Answer)?:", "(\\r?\\n){2}",
                    "(?:foo\\s{0,16}|bar\\s{0,16}|baz\\s{0,16})", "a{256}"):
        assert get_max_seq_length(pattern) <= STOP_REGEX_MAX_WIDTH
        stop_regex_work(pattern)
    assert get_max_seq_length("a{0,257}") == STOP_REGEX_MAX_WIDTH + 1


def test_stop_lists_and_the_request_budget():
    assert "65 entries" in refused(check_sampling_params, {"stop": ["x"] * 65}, 512)
    assert "65 entries" in refused(check_sampling_params, {"stop_regex": ["x"] * 65}, 512)
    assert "longer than 256" in refused(check_sampling_params, {"stop": ["x" * 257]}, 512)
    check_sampling_params({"stop": ["x" * 256] * 64, "stop_regex": ["\\n\\n"] * 64}, 512)
    # one pattern of work 81 ways * (19 + 1) = 1620: ten of them, or n = 10 copies of one, pass 16384; 11 do not
    pattern = "\\s{0,8}END\\s{0,8}$"
    check_sampling_params({"stop_regex": [pattern] * 10, "n": 1}, 512)
    assert "add up to" in refused(check_sampling_params, {"stop_regex": [pattern] * 11, "n": 1}, 512)
    assert "add up to" in refused(check_sampling_params, {"stop_regex": pattern, "n": 11}, 512)
    assert "got null" in refused(check_sampling_params, {"n": None}, 512)


def test_sequences_per_request_bound_a_batch_of_prompts_times_n():
    check_shape(req(text=["hi"] * 64, sampling_params={"n": 2}), LIMITS)  # 128: MAX_PARALLEL_SAMPLES itself
    assert "200 sequences (100 prompts, n = 2)" in refused(check_shape, req(text=["hi"] * 100,
                                                                             sampling_params={"n": 2}), LIMITS)
    assert "129 sequences" in refused(check_shape, req(input_ids=[[5], [6]], sampling_params=[{"n": 100},
                                                                                             {"n": 29}]), LIMITS)
    check_shape(req(text=["hi"] * 1000), LIMITS)  # n = 1: a batch is the client's own list of requests


_SESSION_CASES = [{}, {"id": "s"}, {"id": "s", "rid": "r", "offset": 3}, {"id": "s", "offset": -2, "replace": True},
                  {"id": "s", "drop_previous_output": False}, {"id": "s", "rid": None, "offset": 10**30},
                  {"id": ["x"]}, {"id": 5}, {"id": {"a": 1}}, {"id": "s", "rid": ["r"]}, {"id": "s", "offset": "abc"},
                  {"id": "s", "offset": 2.0}, {"id": "s", "offset": True}, {"id": "s", "replace": 1},
                  {"id": "s", "drop_previous_output": "yes"}, {"id": "s", "bogus": 1}]


@pytest.mark.parametrize("params", _SESSION_CASES)
def test_session_params_have_the_types_sglangs_session_params_declares(params):
    """SGLang passes session_params to the scheduler as given (SessionParams(**d) is a msgspec Struct, which checks no
    types): {"id": ["x"]} ended the server (unhashable session lookup), {"offset": "abc"} too (a slice index),
    breaker probe. Oracle: msgspec's own validation of the same values against SessionParams'
    declared field types, and SessionParams(**d) for the keys."""
    import msgspec
    from sglang.srt.managers.io_struct import SessionParams

    try:
        msgspec.convert(msgspec.to_builtins(SessionParams(**params)), SessionParams)
        valid = True
    except (TypeError, msgspec.ValidationError):
        valid = False
    body = req(input_ids=[5, 6], session_params=params)
    if valid:
        check_shape(body, LIMITS)
    else:
        assert "session_params" in refused(check_shape, body, LIMITS)


def test_positional_embed_overrides_from_json_are_refused():
    """The scheduler reads `.positions` and `.embeds` of a PositionalEmbeds; a JSON value (the field is typed Any)
    reached it as an int, dict or list and ended the server (AttributeError in prepare_for_extend; breaker
    probe). Oracle: the attribute the scheduler reads; SGLang's own /v1/score objects still pass."""
    import torch
    from sglang.srt.managers.embed_types import PositionalEmbeds

    from sglang.srt.managers.io_struct import GenerateReqInput

    score = PositionalEmbeds(embeds=[torch.zeros(4)], positions=[1])  # as tokenizer_manager_score_mixin builds it
    # A single prompt's value reaches the scheduler as given: it reads `.positions` of it (a list of None too: [],
    # [None] were let through once, found by review)
    for value in (1, {"positions": [0], "embeds": [[0.1]]}, [[0.1, 0.2]], "x", [None, 3], [], [None], [score]):
        assert not hasattr(value, "positions")  # the scheduler would raise
        assert "positional_embed_overrides" in refused(check_shape, req(input_ids=[5, 6],
                                                                        positional_embed_overrides=value), LIMITS)
    check_shape(req(input_ids=[5, 6], positional_embed_overrides=score), LIMITS)
    # A batch's list is indexed per prompt by SGLang's own split (oracle): one entry (object or None) per prompt
    two = [[5, 6], [7]]
    for ids, value, ok in (([[5, 6]], [score], True), (two, [None, score], True), (two, score, True),
                           (two, [score], False), (two, [None, score, None], False), (two, [None, 3], False),
                           (two, 3, False)):
        batch = GenerateReqInput(input_ids=ids, positional_embed_overrides=value)
        if ok:
            check_shape(batch, LIMITS)
            batch.normalize_batch_and_arguments()
            items = [batch[i].positional_embed_overrides for i in range(batch.batch_size)]
            assert all(v is None or hasattr(v, "positions") for v in items)
        else:
            assert "positional_embed_overrides" in refused(check_shape, batch, LIMITS)


@pytest.mark.parametrize("fields", [dict(text="hi", extra_key="k"), dict(text="hi", extra_key=["a", "b"]),
                                    dict(text="hi", extra_key=["a"]), dict(input_ids=[5, 6], extra_key=["a"]),
                                    dict(text=["a", "b"], extra_key=["x", "y"]), dict(text=["a", "b"], extra_key="x"),
                                    dict(text="hi", extra_key=["a"], sampling_params={"n": 2}),
                                    dict(text="hi", extra_key=["a", "b"], sampling_params={"n": 2}),
                                    dict(text=["a", "b"], extra_key=["x", ["y"]])])
def test_extra_key_reaches_the_radix_cache_hashable(fields):
    """SGLang normalizes extra_key only for a batch: a single prompt's list reached the radix cache's key and ended the
    server (TypeError: unhashable type: 'list' in RadixCache.match_prefix; breaker probe). Oracle: SGLang's
    own normalization, then the extra_key each request it sends carries must be hashable (None or a string)."""
    body = req(**fields)
    try:
        oracle = req(**fields)
        oracle.normalize_batch_and_arguments()
        sent = [oracle.extra_key] if oracle.is_single else [oracle[i].extra_key for i in range(oracle.batch_size)]
        valid = all(k is None or isinstance(k, str) for k in sent)
    except ValueError:  # SGLang refuses it itself (HTTP 400)
        valid = False
    if valid:
        check_shape(body, LIMITS)
    else:
        assert "extra_key must be" in refused(check_shape, body, LIMITS)


@pytest.mark.parametrize("fields", [dict(text="hi", lora_id="a"), dict(text="hi", lora_id=["a", "b"]),
                                    dict(input_ids=[5], lora_id=["a"]), dict(text=["a", "b"], lora_id=["x", None]),
                                    dict(text=["a", "b", "c"], lora_id="x"), dict(text=["a", "b"], lora_id=["x"]),
                                    dict(text="hi", lora_id=["a"], sampling_params={"n": 2})])
def test_lora_id_reaches_the_scheduler_as_a_string_per_request(fields):
    """Without LoRA, the client's lora_id reaches the scheduler, which appends it to extra_key: a single prompt's list
    ended the server (TypeError in Req.__init__; breaker probe). Oracle: SGLang's own normalization and
    per-item split (obj[i]), then each request's lora_id must be None or a string that is the one given for it."""
    body = req(**fields)
    try:
        oracle = req(**fields)
        oracle.normalize_batch_and_arguments()
        given = fields["lora_id"]
        if oracle.is_single:
            valid = isinstance(oracle.lora_id, str)
        else:
            per_prompt = given if isinstance(given, list) else None
            sent = [oracle[i].lora_id for i in range(oracle.batch_size)]
            valid = per_prompt is not None and len(per_prompt) == len(sent) and all(
                s == per_prompt[i] and (s is None or isinstance(s, str)) for i, s in enumerate(sent))
    except (ValueError, IndexError):
        valid = False
    if valid:
        check_shape(body, LIMITS)
    else:
        assert "lora_id must be" in refused(check_shape, body, LIMITS)
