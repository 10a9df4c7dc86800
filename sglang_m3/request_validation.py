"""Checks on a generate request before SGLang sends it to the scheduler: refuse what the model or the scheduler
cannot serve, with a message naming the field (and the item of a batch, the id and its position).

SGLang 0.5.17's tokenizer manager turns a `ValueError` raised while it prepares a request into HTTP 400 (native
`/generate`: `http_server.generate_request` → `_create_error_response`; OpenAI routes: `OpenAIServingBase.
handle_request`), and a streamed `/generate` into an in-stream error event with code 400. Anything else a bad
field raises there (TypeError from `SamplingParams(**params)` or from comparing a string with an int) becomes a
500, and what reaches the scheduler unchecked can end it: an id outside the vocabulary is an out-of-range
embedding read (IndexError on CPU, a CUDA fault on a GPU), an empty prompt inside a batch is a zero-token extend,
a request with input_embeds batched with token-id requests is a shape error.
SGLang has `TokenizerManager._validate_input_ids_in_vocab` but never calls it (issue 8).

The plugin calls `check_request` from two places (sglang_m3/plugin.py): once per item of a batch before any item
is sent (SGLang sends a text batch item by item, so a bad item 3 would otherwise follow items 0-2 into the
scheduler), and from `TokenizerManager._validate_one_request` with the final token ids (after tokenization or the
chat template). What SGLang already refuses cleanly (temperature/top_p ranges, prompt + max_new_tokens past the
context, token_ids_logprob ids) is left to it; this module only adds what it misses.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

with warnings.catch_warnings():  # (the module SGLang sizes stop regexes with; `re._parser` since Python 3.11)
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_parse


class M3RequestError(ValueError):
    """A request refused before it reaches the scheduler (a ValueError, so SGLang answers HTTP 400)."""


@dataclass(frozen=True)
class Limits:
    """What the served model accepts: ids in [0, vocab_size); `grammar_refusal`: why this server cannot constrain
    decoding (None: it can), the message a grammar request gets; `grammar_backend`: the server's
    --grammar-backend, whose own parser judges a `regex` grammar where we can call it (llguidance);
    `preferred_sampling_params`: the server's --preferred-sampling-params, under each request's own (a temperature
    there bounds a request's logit_bias as its own would)."""

    vocab_size: int
    grammar_refusal: Optional[str] = None
    grammar_backend: Optional[str] = None
    preferred_sampling_params: Optional[dict] = None


# SamplingParams (sglang/srt/sampling/sampling_params.py) API fields by the type it needs; None means "default".
_INT_FIELDS = ("max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval", "sampling_seed")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")
_GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
_OTHER_FIELDS = ("stop", "stop_regex", "stop_token_ids", "logit_bias", "custom_params")
# The scheduler packs these into torch tensors for the whole batch (sglang/srt/sampling/sampling_batch_info.py:
# top_k int32; penaltylib/min_new_tokens.py: int32; temperature, top_p, min_p and the logit_bias rows float32). A
# value that does not fit raised there ("value cannot be converted to type int32 without overflow"), inside the
# scheduler, which ended the server and every request in flight (top_k 2**31, logit_bias 1e39); so they are bounded
# here. Floats above the float32 range would become inf (temperature) or raise (logit_bias): one bound for all.
_INT32_FIELDS = ("top_k", "min_new_tokens")
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
SAMPLING_EPS = 1e-6  # sglang/srt/sampling/sampling_params.py _SAMPLING_EPS: a temperature below it means greedy
# Parallel samples per request. SGLang's tokenizer manager copies a request n times (GenerateReqInput.
# normalize_batch_and_arguments) with no bound; each copy is a request of its own. One request with n = 10**6 on the
# tiny CPU server queued ~10**6 requests ahead of every other: the next requests timed out for minutes, and
# n = 10**9 would have to be materialised in the tokenizer manager first. Our limit, not SGLang's or the model's:
# large enough for best-of-n sampling, small enough that one request cannot crowd out the others. With n > 1 it
# bounds a batch's prompts × n too (check_shape).
MAX_PARALLEL_SAMPLES = 128
# Stop strings and regexes. SGLang's scheduler checks them after every decoded token of the request, in its own
# thread (sglang/srt/managers/schedule_batch.py, `Req.check_finished`), over `tail`: the decoded text of the last
# (longest stop string in tokens, or longest regex match as sized by
# `sglang.srt.sampling.sampling_params.get_max_seq_length`) + 1 tokens; a regex it cannot size (`*`, `+`, `{m,}`,
# a lookaround) makes the tail the whole output. Python's `re` backtracks: a search may try every way the pattern
# can match at every position of the tail. "(a|a)*c" on 34 generated "a"s froze the tiny CPU server's scheduler for
# over ten minutes (health checks failed, every request stalled; session 18's newcomer probe), "(?:.|.)" written
# out 30 times needs 2**30 tries per position. So a stop regex must be short, have a longest match SGLang can size
# and that is at most STOP_REGEX_MAX_WIDTH characters, and its ways to match × (longest match + 1) -- an upper
# bound on a backtracking search's steps per tail position for the constructs left (no lookarounds or
# backreferences) -- must stay within STOP_REGEX_MAX_WORK, and within STOP_MAX_REQUEST_WORK over all of a
# request's patterns and its n copies. Our limits, not SGLang's.
STOP_MAX_STRINGS = 64            # stop strings, and stop regexes, per request
STOP_MAX_CHARS = 256             # characters of one stop string or one regex's source
STOP_REGEX_MAX_WIDTH = 256       # characters of the longest match, as get_max_seq_length counts them
STOP_REGEX_MAX_WORK = 4096       # ways to match × (longest match + 1), per pattern
STOP_MAX_REQUEST_WORK = 16384    # n × the sum over a request's patterns
_REPEATS = frozenset({sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT})
# The node types get_max_seq_length sizes (any other it sizes as unbounded, logging a warning each time).
_SIZED = frozenset({sre_parse.LITERAL, sre_parse.IN, sre_parse.ANY, sre_parse.SUBPATTERN, sre_parse.BRANCH,
                    sre_parse.AT}) | _REPEATS
SAMPLING_FIELDS = frozenset(_INT_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS + _GRAMMAR_FIELDS + _OTHER_FIELDS)


def _where(item: Optional[int]) -> str:
    return "" if item is None else f" (batch item {item})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_float32(v: Any) -> bool:
    """A number that a float32 holds without overflow (finite, |v| <= float32 max)."""
    return _is_number(v) and math.isfinite(v) and abs(v) <= _FLOAT32_MAX


def check_token_ids(input_ids: Sequence[int], vocab_size: int, field: str = "input_ids",
                    item: Optional[int] = None) -> None:
    """Every id an int in [0, vocab_size). Raises M3RequestError naming the first bad id and its position.
    The fast path (the set of the ids' types, min, max) runs in C: ~4 ms for a 128K-token prompt; the position is
    searched only on failure. Types first: min/max alone let a bool or a float between two ints through
    (`[1, true, 5]` would be served as [1, 1, 5])."""
    if not input_ids:
        raise M3RequestError(f"{field} is empty{_where(item)}: a prompt needs at least one token")
    if set(map(type, input_ids)) == {int} and 0 <= min(input_ids) and max(input_ids) < vocab_size:
        return
    for pos, tok in enumerate(input_ids):
        if not _is_int(tok):
            raise M3RequestError(f"{field}[{pos}]{_where(item)} is {tok!r}: token ids must be integers")
        if not 0 <= tok < vocab_size:
            raise M3RequestError(f"{field}[{pos}]{_where(item)} = {tok} is outside the vocabulary "
                                 f"[0, {vocab_size})")


def check_sampling_params(params: Any, vocab_size: int, item: Optional[int] = None,
                          grammar_refusal: Optional[str] = None, grammar_backend: Optional[str] = None) -> None:
    """Types of the SamplingParams fields, unknown keys, and ids inside them (stop_token_ids, logit_bias keys);
    grammar strings must be strings, a JSON schema must parse and a regex must compile (`_check_grammar_regex`:
    in the syntax of `grammar_backend`, Limits.grammar_backend); with `grammar_refusal` (Limits.grammar_refusal)
    any grammar at all is refused with that message."""
    where = _where(item)
    if params is None:
        return
    if not isinstance(params, dict):
        raise M3RequestError(f"sampling_params{where} must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        raise M3RequestError(f"sampling_params{where} has unknown field(s) {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    for name in _INT_FIELDS:
        v = params.get(name)
        if v is not None and not _is_int(v):
            # (JSON integers beyond 64 bits reach us as floats: say so rather than "not an integer")
            big = isinstance(v, float) and v.is_integer() and abs(v) > _INT64_MAX
            raise M3RequestError(f"sampling_params.{name}{where} must be an integer"
                                 + (" within the 64-bit range" if big else "") + f", got {v!r}")
        if v is not None and name in _INT32_FIELDS and not -_INT32_MAX - 1 <= v <= _INT32_MAX:
            hint = "; a top_k at or above the vocabulary size means all of it" if name == "top_k" else ""
            raise M3RequestError(f"sampling_params.{name}{where} = {v} does not fit the int32 the sampler uses "
                                 f"(at most {_INT32_MAX}{hint})")
        if v is not None and not -_INT64_MAX - 1 <= v <= _INT64_MAX:  # (an int literal up to 2**64 - 1 parses as an int)
            raise M3RequestError(f"sampling_params.{name}{where} = {v} is outside the 64-bit integer range")
    for name in _FLOAT_FIELDS:
        v = params.get(name)
        if v is not None and not _is_float32(v):
            raise M3RequestError(f"sampling_params.{name}{where} must be a finite float32 number "
                                 f"(|x| <= {_FLOAT32_MAX:.4g}), got {v!r}")
    for name in _BOOL_FIELDS:
        v = params.get(name)
        if v is not None and not isinstance(v, bool):
            raise M3RequestError(f"sampling_params.{name}{where} must be true or false, got {v!r}")
    stops = {}
    for name in ("stop", "stop_regex"):
        v = params.get(name)
        if v is not None and not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            raise M3RequestError(f"sampling_params.{name}{where} must be a string or a list of strings, got {v!r}")
        stops[name] = [v] if isinstance(v, str) else (v or [])
        if len(stops[name]) > STOP_MAX_STRINGS:
            raise M3RequestError(f"sampling_params.{name}{where} has {len(stops[name])} entries (at most "
                                 f"{STOP_MAX_STRINGS})")
    for s in stops["stop"]:
        if len(s) > STOP_MAX_CHARS:
            raise M3RequestError(f"sampling_params.stop{where} {_short(s)} is longer than {STOP_MAX_CHARS} characters "
                                 "(SGLang decodes that many tokens of the output again after every token)")
    n = params.get("n")
    if "n" in params and n is None:  # (SGLang's parallel sampling compares it with 1: a TypeError, HTTP 500)
        raise M3RequestError(f"sampling_params.n{where} must be an integer between 1 and {MAX_PARALLEL_SAMPLES}, "
                             "got null (leave it out for 1)")
    if n is not None and not 1 <= n <= MAX_PARALLEL_SAMPLES:
        raise M3RequestError(f"sampling_params.n{where} must be between 1 and {MAX_PARALLEL_SAMPLES} (parallel "
                             f"samples per request on this server), got {n}")
    work = sum(stop_regex_work(p, f"sampling_params.stop_regex{where}") for p in stops["stop_regex"]) * (n or 1)
    if work > STOP_MAX_REQUEST_WORK:
        raise M3RequestError(f"sampling_params.stop_regex{where}: {len(stops['stop_regex'])} pattern(s) × n = "
                             f"{n or 1} add up to {work} search steps per output position after every token (at "
                             f"most {STOP_MAX_REQUEST_WORK}); use fewer or simpler patterns, or a smaller n")
    interval = params.get("stream_interval")
    if interval is not None and interval < 1:
        raise M3RequestError(f"sampling_params.stream_interval{where} must be at least 1, got {interval}")
    stop_ids = params.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise M3RequestError(f"sampling_params.stop_token_ids{where} must be a list of token ids")
        if stop_ids:
            check_token_ids(stop_ids, vocab_size, "sampling_params.stop_token_ids", item)
    bias = params.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise M3RequestError(f"sampling_params.logit_bias{where} must be an object {{token id: bias}}")
        for key, value in bias.items():
            if not (isinstance(key, str) and re.fullmatch(r"-?\d+", key)) and not _is_int(key):
                raise M3RequestError(f"sampling_params.logit_bias{where} key {key!r} is not a token id")
            if not 0 <= int(key) < vocab_size:
                raise M3RequestError(f"sampling_params.logit_bias{where} key {key} is outside the vocabulary "
                                     f"[0, {vocab_size})")
            if not _is_float32(value):
                raise M3RequestError(f"sampling_params.logit_bias[{key}]{where} must be a finite float32 number "
                                     f"(|x| <= {_FLOAT32_MAX:.4g}), got {value!r}")
        # The sampler adds the bias to the logits, then divides by the temperature (sglang/srt/layers/sampler.py)
        # in float32: a bias that fits can still overflow there to inf, the probabilities become NaN and the
        # scheduler's multinomial draw raises, ending the server (bias 3e38 at temperature 0.5). Below
        # SAMPLING_EPS the request is greedy and nothing is divided.
        temperature = params.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        if SAMPLING_EPS <= temperature < 1.0:
            for key, value in bias.items():
                if abs(value) / temperature > _FLOAT32_MAX:
                    raise M3RequestError(
                        f"sampling_params.logit_bias[{key}]{where} = {value!r} divided by temperature "
                        f"{temperature!r} leaves the float32 range the sampler works in (|bias| / temperature "
                        f"<= {_FLOAT32_MAX:.4g})")
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise M3RequestError(f"sampling_params.custom_params{where} must be a JSON object")
    grammars = [name for name in _GRAMMAR_FIELDS if params.get(name) not in (None, "")]
    for name in grammars:
        if not isinstance(params[name], str):
            raise M3RequestError(f"sampling_params.{name}{where} must be a string, got {type(params[name]).__name__}")
    if len(grammars) > 1:
        raise M3RequestError(f"sampling_params{where} sets {grammars}: at most one of json_schema, regex, ebnf, "
                             "structural_tag")
    if "json_schema" in grammars:
        try:
            json.loads(params["json_schema"])
        except ValueError as e:
            raise M3RequestError(f"sampling_params.json_schema{where} is not valid JSON: {e}") from None
    if "regex" in grammars:
        _check_grammar_regex(params["regex"], f"sampling_params.regex{where}", grammar_backend)
    if grammars and grammar_refusal:
        raise M3RequestError(grammar_refusal)
    # min_new_tokens masks the stop tokens until that many are out; once a grammar's match is complete it allows
    # only those, so every token is masked, the probabilities are NaN and the scheduler's multinomial draw raises,
    # ending the server (regex "a" with min_new_tokens 5). Whether a grammar can end early is not decidable here.
    if grammars and (params.get("min_new_tokens") or 0) > 0:
        raise M3RequestError(f"sampling_params{where}: min_new_tokens (min_tokens on the OpenAI routes) cannot be "
                             f"combined with a grammar ({grammars[0]}; also what response_format, a strict tool or "
                             "tool_choice 'required' or a named function ask for): once the grammar's match is "
                             "complete only a stop token is allowed, which min_new_tokens forbids (leave "
                             "min_new_tokens out, or make the grammar ask for the length)")


def _check_grammar_regex(pattern: str, field: str, grammar_backend: Optional[str]) -> None:
    """A `regex` grammar, in the syntax of the backend that compiles it. llguidance parses Rust regex syntax, which
    Python's `re` refuses in part (`\\p{Lu}`, `\\x{41}`, `(?<name>...)`, `\\z`, `a**`): on an llguidance server,
    llguidance's own validator judges (its message in the 400; the same check SGLang's GuidanceBackend would fail
    the request with later). Other backends: Python's `re` (`_compile`), which is stricter than they are on what
    matters (unbalanced groups, deep nesting, repeat counts past 2**32 that xgrammar reads as {0,0})."""
    if grammar_backend == "llguidance":
        import llguidance

        try:
            error = llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("regex", pattern)).strip()
        except UnicodeError as e:  # a lone surrogate ("\ud800" in the JSON) does not encode for its parser
            raise M3RequestError(f"{field} {_short(pattern)} is not valid Unicode: {e.reason}") from None
        if error:  # (its "error: ..." line says why; the rest repeats the pattern with a caret under it)
            lines = error.splitlines()
            reason = next((line for line in lines if line.startswith("error:")), lines[0])
            raise M3RequestError(f"{field} {_short(pattern)} is not a valid regular expression for the llguidance "
                                 f"grammar backend: {reason[:200]}")
        return
    _compile(pattern, field)


def _compile(pattern: str, field: str) -> None:
    # Python's `re` is stricter than no grammar backend on what a regex is: unbalanced groups, bad escapes and
    # dangling quantifiers fail in every backend too. A repeat count past 2**32 raises OverflowError and a few
    # hundred nested groups RecursionError, not re.error.
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise M3RequestError(f"{field} {_short(pattern)} is not a valid regular expression: "
                             f"{type(e).__name__}: {_short(str(e))}") from None


def _short(text: str, limit: int = 80) -> str:
    """repr(text), cut to `limit` characters with the full length named (a message must not echo 100 KB)."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def _nodes(pattern):
    """Every (op, av) node of a parsed regex (sre_parse), depth first, through the node types in _SIZED."""
    for op, av in pattern:
        yield op, av
        if op == sre_parse.SUBPATTERN:
            yield from _nodes(av[3])
        elif op == sre_parse.BRANCH:
            for alternative in av[1]:
                yield from _nodes(alternative)
        elif op in _REPEATS:
            yield from _nodes(av[2])


def _ways(pattern, cap: int) -> int:
    """How many ways `pattern` (parsed, node types in _SIZED only) can match, counted up to `cap`: a sequence
    multiplies its parts' counts, an alternation adds its alternatives', {m,n} over X sums count(X)**k for k = m..n
    (choices of repetition count and, per repetition, of the way X matches)."""
    total = 1
    for op, av in pattern:
        if op == sre_parse.SUBPATTERN:
            ways = _ways(av[3], cap)
        elif op == sre_parse.BRANCH:
            ways = min(cap, sum(_ways(alternative, cap) for alternative in av[1]))
        elif op in _REPEATS:
            lo, hi, body = av
            inner = _ways(body, cap)
            if inner == 1:  # only the repetition count is chosen
                ways = min(cap, hi - lo + 1)
            else:  # (stops within log2(cap) + lo rounds: the sum reaches cap or k passes hi)
                ways, power = 0, 1
                for k in range(hi + 1):
                    if k >= lo:
                        ways = min(cap, ways + power)
                    if ways >= cap:
                        break
                    power = min(cap, power * inner)
        else:
            ways = 1
        total = min(cap, total * ways)
    return total


def stop_regex_work(pattern: str, field: str = "stop_regex") -> int:
    """Check one stop regex and return its work (ways to match × (longest match + 1), see STOP_REGEX_MAX_WORK).
    Raises M3RequestError for a source over STOP_MAX_CHARS, an invalid regex, a construct SGLang cannot size, a
    longest match over STOP_REGEX_MAX_WIDTH characters, work over STOP_REGEX_MAX_WORK."""
    from sglang.srt.sampling.sampling_params import MAX_LEN, get_max_seq_length

    if len(pattern) > STOP_MAX_CHARS:
        raise M3RequestError(f"{field} {_short(pattern)} is longer than {STOP_MAX_CHARS} characters")
    _compile(pattern, field)
    try:
        tree = sre_parse.parse(pattern)
        unsized = sorted({str(op) for op, _ in _nodes(tree) if op not in _SIZED})
        width = 0 if unsized else get_max_seq_length(pattern)
    except RecursionError:
        raise M3RequestError(f"{field} {_short(pattern)} nests groups too deeply") from None
    if unsized or width > STOP_REGEX_MAX_WIDTH:
        size = (f"cannot size its longest match ({', '.join(unsized)})" if unsized
                else "sizes its longest match as unbounded" if width >= MAX_LEN
                else f"sizes its longest match as {width} characters")
        raise M3RequestError(
            f"{field} {_short(pattern)}: SGLang {size} and re-searches that much of the output after every token; "
            f"give it a longest match of at most {STOP_REGEX_MAX_WIDTH} characters (bounded repetitions {{m,n}} "
            "in place of *, + or {m,}; no lookarounds or backreferences; [^\\n\\r] or . in place of a negated "
            "single character [^x], which SGLang cannot size)")
    work = _ways(tree, STOP_REGEX_MAX_WORK + 1) * (width + 1)
    if work > STOP_REGEX_MAX_WORK:
        raise M3RequestError(
            f"{field} {_short(pattern)} can match in too many ways for its length (ways × (longest match {width} + "
            f"1) > {STOP_REGEX_MAX_WORK}): SGLang's backtracking search may try each way at every position of the "
            "output after every token; use fewer optional parts, alternatives or repetition counts")
    return work


# what the OpenAI routes call the field they map to top_logprobs_num (the message names both)
_TOP_LOGPROBS_NAMES = "OpenAI chat: top_logprobs; completions: logprobs"


def check_logprob_params(req, prompt_len: Optional[int], vocab_size: int, item: Optional[int] = None) -> None:
    """`req` is one (already split) GenerateReqInput. logprob_start_len in {-1} ∪ [0, prompt_len];
    top_logprobs_num in [0, vocab_size]. `prompt_len` None: not known yet (text before tokenization)."""
    where = _where(item)
    if req.return_logprob is not None and not isinstance(req.return_logprob, bool):
        raise M3RequestError(f"return_logprob{where} must be true or false, got {req.return_logprob!r}")
    start = req.logprob_start_len
    if start is not None:
        if not _is_int(start):
            raise M3RequestError(f"logprob_start_len{where} must be an integer, got {start!r}")
        if start < -1:
            raise M3RequestError(f"logprob_start_len{where} = {start}: use -1 (output tokens only) or a prompt "
                                 "position >= 0")
        if req.return_logprob and prompt_len is not None and start > prompt_len:
            raise M3RequestError(f"logprob_start_len{where} = {start} is past the prompt ({prompt_len} tokens)")
    top = req.top_logprobs_num
    if top is not None:
        if not _is_int(top):
            raise M3RequestError(f"top_logprobs_num{where} ({_TOP_LOGPROBS_NAMES}) must be an integer, got {top!r}")
        if not 0 <= top <= vocab_size:
            raise M3RequestError(f"top_logprobs_num{where} ({_TOP_LOGPROBS_NAMES}) = {top} is outside "
                                 f"[0, {vocab_size}] (the model's vocabulary)")


def check_request(req, limits: Limits, input_ids: Optional[Sequence[int]] = None, item: Optional[int] = None,
                  tokenized: bool = False) -> None:
    """One generate request (a single request, or one item of a batch as `obj[i]`). Raises M3RequestError.

    `input_ids`: the prompt's final token ids when `tokenized` (from `_validate_one_request`); otherwise the
    request's own fields are checked (ids given as ids, texts given as texts). `item` None: the batch item
    check_batch noted on `req`, if any."""
    if item is None:
        item = getattr(req, _BATCH_ITEM, None)
    if tokenized or req.input_ids is not None:
        ids = input_ids if tokenized else req.input_ids
        if ids is None or not isinstance(ids, (list, tuple)) and not hasattr(ids, "__len__"):
            raise M3RequestError(f"input_ids{_where(item)} must be a list of token ids")
        check_token_ids(ids, limits.vocab_size, "input_ids", item)
        prompt_len = len(ids)
    else:
        if not isinstance(req.text, str):
            raise M3RequestError(f"text{_where(item)} must be a string, got {type(req.text).__name__}")
        if not req.text:
            raise M3RequestError(f"text{_where(item)} is empty: a prompt needs at least one token")
        prompt_len = None
    own = req.sampling_params
    check = lambda params: check_sampling_params(  # noqa: E731
        params, limits.vocab_size, item, limits.grammar_refusal, limits.grammar_backend)
    if limits.preferred_sampling_params and (own is None or isinstance(own, dict)):
        try:  # what the scheduler will see: SGLang merges them so (tokenizer manager)
            check({**limits.preferred_sampling_params, **(own or {})})
        except M3RequestError as e:
            check(own)  # the request's own fault is reported as its own
            raise M3RequestError(f"{e} (with the server's --preferred-sampling-params "
                                 f"{json.dumps(limits.preferred_sampling_params)})") from None
    else:
        check(own)
    check_logprob_params(req, prompt_len, limits.vocab_size, item)


# The attribute check_batch sets on each item object: SGLang's `_validate_one_request(obj[i], ids)` sees the item alone,
# and a check that needs the token count (logprob_start_len of a text prompt) would not say which prompt it was.
# (obj[i] returns the same cached object each time: GenerateReqInput.__getitem__.)
_BATCH_ITEM = "_m3_batch_item"


def check_batch(obj, limits: Limits) -> None:
    """Every item of a normalized batch GenerateReqInput, before the first item is sent to the scheduler; notes
    each item's index on it for the check after tokenization."""
    for i in range(obj.batch_size):
        check_request(obj[i], limits, item=i)
        setattr(obj[i], _BATCH_ITEM, i)


_PER_ITEM_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num")


def check_shape(obj, limits: Limits) -> None:
    """The raw GenerateReqInput, before SGLang's `normalize_batch_and_arguments` indexes into it: exactly one
    prompt field of a form SGLang understands (no input_embeds), per-item lists
    (sampling_params, logprob fields) as long as the batch, typed sampling fields, no image/video/audio data
    (the text model is served). Raises M3RequestError (SGLang's normalization would raise TypeError/IndexError,
    i.e. HTTP 500, or silently drop the media)."""
    media = [name for name in ("image_data", "video_data", "audio_data") if getattr(obj, name, None)]
    if media:
        raise M3RequestError(f"{', '.join(media)}: sglang-m3 serves the text model of MiniMax-M3; image, video and "
                             "audio inputs are not supported")
    given = [name for name in ("text", "input_ids", "input_embeds") if getattr(obj, name) is not None]
    if not given:
        raise M3RequestError("the request has no prompt: give one of text, input_ids, input_embeds")
    if len(given) > 1:
        raise M3RequestError(f"the request gives {' and '.join(given)}: give exactly one prompt field")
    prompt = getattr(obj, given[0])
    if given[0] == "text":
        if isinstance(prompt, str):
            batch = None
            if not prompt:
                raise M3RequestError("text is empty: a prompt needs at least one token")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
            batch = len(prompt)
        else:
            raise M3RequestError("text must be a string or a non-empty list of strings")
    elif given[0] == "input_ids":
        if not isinstance(prompt, list):  # (e.g. SGLang's /api/chat hands on transformers 5's BatchEncoding)
            raise M3RequestError(f"input_ids must be a list of token ids or a list of lists of ids, got "
                                 f"{type(prompt).__name__}")
        if not prompt:
            raise M3RequestError("input_ids is empty: a prompt needs at least one token")
        batch = len(prompt) if isinstance(prompt[0], list) else None
        if batch is not None and not all(isinstance(row, list) for row in prompt):
            raise M3RequestError("input_ids mixes token ids and lists: give a list of ids or a list of lists of ids")
    else:
        # Seen in the fuzz campaign (CPU, --disable-radix-cache): SGLang 0.5.17 gives a prefill batch the
        # embeddings of its input_embeds requests in place of every request's tokens, so one batched with
        # token-id requests is a shape error that ends the scheduler.
        raise M3RequestError("input_embeds is not supported for MiniMax-M3 (SGLang 0.5.17 cannot batch it with "
                             "token-id requests); send input_ids or text")
    params = obj.sampling_params
    # SGLang reads n from sampling_params (a list's first object), and a single prompt with n > 1 becomes a batch of
    # one (_handle_parallel_sampling): a list of one sampling_params object, or of one rid, is then its per-prompt
    # list. With n = 1 a list stays a single prompt's sampling_params and reaches SamplingParams(**list) (TypeError,
    # HTTP 500). (n = 2.0 passes SGLang's `> 1` too: counted here, so the per-object check names n's type.)
    first = params[0] if isinstance(params, list) and params else params
    n = first.get("n") if isinstance(first, dict) else None
    prompts = batch if batch is not None else (
        1 if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 1 else None)
    if prompts is None and params is not None and not isinstance(params, dict):
        raise M3RequestError(f"sampling_params of a single prompt must be a JSON object (or, with n > 1, a list of "
                             f"one), got {type(params).__name__}")
    if prompts is not None and isinstance(params, list):
        if len(params) != prompts or not all(isinstance(p, dict) for p in params):
            raise M3RequestError(f"sampling_params is a list of {len(params)}: give one object per prompt "
                                 f"({prompts}) or a single object for all")
    elif params is not None and not isinstance(params, dict):
        raise M3RequestError(f"sampling_params must be a JSON object, got {type(params).__name__}")
    for i, p in enumerate(params if isinstance(params, list) else [params]):
        # here too, as SGLang's normalization reads `n` (a string there is a TypeError)
        check_sampling_params(p, limits.vocab_size, i if isinstance(params, list) else None,
                              grammar_backend=limits.grammar_backend)
    # With n > 1, MAX_PARALLEL_SAMPLES bounds the sequences of the whole request: a batch of prompts is copied n times
    # as well (100 prompts × n = 100 on the tiny CPU server: 10,000 sequences, 102 s during which the next chat
    # waited 95 s; session 18's newcomer probe). A batch with n = 1 is the client's own list of requests (offline
    # Engine.generate batches), no more than sending them one by one.
    ns = [(p or {}).get("n") or 1 for p in (params if isinstance(params, list) else [params])]
    sequences = sum(ns) if isinstance(params, list) else (batch or 1) * ns[0]
    if max(ns) > 1 and sequences > MAX_PARALLEL_SAMPLES:
        raise M3RequestError(f"the request asks for {sequences} sequences ({batch} prompts, n = "
                             f"{ns[0] if len(set(ns)) == 1 else ns}): at most {MAX_PARALLEL_SAMPLES} per request on "
                             "this server (prompts × n); send the prompts as separate requests")
    # rid: a single prompt's list of rids reached SGLang's request table as a dict key (TypeError: HTTP 500).
    # extra_key: SGLang normalizes it only for a batch; a single prompt's list reached the scheduler's radix cache as
    # part of a hash key (TypeError: unhashable type: 'list' in RadixCache.match_prefix), which ended the server and
    # every request in flight (breaker probe).
    for name in ("rid", "extra_key"):
        value = getattr(obj, name, None)
        if value is not None and not isinstance(value, str) and not (
                prompts and isinstance(value, list) and len(value) == prompts
                and all(isinstance(v, str) for v in value)):
            form = (f"a string or a list of one string per prompt ({prompts})" if prompts
                    else "a string for a single prompt")
            raise M3RequestError(f"{name} must be {form}, got {_short(json.dumps(value, default=str))}")
    # lora_id (set by the tokenizer manager from lora_path when LoRA is on; otherwise the client's value reaches the
    # scheduler, which appends it to extra_key): a single prompt's list ended the server (TypeError: can only
    # concatenate str (not "list") to str, in Req.__init__; breaker probe); a batch's string is indexed
    # per item (obj[i].lora_id = lora_id[i]: one character, or IndexError).
    lora_id = getattr(obj, "lora_id", None)
    if lora_id is not None and not (isinstance(lora_id, str) and not prompts) and not (
            prompts and isinstance(lora_id, list) and len(lora_id) == prompts
            and all(v is None or isinstance(v, str) for v in lora_id)):
        form = (f"a list of one string (or null) per prompt ({prompts})" if prompts
                else "a string for a single prompt")
        raise M3RequestError(f"lora_id must be {form}, got {_short(json.dumps(lora_id, default=str))}")
    for name in _PER_ITEM_FIELDS:
        value = getattr(obj, name)
        if isinstance(value, list) and (batch is None or len(value) != batch):
            raise M3RequestError(f"{name} is a list of {len(value)}: give one value per prompt "
                                 f"({batch or 'a single prompt takes a single value'})")
    check_scheduler_passthrough(obj, prompts)


# session_params: SGLang's SessionParams fields and the type each declares (sglang/srt/managers/io_struct.py).
_SESSION_FIELDS = {"id": str, "rid": str, "offset": int, "replace": bool, "drop_previous_output": bool}
_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def check_scheduler_passthrough(obj, prompts: int | None = None) -> None:
    """GenerateReqInput fields that SGLang 0.5.17 hands to the scheduler as the JSON gave them (the request is
    pickled; FastAPI types the field only as a dict or `Any`, and SessionParams(**d), a msgspec Struct, checks no
    types). A wrong type raised inside the scheduler's loop, which ended the server and every request in flight
    (breaker probe):
    - `positional_embed_overrides` (typed Any): 1 → `AttributeError: 'int' object has no attribute 'positions'` in
      ScheduleBatch.prepare_for_extend. SGLang's /v1/score sets it itself, to PositionalEmbeds objects, which JSON
      cannot express: only those pass (for a batch of `prompts`, also a list of one object or None per prompt).
    - `session_params`: {"id": ["x"]} → `TypeError: unhashable type: 'list'` (the session lookup), {"id": s, "rid": r,
      "offset": "abc"} → `TypeError: slice indices must be integers` (SessionController). Each field must have the
      type SessionParams declares, and no other key (SessionParams(**d) raised TypeError on one: HTTP 500)."""
    overrides = getattr(obj, "positional_embed_overrides", None)
    if overrides is not None:
        from sglang.srt.managers.embed_types import PositionalEmbeds

        # A single prompt's value reaches the scheduler as given (so [] or [null] raised there too); a batch's list
        # is indexed per prompt (GenerateReqInput._get_positional_embed_overrides_item), so it needs one entry each.
        ok = isinstance(overrides, PositionalEmbeds) or (
            prompts is not None and isinstance(overrides, list) and len(overrides) == prompts
            and all(o is None or isinstance(o, PositionalEmbeds) for o in overrides))
        if not ok:
            raise M3RequestError(
                f"positional_embed_overrides {_short(json.dumps(overrides, default=str))} is not supported in a "
                "generate request: SGLang sets it internally (/v1/score's embed overrides); leave it out")
    params = getattr(obj, "session_params", None)
    if params is None:
        return
    if not isinstance(params, dict):
        raise M3RequestError(f"session_params must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(_SESSION_FIELDS))
    if unknown:
        raise M3RequestError(f"session_params has unknown field(s) {unknown}; known: {sorted(_SESSION_FIELDS)}")
    for name, kind in _SESSION_FIELDS.items():
        value = params.get(name)
        if value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else _is_int(value) if kind is int else isinstance(value, str)
        if not ok:
            raise M3RequestError(f"session_params.{name} must be {_TYPE_WORDS[kind]} (or null), got "
                                 f"{_short(json.dumps(value, default=str))}")
