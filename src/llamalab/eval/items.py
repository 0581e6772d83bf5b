"""What a task hands the runner: multiple-choice items, generation items, and the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question, its prompt already built.

    The model scores ``delimiter + choices[i]`` as a continuation of ``context``;
    ``id`` is the item's 0-based line number in its source file.
    """

    id: int
    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = " "
    group: str | None = None  # MMLU's subject

    def continuations(self) -> list[str]:
        """The scored texts: each choice with the delimiter that joins it to the context."""
        return [self.delimiter + c for c in self.choices]


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to continue; ``answer`` is what a correct reply contains (task-defined)."""

    id: int
    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)  # HumanEval: test, entry_point, task_id


@dataclass(frozen=True)
class Task:
    """A benchmark ready to run.

    ``kind`` is "choice" (items are :class:`ChoiceItem`), "generate" (exact match of the
    extracted answer), or "code" (HumanEval: the reply runs against unit tests).
    ``norm`` is the normalisation whose accuracy is the headline figure; ``groups`` maps
    a group (MMLU subject) to its category, for macro-averages.
    """

    name: str
    kind: str
    items: tuple[ChoiceItem | GenerationItem, ...]
    norm: str = "char"
    answer_normalised: bool = False  # also score each choice given "Answer:"
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    num_fewshot: int = 0
    groups: dict[str, str] = field(default_factory=dict)
