"""Instruction data for fine-tuning: one JSONL loader for the formats people have.

Each line is one item, in any of four shapes (told apart by their keys, line by line):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``;
- Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional): a
  user turn (the instruction, then a blank line and the input when there is one) and an
  assistant turn (the output);
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
- plain text: ``{"text": ...}``.

Chat-shaped items are rendered with the model's own chat template. The loss covers the
assistant's tokens only, every assistant turn of a multi-turn chat: each assistant turn
is the text the template adds between the conversation so far rendered with its
generation prompt (``<|im_start|>assistant\\n``) and the conversation rendered through
that turn, so the turn's content and the end-of-turn marker the template writes after
it. The text is tokenized piece by piece at those boundaries (the prompt before the
first reply exactly as ``encode_chat`` tokenizes a prompt for generation). Plain text
trains on every token, with EOS appended where the model has one.

Rows: with packing (:func:`pack_examples`, :func:`to_packed_rows`) several items share a
row of ``seq_len`` positions, each with its own document id, so the forward can keep
attention inside each item and restart its positions (``train/finetune.py``): an item
then sees exactly what it would alone. Without packing (:func:`to_rows`) each item takes
a row of its own, padded. Either way padding is never a target.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llamalab.errors import LlamalabError
from llamalab.files import open_regular, strip_bom

if TYPE_CHECKING:
    import torch

    from llamalab.tokenizer.base import Tokenizer

Format = Literal["chat", "alpaca", "sharegpt", "text"]
IGNORE = -100  # the targets the loss skips (``Transformer.forward``)
# A line longer than this is refused rather than parsed: a JSONL item is a document, not
# a corpus, and json.loads of a huge line takes memory many times its size.
MAX_LINE_BYTES = 64 << 20
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


@dataclass
class Example:
    """One tokenized item: ``tokens`` and, per token, whether the loss predicts it."""

    tokens: list[int]
    trained: list[bool]
    line: int  # where the item was in the file (1-based)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class InstructData:
    """Tokenized items ready for rows of ``seq_len`` (inputs and shifted targets)."""

    examples: list[Example]
    seq_len: int
    formats: dict[str, int] = field(default_factory=dict)  # items of each format
    truncated: int = 0  # items cut to seq_len + 1 tokens
    dropped: int = 0  # items left out: too long (with overflow="drop"), or nothing to train

    def summary(self) -> str:
        """One line: the items kept, by format, and how many were truncated and dropped."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.formats.items() if n)
        return (
            f"{len(self.examples)} items ({kinds}); {self.truncated} truncated, "
            f"{self.dropped} dropped at seq_len {self.seq_len}"
        )


