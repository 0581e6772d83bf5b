"""Turning a conversation into prompt ids with the model's chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamalab.errors import LlamalabError


def chat_prompt_ids(
    tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Render ``messages`` with the model's template and encode the result.

    Special tokens in the rendered text are parsed. A template that already starts with
    the BOS token gets no second one (a double BOS measurably changes a model's answers).
    """
    if not messages:
        raise LlamalabError("the conversation is empty: give at least one message")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ids = tokenizer.encode(text, add_bos=False, special=True)
    if tokenizer.add_bos_default and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids


def build_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages
