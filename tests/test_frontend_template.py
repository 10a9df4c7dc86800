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