def detect_format(item: Any, where: str) -> Format:
    """Which of the four shapes a parsed line is, by its keys."""
    if not isinstance(item, dict):
        raise LlamalabError(f"{where}: an item must be a JSON object, got {type(item).__name__}")
    if "messages" in item:
        return "chat"
    if "conversations" in item:
        return "sharegpt"
    if "instruction" in item and "output" in item:
        return "alpaca"
    if "text" in item:
        return "text"
    keys = ", ".join(sorted(item)[:5]) or "none"
    raise LlamalabError(
        f"{where}: unknown format (keys: {keys}); expected messages (chat), "
        "instruction/input/output (Alpaca), conversations (ShareGPT) or text"
    )


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise LlamalabError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def to_messages(item: dict, fmt: Format, where: str) -> list[dict[str, str]]:
    """A chat-shaped item (chat, Alpaca, ShareGPT) as ``[{"role", "content"}, ...]``."""
    if fmt == "alpaca":
        prompt = _text(item["instruction"], "instruction", where)
        extra = item.get("input") or ""
        extra = _text(extra, "input", where)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(item["output"], "output", where)},
        ]
    key, role_key, content_key = (
        ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
    )
    turns = item[key]
    if not isinstance(turns, list) or not turns:
        raise LlamalabError(f"{where}: {key} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise LlamalabError(
                f"{where}: {key}[{i}] must be an object with {role_key!r} and {content_key!r}"
            )
        role = turn[role_key]
        if fmt == "sharegpt":
            role = _SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise LlamalabError(
                    f"{where}: {key}[{i}] has from={turn[role_key]!r}; expected one of "
                    + ", ".join(_SHAREGPT_ROLES)
                )
        elif role not in _ROLES:
            raise LlamalabError(
                f"{where}: {key}[{i}] has role={role!r}; expected one of {', '.join(_ROLES)}"
            )
        messages.append(
            {"role": role, "content": _text(turn[content_key], f"{key}[{i}] content", where)}
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise LlamalabError(f"{where}: no assistant turn, so nothing to train on")
    return messages


def encode_messages(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], where: str = "item"
) -> tuple[list[int], list[bool]]:
    """Tokens of a conversation rendered with the model's template, and the assistant mask.

    ``trained[i]`` is True for the tokens of each assistant turn (see the module's
    docstring for where a turn starts and ends).
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []  # (start, end) character spans of assistant turns
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        start = len(prompt)
        # The reply must extend its prompt, and the whole chat every reply: else the
        # template rewrites earlier turns and no span of the text is the reply alone.
        if not (through.startswith(prompt) and full.startswith(through)) or (
            cuts and start < cuts[-1][1]
        ):
            raise LlamalabError(
                f"{where}: the chat template ({tokenizer.chat_template.name}) does not render "
                "the conversation turn by turn, so the assistant's tokens cannot be told apart"
            )
        cuts.append((start, len(through)))
    tokens: list[int] = []
    trained: list[bool] = []
    at = 0
    for start, end in [*cuts, (len(full), len(full))]:
        for text, flag in ((full[at:start], False), (full[start:end], True)):
            if text:
                ids = tokenizer.encode(text, add_bos=False, special=True)
                tokens.extend(ids)
                trained.extend([flag] * len(ids))
        at = end
    if tokenizer.add_bos_default and (not tokens or tokens[0] != tokenizer.bos_id):
        tokens.insert(0, tokenizer.bos_id)  # as encode_chat: never two BOS tokens
        trained.insert(0, False)
    return tokens, trained


def encode_text(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A plain document: every token trained, EOS appended where the model has one."""
    tokens = tokenizer.encode(text, add_eos=tokenizer.eos_id is not None)
    trained = [True] * len(tokens)
    if tokens and tokens[0] == tokenizer.bos_id and tokenizer.add_bos_default:
        trained[0] = False  # BOS is given, never predicted (it is no target anyway)
    return tokens, trained


