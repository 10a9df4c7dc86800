"""Tokenizer files of the tiny MiniMax-M3 checkpoints (M3_SPEC §5): a byte-level tokenizer (one token per byte)
carrying M3's special strings, and the chat template (`chat_template.jinja`, shipped with the package).
Token ids are small (256..), so the configs' bos/eos ids are the tiny tokenizer's, not 200034/200020.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# The chat template (M3_SPEC §5, a reconstruction); its comment header documents the layout and open decisions.
CHAT_TEMPLATE = resources.files("sglang_m3").joinpath("chat_template.jinja").read_text(encoding="utf-8").strip()

BOS = "]~!b["        # BOD, conversation start (release id 200034)
ROLE = "]~b]"        # role prefix (200019)
EOS = "[e~["         # end of message = EOS (200020)
THINK_OPEN, THINK_CLOSE = "<mm:think>", "</mm:think>"   # 200059 / 200060
NS = "]<]minimax[>["  # tool-call namespace token
IMAGE, VIDEO = "]<]image[>[", "]<]video[>["            # 200025 / 200026
# brackets around expanded image placeholders (transformers' MiniMaxM3VLProcessor inserts them)
IMAGE_START, IMAGE_END = "]<]start of image[>[", "]<]end of image[>["

# (content, special). "special" tokens are dropped by skip_special_tokens=True. The think tags and the
# namespace token must stay visible in decoded text: SGLang's minimax-m3 reasoning and tool-call parsers
# look for them there. The release's relative id order is kept (]~b] 200019 < [e~[ 200020 < image 200025 <
# video 200026 < ]~!b[ 200034 < <think> 200050 < <mm:think> 200059); the bracket and NS ids are not known.
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    (ROLE, True),
    (EOS, True),
    (IMAGE, True),
    (VIDEO, True),
    (IMAGE_START, True),
    (IMAGE_END, True),
    (BOS, True),
    ("<think>", False),
    ("</think>", False),
    (THINK_OPEN, False),
    (THINK_CLOSE, False),
    (NS, False),
]
BYTE_TOKENS = 256
PRINTABLE_BYTES = frozenset([ord("\n")] + list(range(32, 127)))  # the bytes the tiny model emits


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map, which the tokenizers ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_ids() -> dict[str, int]:
    """Id of every special string (byte b has id b)."""
    return {content: BYTE_TOKENS + i for i, (content, _) in enumerate(SPECIAL_TOKENS)}


def filler_token(token_id: int) -> str:
    """Text of filler id `token_id` (past the byte and special ids): a word, so every id decodes to visible text."""
    return f" w{token_id}"


def build_tokenizer(vocab_size: int | None = None):
    """A ``tokenizers.Tokenizer``: id b = byte b (no merges), then the special strings in SPECIAL_TOKENS order.
    No post-processor: BOS comes from the chat template, never added implicitly.

    vocab_size: fill the vocabulary up to this many ids with filler words (`filler_token`), which text never
    encodes to but which decode as visible text. For dummy-weight benchmark checkpoints: SGLang's serving
    benchmark draws random-ids prompts from ``tokenizer.vocab_size`` ids (a few hundred ids make its prompts
    periodic and mostly identical, hence radix-cache hits) and stamps TTFT at the first non-empty text (a model
    emitting ids the tokenizer lacks shows none for many steps). Raises ValueError when smaller than the
    byte + special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = _bytes_to_unicode()
    vocab = {ch: b for b, ch in chars.items()}
    if vocab_size is not None:
        first = BYTE_TOKENS + len(SPECIAL_TOKENS)
        if vocab_size < first:
            raise ValueError(f"vocab_size {vocab_size} < the {first} byte and special tokens")
        # the special strings keep their ids inside the model's vocabulary (added below, they reuse these entries)
        vocab.update({content: i for content, i in token_ids().items()})
        vocab.update({"".join(chars[b] for b in filler_token(i).encode()): i for i in range(first, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges the split is irrelevant, and no space handling sneaks in.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for content, special in SPECIAL_TOKENS:  # one at a time so ids follow the list order
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    ids = token_ids()
    for content, _ in SPECIAL_TOKENS:
        assert tok.token_to_id(content) == ids[content], content
    return tok


def tokenizer_config(chat_template: str, model_max_length: int) -> dict:
    ids = token_ids()
    return {
        "added_tokens_decoder": {
            str(ids[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": special}
            for content, special in SPECIAL_TOKENS
        },
        "bos_token": BOS,
        "eos_token": EOS,
        # the remaining special (skipped-on-decode) strings, so all_special_ids lists them too
        "extra_special_tokens": [c for c, special in SPECIAL_TOKENS if special and c not in (BOS, EOS)],
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        # Understood by transformers 4.x and 5.x (5.x maps it to its TokenizersBackend).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
    }


def write_tokenizer(out_dir: Path, *, model_max_length: int, vocab_size: int | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja in `out_dir` (vocab_size: build_tokenizer's)."""
    build_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(CHAT_TEMPLATE, model_max_length), indent=2, ensure_ascii=False) + "\n")
    # transformers >= 4.43 also reads (and 5.x writes) the template as its own file; the two are identical.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
