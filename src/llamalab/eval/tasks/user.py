"""A user's own task: a JSON Lines file, one item per line.

* multiple choice: ``{"context": str, "choices": [str, ...], "label": int}``; each choice
  is scored after ``context`` joined by a space (``delimiter`` on a line overrides it);
* generation: ``{"prompt": str, "answer": str}``; the greedy reply, cut at the first stop
  string and stripped, must equal the stripped answer.

Every line must be the same kind. With ``--num-fewshot K`` the first K items become
exemplars (prepended to every prompt, separated by a blank line) and are not scored.

Sizes are bounded before anything is tokenized: every text field, and every prompt with
its exemplars, holds at most ``MAX_TEXT_CHARS`` characters (about 25,000 tokens, more
than any window scored on a CPU). A prompt that is longer in tokens than the window
loses its oldest tokens when scored, as lm-eval's models do. A file may open with a
UTF-8 byte-order mark; text must be valid Unicode (no lone surrogates from ``\ud800``
escapes, which no tokenizer can encode).
"""

from __future__ import annotations

from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.eval.items import ChoiceItem, GenerationItem, Task
from llamalab.eval.tasks.jsonl import iter_jsonl, read_file_bounded

MAX_CHOICES = 100
MAX_TEXT_CHARS = 100_000
DEFAULT_STOP = ("\n",)


def _check_text(value: str, what: str, where: str) -> str:
    """``value`` if it is encodable text of at most MAX_TEXT_CHARS characters."""
    if len(value) > MAX_TEXT_CHARS:
        raise LlamalabError(
            f"{where}: {what} is {len(value):,} characters long; at most {MAX_TEXT_CHARS:,}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LlamalabError(
            f"{where}: {what} holds a lone surrogate (U+{ord(value[exc.start]):04X} at "
            f"character {exc.start}), which is not text"
        ) from None
    return value


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise LlamalabError(f"{where}: {key!r} must be a string")
    return _check_text(value, repr(key), where)


def _choice_item(number: int, obj: dict, where: str) -> ChoiceItem:
    context = _text(obj, "context", where)
    choices = obj.get("choices")
    if not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES:
        raise LlamalabError(f"{where}: 'choices' must be a list of 1 to {MAX_CHOICES} strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise LlamalabError(f"{where}: every choice must be a non-empty string")
    for i, c in enumerate(choices):
        _check_text(c, f"choice {i}", where)
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise LlamalabError(f"{where}: 'label' must be an integer index into 'choices'")
    if not 0 <= label < len(choices):
        raise LlamalabError(
            f"{where}: label {label} is out of range for {len(choices)} choices (0 to {len(choices) - 1})"
        )
    delimiter = obj.get("delimiter", " ")
    if not isinstance(delimiter, str):
        raise LlamalabError(f"{where}: 'delimiter' must be a string")
    _check_text(delimiter, "'delimiter'", where)
    return ChoiceItem(number, context, tuple(choices), label, delimiter)


def _check_prompts(head: str, texts: list[str], items: list, path: Path, shots: int) -> None:
    """Refuse exemplars that make a prompt longer than MAX_TEXT_CHARS, before it is built."""
    if not head:
        return
    for text, item in zip(texts, items, strict=True):
        if len(head) + len(text) > MAX_TEXT_CHARS:
            raise LlamalabError(
                f"{path}:{item.id + 1}: with its {shots} exemplars ({len(head):,} characters) "
                f"the prompt is {len(head) + len(text):,} characters long; at most "
                f"{MAX_TEXT_CHARS:,} (use a smaller --num-fewshot)"
            )


def load(
    path: Path,
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    norm: str = "char",
    stop: tuple[str, ...] | None = None,
    max_tokens: int = 256,
) -> Task:
    """The task in JSONL file ``path``."""
    items: list[ChoiceItem | GenerationItem] = []
    kind = None
    for number, obj in iter_jsonl(read_file_bounded(path), str(path)):
        where = f"{path}:{number + 1}"
        this = "choice" if "choices" in obj else "generate" if "prompt" in obj else None
        if this is None:
            raise LlamalabError(
                f"{where}: expected 'context', 'choices', 'label' (multiple choice) "
                "or 'prompt', 'answer' (generation)"
            )
        if kind is not None and this != kind:
            raise LlamalabError(f"{where}: mixes multiple-choice and generation items")
        kind = this
        if this == "choice":
            items.append(_choice_item(number, obj, where))
        else:
            items.append(
                GenerationItem(number, _text(obj, "prompt", where), _text(obj, "answer", where))
            )
    if not items:
        raise LlamalabError(f"{path}: no items")
    if not 0 <= num_fewshot < len(items):
        raise LlamalabError(
            f"--num-fewshot {num_fewshot}: the file has {len(items)} items, "
            "and at least one must remain to score"
        )
    shots, scored = items[:num_fewshot], items[num_fewshot:]
    if limit is not None:
        scored = scored[:limit]
    if kind == "choice":
        head = "".join(f"{s.context}{s.delimiter}{s.choices[s.label]}\n\n" for s in shots)
        _check_prompts(head, [i.context for i in scored], scored, path, num_fewshot)
        if head:
            scored = [
                ChoiceItem(i.id, head + i.context, i.choices, i.label, i.delimiter) for i in scored
            ]
        return Task(
            name=path.name, kind="choice", items=tuple(scored), norm=norm,
            answer_normalised=norm == "answer", num_fewshot=num_fewshot,
        )  # fmt: skip
    head = "".join(f"{s.prompt}{s.answer}\n\n" for s in shots)
    _check_prompts(head, [i.prompt for i in scored], scored, path, num_fewshot)
    if head:
        scored = [GenerationItem(i.id, head + i.prompt, i.answer) for i in scored]
    return Task(
        name=path.name, kind="generate", items=tuple(scored),
        stop=DEFAULT_STOP if stop is None else stop, max_tokens=max_tokens,
        num_fewshot=num_fewshot,
    )  # fmt: skip
