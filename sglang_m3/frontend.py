"""M3's chat markup for SGLang's frontend language (`sgl.system` / `sgl.user` / `sgl.assistant`).

The frontend renders roles on the client, from a `sglang.lang.chat_template.ChatTemplate` it picks by the
server's model path; SGLang 0.5.17 has none for MiniMax-M3, so programs got its "default" template (`USER:` /
`ASSISTANT:` text) without a warning (session 19's newcomer probe). Importing this module registers a matching
function (plugin.register_frontend_chat_template): `sgl.RuntimeEndpoint(url)` then uses the served checkpoint's
own chat template whenever its model path is a local M3 checkpoint directory (config.json names MiniMax-M3; the
client reads the directory, as it does for the tokenizer). Elsewhere (an HF id, a path only the server sees), pass
the template yourself: ``backend.chat_template = sglang_m3.frontend.chat_template(<a local copy of the
checkpoint>)``; a `RuntimeEndpoint` whose server reports an M3 architecture logs a warning saying so
(warn_unless_m3_template).

How: the checkpoint's template (rendered by transformers, the oracle the tests compare with) is rendered once with
a marker in place of each role's content, and cut at M3's role markers (M3_SPEC.md §5: a message is
``]~b]{role}\\n{content}[e~[\\n``; the first system block opens with ``]~!b[``): each role's prefix is what precedes
its marker, its suffix what follows up to the end-of-message newline. Thinking mode "disabled" (the frontend has no
reasoning parser: a program's `sgl.gen` inside `sgl.assistant` reads the answer itself), so a generated turn opens
with the bare ``</mm:think>`` closer, as the chat API renders it with `thinking_mode: "disabled"`. A program
without `sgl.system` gets M3's default developer prompt, as the chat API does.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

END = "[e~[\n"  # end of message (M3_SPEC.md §5)
_MARK = "\x00{}\x00"  # a role's content while rendering (never in a real template's own text)
_ROLES = ("system", "user", "assistant")


def is_m3_checkpoint(path: str | Path) -> bool:
    """True when `path` is a local directory whose config.json names a MiniMax-M3 architecture."""
    from sglang_m3.config import is_m3_architecture

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_m3_architecture(config.get("architectures"))


@functools.cache
def chat_template(checkpoint: str, name: str = "minimax-m3"):
    """The frontend ChatTemplate of the checkpoint directory `checkpoint` (its tokenizer's chat template).

    Returns a `sglang.lang.chat_template.ChatTemplate` (M3ChatTemplate). Raises ValueError when the rendered
    template does not have M3's layout (a role's content not followed by END)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)

    def render(roles):
        return tok.apply_chat_template([{"role": r, "content": _MARK.format(r)} for r in roles], tokenize=False,
                                       thinking_mode="disabled")

    parts = _cut(render(_ROLES), _ROLES, checkpoint)
    # a system message after the first turn is a developer block (M3_SPEC.md §5), without the conversation header
    developer = _cut(render(["user", "system"]), ["user", "system"], checkpoint)["system"]
    # the developer prompt the template gives a conversation without a system message: what the system prefix and
    # suffix enclose in that rendering
    default_system, (prefix, suffix) = render(["user"]), parts["system"]
    if not (default_system.startswith(prefix) and suffix in default_system[len(prefix):]):
        raise ValueError(f"{checkpoint}: its chat template's default system block is not where M3 puts it")
    default = default_system[len(prefix):default_system.index(suffix, len(prefix))]
    return _template_class()(name=name, default_system_prompt=default, role_prefix_and_suffix=parts,
                             later_system=developer)


def _cut(text: str, roles, checkpoint) -> dict:
    """Each role's (prefix, suffix) in `text`, rendered from one message per role in that order with _MARK contents."""
    parts, start = {}, 0
    for role in roles:
        at = text.find(_MARK.format(role), start)
        end = text.find(END, at)
        if at < 0 or end < 0:
            raise ValueError(f"{checkpoint}: its chat template does not render a {role} message as M3 does "
                             f"(content followed by {END!r})")
        parts[role] = (text[start:at], text[at + len(_MARK.format(role)):end + len(END)])
        start = end + len(END)
    return parts


@functools.cache
def _template_class():
    """ChatTemplate with M3's two system forms: the first message's (conversation header + developer block) and a
    later one's (a developer block alone). Built on first use: sglang.lang is imported only then."""
    from dataclasses import dataclass

    from sglang.lang.chat_template import ChatTemplate

    @dataclass
    class M3ChatTemplate(ChatTemplate):
        later_system: tuple = ("", "")

        def get_prefix_and_suffix(self, role, hist_messages):
            if role == "system" and hist_messages:
                return self.later_system
            return super().get_prefix_and_suffix(role, hist_messages)

    return M3ChatTemplate


def match(model_path: str):
    """sglang.lang's matching-function protocol: the name of a registered template, or None. Registered by
    plugin.register_frontend_chat_template."""
    from sglang.lang.chat_template import chat_template_registry, register_chat_template

    if not is_m3_checkpoint(model_path):
        return None
    name = f"minimax-m3:{Path(model_path).resolve()}"
    if name not in chat_template_registry:
        register_chat_template(chat_template(str(model_path), name))
    return name


def warn_unless_m3_template(model_info: dict, template) -> None:
    """Log a warning when the server serves MiniMax-M3 but the frontend did not get M3's template.

    `model_info`: the server's /get_model_info answer (`architectures` names the served model, `model_path` the
    path the frontend matched); `template`: the ChatTemplate the frontend picked by that path. Called by the
    RuntimeEndpoint hook (plugin.register_frontend_chat_template) unless the program named a template itself."""
    from sglang_m3.config import is_m3_architecture

    if not is_m3_architecture(model_info.get("architectures")) or isinstance(template, _template_class()):
        return
    logger.warning(
        "The server serves MiniMax-M3 from model path %r, which is not a MiniMax-M3 checkpoint directory this client "
        "can read, so sgl.system / sgl.user / sgl.assistant are rendered with SGLang's %r chat template, not M3's. "
        "Set backend.chat_template = sglang_m3.frontend.chat_template(<local checkpoint copy>) before running "
        "programs.", model_info.get("model_path"), getattr(template, "name", template))


def _register() -> None:
    from sglang_m3.plugin import register_frontend_chat_template

    register_frontend_chat_template()


_register()
