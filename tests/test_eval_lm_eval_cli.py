"""``python -m llamalab.eval.lm_eval_cli``: lm-eval's own command line with ``--model llamalab``,
through its three request types (loglikelihood, generate_until, loglikelihood_rolling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


def _task(folder: Path, name: str, data: Path, **fields) -> None:
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **fields,
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML


@pytest.mark.slow
def test_lm_eval_cli_runs_llamalab_on_every_request_type(tmp_path, smollm2_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _task(
        tasks, "tiny_mc", FIXTURES / "mc.jsonl", output_type="multiple_choice",
        doc_to_text="{{context}}", doc_to_choice="{{choices}}", doc_to_target="label",
        target_delimiter=" ", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )  # fmt: skip
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"prompt": "Q: What is the capital of France?\\nA:", "answer": "Paris"}\n')
    _task(
        tasks, "tiny_gen", gen, output_type="generate_until", doc_to_text="{{prompt}}",
        doc_to_target="{{answer}}", target_delimiter=" ",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match", "ignore_case": True}],
    )  # fmt: skip
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n')
    _task(
        tasks, "tiny_ppl", text, output_type="loglikelihood_rolling", doc_to_text="",
        doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}],
    )  # fmt: skip
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run(
        [
            sys.executable, "-m", "llamalab.eval.lm_eval_cli", "run", "--model", "llamalab",
            "--model_args", f"model={smollm2_path}", "--tasks",
            "tiny_mc,tiny_gen,tiny_ppl", "--include_path", str(tasks), "--output_path", str(out),
            "--log_samples",
        ],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["tiny_mc"]["acc,none"] == 1.0  # as `llamalab eval` scores mc.jsonl
    assert results["tiny_mc"]["acc_norm,none"] == 0.5
    assert results["tiny_gen"]["exact_match,none"] in (0.0, 1.0)
    assert 1 < results["tiny_ppl"]["word_perplexity,none"] < 1e6
    (samples_file,) = out.rglob("samples_tiny_gen_*.jsonl")
    reply = json.loads(samples_file.read_text().splitlines()[0])["resps"][0][0]
    assert isinstance(reply, str) and "\n" not in reply
