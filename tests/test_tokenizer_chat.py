"""Chat templates: sandboxing of untrusted templates, the built-in formats, BOS handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalab import load_tokenizer
from llamalab.errors import LlamalabError
from llamalab.tokenizer import ChatTemplate
from llamalab.tokenizer.chat import CHATML_TEMPLATE

SPM_VOCAB = (
    Path(__file__).parent
    / "fixtures"
    / "tokenizer"
    / "llamacpp-vocab"
    / "ggml-vocab-llama-spm.gguf"
)
USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages[0].__class__.__init__ }}",
        "{% set _ = messages.append({'role': 'user'}) %}",  # the immutable sandbox
        "{{ messages[0].update(role='system') }}",
    ],
)
def test_sandbox_escape_is_a_clear_error(source: str) -> None:
    template = ChatTemplate(source, name="hostile")
    with pytest.raises(LlamalabError, match=r"chat template \(hostile\)"):
        template.render(USER)


def test_raise_exception_and_syntax_errors() -> None:
    with pytest.raises(LlamalabError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render(USER)
    with pytest.raises(LlamalabError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_template_variables() -> None:
    t = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m['content'] | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    # tojson keeps non-ASCII text and HTML characters, as transformers' override does.
    assert t.render([{"role": "user", "content": "é<&>"}]) == '<s>user:"é<&>"></s>'
    assert t.render(USER, add_generation_prompt=False) == '<s>user:"Hi"</s>'


def test_builtin_llama2_format() -> None:
    """Meta's Llama 2 chat_completion layout, tokenized as Meta does it (one BOS per turn)."""
    tok = load_tokenizer(SPM_VOCAB)
    assert tok.chat_template is not None and tok.chat_template.name == "llama2"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hello "},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages)
    # Meta strips the user content after folding the system prompt into it, so only the
    # trailing space of " Hello " goes.
    assert (
        text
        == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hello [/INST] Hi! </s><s>[INST] Bye [/INST]"
    )
    ids = tok.encode_chat(messages)
    assert ids.count(1) == 2 and ids[0] == 1 and ids[1] != 1  # no double BOS
    # Meta: bos + sp.encode(f"[INST] {prompt} [/INST] {answer} ") + eos, per turn.
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hello [/INST] Hi! "
    second = "[INST] Bye [/INST]"
    assert ids == [1, *tok.encode(first, add_bos=False), 2, 1, *tok.encode(second, add_bos=False)]
    with pytest.raises(LlamalabError, match="alternating"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_builtin_chatml() -> None:
    t = ChatTemplate(CHATML_TEMPLATE)
    assert t.render(USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_encode_chat_adds_bos_when_template_does_not() -> None:
    tok = load_tokenizer(SPM_VOCAB)
    tok.chat_template = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tok.encode_chat(USER) == [1, *tok.encode("Hi", add_bos=False)]
