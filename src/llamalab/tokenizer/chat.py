"""Chat templates: the Jinja2 template a model carries, rendered in a sandbox.

A chat template comes from the checkpoint (GGUF ``tokenizer.chat_template``, Hugging Face
``tokenizer_config.json``), so it is untrusted input: it is compiled in Jinja's immutable
sandbox, where it cannot call unsafe methods, read private attributes or mutate the
messages. The environment matches the one `transformers` uses (``trim_blocks``,
``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text, the
``raise_exception`` and ``strftime_now`` globals) so templates render byte for byte
the same.

Models that carry no template get a built-in one chosen from their vocabulary: Llama 3
headers, ChatML, or Llama 2's ``[INST] <<SYS>>`` format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamalab.errors import LlamalabError

# Meta's Llama 3 format (llama_models.llama3.chat_format): a header per message, the
# content as it is, <|eot_id|> after each; BOS once at the start.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML (SmolLM2, Qwen and others): <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Meta's Llama 2 chat format (llama/generation.py, chat_completion): every user turn is
# "<s>[INST] {user} [/INST]" and every answer " {answer} </s>", contents stripped; a
# system message is folded into the first user turn inside <<SYS>> markers. Roles must
# alternate user/assistant, as Meta's code asserts.
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}"
    "{% if message['role'] != expected %}"
    "{{ raise_exception('Llama 2 chat needs alternating user/assistant messages after an optional system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ content %}"
    "{% endif %}"
    "{{ bos_token }}[INST] {{ content | trim }} [/INST]"
    "{% else %}"
    " {{ message['content'] | trim }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES = {
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "llama2": LLAMA2_TEMPLATE,
}


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing loudly on unsafe access.

    Jinja's sandbox answers ``x.__class__`` with an undefined value that prints as an
    empty string; an escape attempt should stop the render instead, so the caller learns
    the template is hostile rather than getting a silently different prompt.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:  # type: ignore[override]
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe"
        )


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the token texts it is rendered with.

    Attributes:
        source: the Jinja text.
        name: where it came from (``"gguf"``, ``"tokenizer_config.json"``, or a
            built-in name such as ``"llama3"``).
    """

    def __init__(
        self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "template"
    ) -> None:
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except TemplateError as exc:
            raise LlamalabError(f"chat template ({name}) does not compile: {exc}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            add_generation_prompt: end with the header that starts the assistant's turn.
            **kwargs: extra template variables (``tools``, ``date_string``...).

        Raises:
            LlamalabError: the template raised an exception, failed, or tried to escape
                the sandbox.
        """
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except SecurityError as exc:
            raise LlamalabError(
                f"chat template ({self.name}) tried to escape its sandbox: {exc}"
            ) from None
        except TemplateError as exc:
            raise LlamalabError(f"chat template ({self.name}) failed: {exc}") from None
        # A template is code from the checkpoint: any error in it is the input's fault.
        except Exception as exc:  # noqa: BLE001
            raise LlamalabError(
                f"chat template ({self.name}) failed: {type(exc).__name__}: {exc}"
            ) from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r})"


def builtin_template_name(vocabulary: Mapping[str, int]) -> str:
    """Choose a built-in template for a model without one, from its special tokens."""
    if "<|start_header_id|>" in vocabulary and "<|eot_id|>" in vocabulary:
        return "llama3"
    if "<|im_start|>" in vocabulary and "<|im_end|>" in vocabulary:
        return "chatml"
    return "llama2"