def read_items(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed item)`` for every non-blank line of a JSONL file.

    Raises:
        LlamalabError: not a readable regular file, a line that is not UTF-8 or not
            JSON (naming its number), or a file without a single item.
    """
    seen = False
    with open_regular(path) as f:
        for number, raw in enumerate(_lines(f, path), start=1):
            if number == 1:
                raw = strip_bom(raw)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LlamalabError(
                    f"{path}:{number}: not valid UTF-8 (byte {raw[exc.start]:#04x})"
                ) from None
            try:
                item = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise LlamalabError(f"{path}:{number}: not valid JSON ({reason})") from None
            seen = True
            yield number, item
    if not seen:
        raise LlamalabError(f"{path}: empty file, no items to train on")


def _lines(f, path) -> Iterator[bytes]:
    while True:
        try:
            line = f.readline(MAX_LINE_BYTES + 1)
        except OSError as exc:
            raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise LlamalabError(f"{path}: a line longer than {MAX_LINE_BYTES} bytes")
        yield line


def load_instruct(
    path: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    overflow: Literal["truncate", "drop"] = "truncate",
) -> InstructData:
    """Read, check, render and tokenize every item of a JSONL file (see the module docs).

    An item longer than ``seq_len + 1`` tokens (a row's inputs plus its last target) is
    cut to that length (``overflow="truncate"``) or left out (``"drop"``); an item left
    with no trained token after the cut is dropped too. Every item is checked before
    any is used: the first bad one is an error naming its line.
    """
    if overflow not in ("truncate", "drop"):
        raise LlamalabError(f"overflow must be 'truncate' or 'drop', not {overflow!r}")
    if seq_len < 1:
        raise LlamalabError(f"seq_len must be at least 1, got {seq_len}")
    data = InstructData([], seq_len, {"chat": 0, "alpaca": 0, "sharegpt": 0, "text": 0})
    for number, item in read_items(path):
        where = f"{path}:{number}"
        fmt = detect_format(item, where)
        if fmt == "text":
            tokens, trained = encode_text(tokenizer, _text(item["text"], "text", where))
        else:
            tokens, trained = encode_messages(tokenizer, to_messages(item, fmt, where), where)
        data.formats[fmt] += 1
        if len(tokens) > seq_len + 1:
            if overflow == "drop":
                data.dropped += 1
                continue
            tokens, trained = tokens[: seq_len + 1], trained[: seq_len + 1]
            data.truncated += 1
        if not any(trained[1:]):  # the first token is never a target
            data.dropped += 1
            continue
        data.examples.append(Example(tokens, trained, number))
    return data


def split_validation(
    examples: list[Example], val_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random ``val_fraction`` of the items held out.

    At least one item is held out when ``val_fraction`` > 0, and at least one kept.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LlamalabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(examples) < 2:
        return list(examples), []
    n_val = min(len(examples) - 1, max(1, round(len(examples) * val_fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


def to_rows(
    examples: Sequence[Example], seq_len: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each (len(examples), seq_len) int64: one item per row.

    ``inputs`` are an item's tokens but its last, ``targets`` the tokens after them,
    :data:`IGNORE` where the token is not trained and over the padding.
    """
    import torch

    inputs = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), seq_len), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.tokens) - 1
        if n > seq_len:
            raise LlamalabError(f"item of line {example.line} is longer than seq_len {seq_len}")
        tokens = torch.tensor(example.tokens, dtype=torch.long)
        inputs[row, :n] = tokens[:-1]
        trained = torch.tensor(example.trained[1:], dtype=torch.bool)
        targets[row, :n] = torch.where(trained, tokens[1:], IGNORE)
    return inputs, targets


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Indices of ``examples`` grouped into rows of at most ``seq_len`` positions.

    An item of n tokens takes n - 1 positions (its inputs; their targets are the tokens
    after them). Best-fit decreasing: longest first, each into the fullest row that
    still has room for it, else a new row. Deterministic (ties keep the items' order),
    so a seed and a step name the same rows on every rank and after a resume.
    """
    need = [len(e) - 1 for e in examples]
    for e, n in zip(examples, need, strict=True):
        if not 1 <= n <= seq_len:
            raise LlamalabError(f"item of line {e.line} does not fit a row of seq_len {seq_len}")
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # positions left -> rows with exactly that many
    rooms: list[int] = []  # the keys of by_room, sorted
    for i in sorted(range(len(examples)), key=lambda i: -need[i]):
        at = bisect.bisect_left(rooms, need[i])
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - need[i]
        if left:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return rows


def to_packed_rows(
    rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, documents)``, each (len(rows), seq_len) int64: the items of
    each row one after another, then padding.

    ``documents`` numbers the items of a row from 0 in order; the padding after them
    gets the next number (a document of its own, so that no position is left with
    nothing to attend to). Targets are as :func:`to_rows` makes them, per item: an
    item never predicts the first token of the next.
    """
    import torch

    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    documents = torch.empty((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, example in enumerate(row):
            n = len(example.tokens) - 1
            if at + n > seq_len:
                raise LlamalabError(f"the items of packed row {r} exceed seq_len {seq_len}")
            tokens = torch.tensor(example.tokens, dtype=torch.long)
            inputs[r, at : at + n] = tokens[:-1]
            trained = torch.tensor(example.trained[1:], dtype=torch.bool)
            targets[r, at : at + n] = torch.where(trained, tokens[1:], IGNORE)
            documents[r, at : at + n] = d
            at += n
        documents[r, at:] = len(row)
    return inputs, targets, documents


def trained_tokens(examples: Sequence[Example]) -> int:
    """How many targets the items give the loss (their trained tokens but the first)."""
    return sum(sum(e.trained[1:]) for e in examples)
