"""The benchmarks by name, and user tasks by file.

``load_task(name)`` builds a :class:`~llamalab.eval.items.Task` with its prompts; a name
that is not a benchmark is read as the path of a user JSONL file
(:mod:`llamalab.eval.tasks.user`). Perplexity is not an item task: see
:mod:`llamalab.eval.perplexity`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.eval.items import Task

BENCHMARKS = ("mmlu", "siqa", "gsm8k", "humaneval")
TASK_NAMES = (*BENCHMARKS, "perplexity")
DEFAULT_FEWSHOT = {"mmlu": 5, "siqa": 0, "gsm8k": 8, "humaneval": 0}


def is_user_task(name: str) -> bool:
    """Whether ``name`` names a file rather than a benchmark."""
    return name not in TASK_NAMES and (
        name.endswith((".jsonl", ".json")) or "/" in name or Path(name).exists()
    )


def load_task(
    name: str,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    subjects: list[str] | None = None,
    norm: str | None = None,
    stop: tuple[str, ...] | None = None,
    max_tokens: int | None = None,
) -> Task:
    """The task ``name`` (a benchmark, or a user JSONL file's path)."""
    if subjects is not None and name != "mmlu":
        raise LlamalabError("--subjects applies to --task mmlu only")
    if is_user_task(name):
        from llamalab.eval.tasks import user

        return user.load(
            Path(name), num_fewshot=num_fewshot or 0, limit=limit, norm=norm or "char",
            stop=stop, max_tokens=max_tokens or 256,
        )  # fmt: skip
    if name not in BENCHMARKS:
        raise LlamalabError(
            f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)} or a .jsonl file"
        )
    module = importlib.import_module(f"llamalab.eval.tasks.{name}")
    shots = DEFAULT_FEWSHOT[name] if num_fewshot is None else num_fewshot
    kwargs = {"subjects": subjects} if name == "mmlu" else {}
    task = module.load(num_fewshot=shots, limit=limit, **kwargs)
    if norm is not None and task.kind == "choice":
        from dataclasses import replace

        task = replace(task, norm=norm, answer_normalised=norm == "answer")
    if stop is not None or max_tokens is not None:
        from dataclasses import replace

        task = replace(
            task,
            stop=task.stop if stop is None else stop,
            max_tokens=task.max_tokens if max_tokens is None else max_tokens,
        )
    return task
