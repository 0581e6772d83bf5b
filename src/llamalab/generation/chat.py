"""Conversations for the chat template (rendering and BOS handling live in the tokenizer)."""

from __future__ import annotations


def build_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: an optional system message, then the user's prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages
