"""sglang_m3.frontend: SGLang's frontend language renders M3's roles as the checkpoint's own chat template does.

Oracle: transformers' apply_chat_template on the tiny checkpoint's tokenizer (thinking_mode "disabled", the mode the
frontend template takes), against the prompts SGLang's own frontend interpreter builds (sgl.system / sgl.user /
sgl.assistant with gens) over a backend that records what it is asked to continue."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return tiny_dir()


def _recording_backend(template):
    from sglang.lang.backend.base_backend import BaseBackend

    class Recorder(BaseBackend):
        def __init__(self):
            super().__init__()
            self.chat_template, self.prompts = template, []

        def get_chat_template(self):
            return self.chat_template

        def generate(self, s, sampling_params, **_):
            self.prompts.append(s.text_)
            return f"answer {len(self.prompts)}", {}

    return Recorder()


@pytest.mark.parametrize("system, later_system", [(None, None), ("Be brief.", None), (None, "Now in French."),
                                                  ("Be brief.", "Now in French.")])
def test_frontend_prompts_equal_the_checkpoints_chat_template(ckpt, system, later_system):
    """With and without a first system message, and with a system message between turns (M3: a developer block
    then, without the conversation header)."""
    import sglang as sgl
    from transformers import AutoTokenizer

    from sglang_m3.frontend import chat_template

    @sgl.function
    def two_turns(s):
        if system:
            s += sgl.system(system)
        s += sgl.user("Hi there")
        s += sgl.assistant(sgl.gen("a1", max_tokens=4))
        if later_system:
            s += sgl.system(later_system)
        s += sgl.user("And then?")
        s += sgl.assistant(sgl.gen("a2", max_tokens=4))

    backend = _recording_backend(chat_template(str(ckpt)))
    state = two_turns.run(backend=backend)
    state.sync()  # (run returns while the program's thread may still be generating)
    tok = AutoTokenizer.from_pretrained(ckpt)

    def render(messages, generation):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                       thinking_mode="disabled")

    head = [{"role": "system", "content": system}] if system else []
    turn1 = [*head, {"role": "user", "content": "Hi there"}]
    later = [{"role": "system", "content": later_system}] if later_system else []
    turn2 = [*turn1, {"role": "assistant", "content": "answer 1"}, *later, {"role": "user", "content": "And then?"}]
    assert backend.prompts == [render(turn1, True), render(turn2, True)]
    assert state.text() == render([*turn2, {"role": "assistant", "content": "answer 2"}], False)
    assert (state["a1"], state["a2"]) == ("answer 1", "answer 2")


def test_an_m3_checkpoint_path_selects_the_template_and_others_do_not(ckpt, tmp_path):
    """RuntimeEndpoint picks its template with get_chat_template_by_model_path(model_path): the registered matching
    function answers for a local M3 checkpoint directory and leaves every other path to SGLang."""
    from sglang.lang.chat_template import get_chat_template_by_model_path

    import sglang_m3.frontend  # noqa: F401  (registers the matching function)

    picked = get_chat_template_by_model_path(str(ckpt))
    assert picked.name.startswith("minimax-m3:") and picked.role_prefix_and_suffix["user"] == ("]~b]user\n",
                                                                                                "[e~[\n")
    assert get_chat_template_by_model_path(str(tmp_path)).name == "default"  # no config.json
    import shutil  # before SGLang's name-fragment matchers: an M3 directory whose name says "llama-2 ... chat"

    named = shutil.copytree(ckpt, tmp_path / "llama-2-chat-m3")
    assert get_chat_template_by_model_path(str(named)).name.startswith("minimax-m3:")
    assert get_chat_template_by_model_path("meta-llama/Llama-2-7b-chat-hf").name == "llama-2-chat"


def test_inline_reasoning_of_a_past_turn_stays_in_the_frontend_prompt(ckpt):
    """README, known limitations: the chat template drops the <mm:think>R</mm:think> of an assistant turn before
    the last user message; the frontend keeps the turn's text as the program wrote it (after the assistant prefix's
    bare closer), and a program that leaves the reasoning out gets the chat API's prompt. Checked against
    apply_chat_template, so the statement stays true (this test fails once the frontend matches)."""
    import sglang as sgl
    from transformers import AutoTokenizer

    from sglang_m3.frontend import chat_template

    @sgl.function
    def history(s, answer):
        s += sgl.user("Hi there")
        s += sgl.assistant(answer)
        s += sgl.user("And then?")
        s += sgl.assistant(sgl.gen("a2", max_tokens=4))

    tok = AutoTokenizer.from_pretrained(ckpt)

    def chat_api(answer):
        return tok.apply_chat_template([{"role": "user", "content": "Hi there"},
                                        {"role": "assistant", "content": answer},
                                        {"role": "user", "content": "And then?"}],
                                       tokenize=False, add_generation_prompt=True, thinking_mode="disabled")

    def frontend(answer):
        backend = _recording_backend(chat_template(str(ckpt)))
        assert history.run(answer, backend=backend).error() is None  # (error() waits for the program's thread)
        return backend.prompts[0]

    reasoned = "<mm:think>Greet back.</mm:think>Hello!"
    assert chat_api(reasoned) == chat_api("Hello!")  # the chat API drops past reasoning
    assert frontend("Hello!") == chat_api("Hello!")
    assert frontend(reasoned) == chat_api("Hello!").replace("]~b]ai\n</mm:think>Hello!",
                                                           "]~b]ai\n</mm:think>" + reasoned)


@pytest.mark.parametrize("model_path, architecture, named, warned", [
    ("MiniMaxAI/MiniMax-M3", "MiniMaxM3SparseForConditionalGeneration", None, True),  # an HF id
    ("ckpts/m3-flat", "MiniMaxM3SparseForCausalLM", None, True),          # a path only the server sees
    ("<tiny>", None, None, False),                                       # a local M3 checkpoint: M3's template
    ("MiniMaxAI/MiniMax-M3", "MiniMaxM3SparseForConditionalGeneration", "chatml", False),  # the program chose
    ("meta-llama/Llama-2-7b-chat-hf", "LlamaForCausalLM", None, False),   # not M3: SGLang's choice stands
])
def test_an_m3_server_whose_path_the_client_cannot_read_warns(ckpt, monkeypatch, caplog, model_path, architecture,
                                                               named, warned):
    """RuntimeEndpoint reads the server's /get_model_info (model_path, architectures) and picks its template by the
    path; for an M3 server it keeps SGLang's own pick (get_chat_template_by_model_path: "default") unless the path
    is a local M3 checkpoint, and then the warning names the path and the way to pass M3's template."""
    import json
    import logging
    from types import SimpleNamespace

    import sglang as sgl
    from sglang.lang.backend import runtime_endpoint

    import sglang_m3.frontend  # noqa: F401  (registers the matching function and the endpoint's check)

    if model_path == "<tiny>":
        model_path = str(ckpt)
        architecture = json.loads((ckpt / "config.json").read_text())["architectures"][0]
    info = {"model_path": model_path, "architectures": [architecture]}
    monkeypatch.setattr(runtime_endpoint, "http_request",
                        lambda url, **_: SimpleNamespace(status_code=200, json=lambda: info))
    with caplog.at_level(logging.WARNING, logger="sglang_m3.frontend"):
        backend = sgl.RuntimeEndpoint("http://server", chat_template_name=named)
    messages = [r.getMessage() for r in caplog.records if r.name == "sglang_m3.frontend"]
    if not warned:
        assert messages == []
        # ... and the template is what made the warning unneeded: M3's, the program's choice, SGLang's for Llama
        expected = {str(ckpt): "minimax-m3", "chatml": "chatml"}.get(model_path if named is None else named)
        assert backend.chat_template.name.split(":")[0] == (  # (M3's carries its checkpoint: "minimax-m3:<path>")
            expected or sgl.lang.chat_template.get_chat_template_by_model_path(model_path).name), backend.chat_template
        return
    assert backend.chat_template.name == "default"
    assert len(messages) == 1 and f"model path {model_path!r}" in messages[0]
    assert "not a MiniMax-M3 checkpoint directory this client can read" in messages[0]
    assert "backend.chat_template = sglang_m3.frontend.chat_template(<local checkpoint copy>)" in messages[0]


def test_a_template_without_m3s_layout_is_refused(tmp_path, ckpt):
    import shutil

    from sglang_m3.frontend import chat_template

    for f in ckpt.iterdir():
        if f.suffix == ".json" or f.name.endswith(".jinja"):
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}")
    with pytest.raises(ValueError, match="does not render a system message as M3 does"):
        chat_template(str(tmp_path))
