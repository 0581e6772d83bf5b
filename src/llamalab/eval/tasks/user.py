"""A user's own task: a JSON Lines file, one item per line.

* multiple choice: ``{"context": str, "choices": [str, ...], "label": int}``; each choice
  is scored after ``context`` joined by a space (``delimiter`` on a line overrides it);
* generation: ``{"prompt": str, "answer": str}``; the greedy reply, cut at the first stop
  string and stripped, must equal the stripped answer.

Every line must be the same kind. With ``--num-fewshot K`` the first K items become
exemplars (prepended to every prompt, separated by a blank line) and are not scored.
"""

from __future__ import annotations

from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.eval.items import ChoiceItem, GenerationItem, Task
from llamalab.eval.tasks.jsonl import iter_jsonl, read_file_bounded

MAX_CHOICES = 100
DEFAULT_STOP = ("\n",)


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise LlamalabError(f"{where}: {key!r} must be a string")
    return value


def _choice_item(number: int, obj: dict, where: str) -> ChoiceItem:
    context = _text(obj, "context", where)
    choices = obj.get("choices")
    if not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES:
        raise LlamalabError(f"{where}: 'choices' must be a list of 1 to {MAX_CHOICES} strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise LlamalabError(f"{where}: every choice must be a non-empty string")
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
    return ChoiceItem(number, context, tuple(choices), label, delimiter)


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
        if head:
            scored = [
                ChoiceItem(i.id, head + i.context, i.choices, i.label, i.delimiter) for i in scored
            ]
        return Task(
            name=path.name, kind="choice", items=tuple(scored), norm=norm,
            answer_normalised=norm == "answer", num_fewshot=num_fewshot,
        )  # fmt: skip
    head = "".join(f"{s.prompt}{s.answer}\n\n" for s in shots)
    if head:
        scored = [GenerationItem(i.id, head + i.prompt, i.answer) for i in scored]
    return Task(
        name=path.name, kind="generate", items=tuple(scored),
        stop=DEFAULT_STOP if stop is None else stop, max_tokens=max_tokens,
        num_fewshot=num_fewshot,
    )  # fmt: skip
