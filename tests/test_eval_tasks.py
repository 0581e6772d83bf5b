"""Benchmark data from the wheels, user JSONL tasks, and what ``import llamalab.eval`` loads."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llamalab.errors import LlamalabError
from llamalab.eval import data
from llamalab.eval.tasks import load_task

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


def needs(name):
    return pytest.mark.skipif(
        not data.available(name), reason=f"the {name} data is not installed ({data.INSTALL_LINE})"
    )


def test_importing_llamalab_eval_loads_neither_lm_eval_nor_torch():
    code = (
        "import sys, llamalab.eval, llamalab.eval.tasks, llamalab.eval.scoring, "
        "llamalab.eval.sandbox, llamalab.eval.passk, llamalab.eval.runner, llamalab.cli.eval\n"
        "print(sorted(m for m in ('lm_eval', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@needs("mmlu")
def test_mmlu_drops_the_header_rows_and_holds_out_five_exemplars_per_subject():
    from llamalab.eval.tasks import mmlu

    rows = mmlu.load_rows()
    assert len(rows) == 57 and sum(map(len, rows.values())) == 14042
    numbers = {r[0] for subject in rows.values() for r in subject}
    assert not numbers & {11776, 12793}  # the two stray CSV header rows (1-based 11777, 12794)
    task = load_task("mmlu", subjects=["college_mathematics", "anatomy"])
    assert len(task.items) == (100 - 5) + (135 - 5)
    shots = {r[0] for r in rows["anatomy"][:5]}
    assert not shots & {i.id for i in task.items}
    first = next(i for i in task.items if i.group == "anatomy")
    assert first.context.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert first.context.count("\nAnswer:") == 6 and first.context.endswith("\nAnswer:")
    # Zero-shot shows no exemplar, so none is held out: the subject's first rows are scored.
    zero = load_task("mmlu", subjects=["anatomy"], num_fewshot=0, limit=2)
    assert [i.id for i in zero.items] == [r[0] for r in rows["anatomy"][:2]]
    with pytest.raises(LlamalabError, match="unknown MMLU subject"):
        mmlu.parse_subjects("anatomy,astrology")


def test_mmlu_categories_match_lm_eval():
    lm_eval = pytest.importorskip("lm_eval")
    from llamalab.eval.tasks.mmlu import SUBJECT_CATEGORY

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    theirs = {}
    for f in folder.glob("mmlu_*.yaml"):
        tag = next(line for line in f.read_text().splitlines() if line.startswith('"tag"'))
        theirs[f.stem.removeprefix("mmlu_")] = (
            tag.split('"')[3].removeprefix("mmlu_").removesuffix("_tasks")
        )
    assert theirs == SUBJECT_CATEGORY


@needs("siqa")
def test_siqa_items():
    task = load_task("siqa")
    assert len(task.items) == 2224 and task.norm == "char"
    assert all(len(i.choices) == 3 and all(i.choices) for i in task.items)
    first = task.items[0]
    assert first.context == (
        "Q: bailey was a nice person so she called the family together. "
        "What will happen to Others?\nA:"
    )
    assert first.choices == ("talk to the family", "hate bailey", "thank bailey")


@needs("gsm8k")
def test_gsm8k_items_are_eight_shot():
    task = load_task("gsm8k", limit=3)
    assert len(task.items) == 3 and task.items[0].answer == "18"
    assert task.items[0].prompt.count("Q: ") == 9 and task.items[0].prompt.endswith("\nA:")


@needs("humaneval")
def test_humaneval_items():
    task = load_task("humaneval")
    assert len(task.items) == 164 and task.items[0].extra["task_id"] == "HumanEval/0"


@needs("siqa")
def test_a_file_that_is_not_the_recorded_one_is_refused(monkeypatch):
    record = data.DATA_FILES["siqa"]
    monkeypatch.setitem(data.DATA_FILES, "siqa", replace(record, sha256="0" * 64))
    with pytest.raises(LlamalabError, match="sha256"):
        load_task("siqa")


def test_a_missing_data_wheel_names_the_make_target(monkeypatch):
    record = data.DATA_FILES["gsm8k"]
    monkeypatch.setitem(data.DATA_FILES, "gsm8k", replace(record, package="no_such_package_x"))
    with pytest.raises(LlamalabError, match="make eval-data"):
        load_task("gsm8k")


def _write(tmp_path, lines):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_user_multiple_choice_file_with_shots():
    task = load_task(str(FIXTURES / "mc.jsonl"), num_fewshot=1)
    assert [i.id for i in task.items] == [1, 2, 3]
    assert task.items[0].context == "The capital of France is Paris\n\nTwo plus two equals"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"context": "a", "choices": ["x"], "label": 0}', "{not json"],
            r"task.jsonl:2: not valid JSON",
        ),
        (['{"context": "a", "choices": ["x", "y"], "label": 2}'], "label 2 is out of range"),
        (['{"context": "a", "choices": ["x", "y"], "label": true}'], "'label' must be an integer"),
        (['{"context": "a", "choices": [], "label": 0}'], "'choices' must be a list"),
        (
            ['{"context": "a", "choices": ["x"], "label": 0}', '{"prompt": "p", "answer": "a"}'],
            "mixes",
        ),
        (['{"question": "q"}'], "expected 'context'"),
        (["[1, 2]"], "expected a JSON object"),
        ([""], "no items"),
    ],
)
def test_bad_user_files_give_one_clear_error(tmp_path, lines, message):
    with pytest.raises(LlamalabError, match=message):
        load_task(str(_write(tmp_path, lines)))


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(LlamalabError, match="no such file"):
        load_task(str(tmp_path / "absent.jsonl"))
    with pytest.raises(LlamalabError, match="unknown task 'hellaswag'"):
        load_task("hellaswag")


def test_overlong_lines_are_refused(tmp_path):
    from llamalab.eval.tasks.jsonl import MAX_LINE_BYTES

    line = json.dumps({"prompt": "x" * (MAX_LINE_BYTES + 10), "answer": "y"})
    with pytest.raises(LlamalabError, match="longer than"):
        load_task(str(_write(tmp_path, [line])))
