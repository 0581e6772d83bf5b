"""The same items and prompts as llamalab's own tasks, as lm-eval task files.

For comparing llamalab with lm-eval item by item: :func:`write_tasks` writes local JSON
Lines data and YAML task files (``dataset_path: json``, runnable offline with
``HF_DATASETS_OFFLINE=1`` and ``--include_path FOLDER``) whose prompts lm-eval builds with
its own template machinery; :func:`lm_eval_picks` reads lm-eval's logged samples back as
one (item id → picks) table. The YAML is written as JSON, which YAML reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalab.eval.tasks import mmlu
from llamalab.eval.tasks import siqa as siqa_task

SIQA_TASK = "llamalab_siqa"


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
