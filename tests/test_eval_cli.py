"""``llamalab eval`` on the command line, on the default path (``--dtype auto``): a user
task end to end, generation tasks on the Engine, and bad input as one error line without
a traceback. Differences from float32 are bounded in test_eval_default_path.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from llamalab.eval import data

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


@pytest.mark.slow
def test_user_multiple_choice_task_prints_the_json_object_and_writes_items(tmp_path, smollm2_path):
    out = tmp_path / "items.jsonl"
    result = run_cli(
        "eval", "--model", str(smollm2_path), "--task", str(FIXTURES / "mc.jsonl"), "--json",
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert {"task", "metric", "value", "stderr", "n"} <= summary.keys()
    assert summary["task"] == "mc.jsonl" and summary["metric"] == "acc_char"
    assert summary["n"] == 4 and 0 <= summary["value"] <= 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3]  # line numbers, in file order
    for r in records:
        assert {"id", "prediction", "label", "correct"} <= r.keys()
        assert r["correct"] == (r["prediction"] == r["label"])
    # The easiest item: the model knows the capital of France, raw and per character.
    assert records[0]["predictions"] == {"raw": 0, "char": 0}
    assert summary["value"] == sum(r["correct"] for r in records) / 4


@pytest.fixture(scope="module")
def cli_main():
    from llamalab.cli import main

    return main


@pytest.mark.slow
def test_generation_tasks_run_on_the_engine(tmp_path, smollm2_path, cli_main, capsys):
    path = tmp_path / "gen.jsonl"
    path.write_text(
        '{"prompt": "Q: What is the capital of France?\\nA:", "answer": "Paris"}\n'
        '{"prompt": "Q: What is 2 + 2?\\nA:", "answer": "4"}\n'
    )
    out = tmp_path / "gen_items.jsonl"
    args = ["eval", "-m", str(smollm2_path), "--task", str(path), "--json", "--max-tokens", "8"]
    assert cli_main([*args, "--output", str(out), "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"] == "exact_match" and summary["n"] == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in records] == ["Paris", "4"]
    assert all(r["prediction"] == r["reply"].strip() for r in records)
    # The replies are what `llamalab generate` gives for the same prompt, greedily.
    from llamalab.generation import GREEDY, Engine, Request
    from llamalab.runtime import load_runtime

    model, tokenizer = load_runtime(str(smollm2_path))  # the default path, as the CLI
    engine = Engine(model, tokenizer, max_seq_len=2048)
    request = Request(
        tokenizer.encode("Q: What is the capital of France?\nA:"), max_tokens=8, sampling=GREEDY,
        stop=["\n"],
    )  # fmt: skip
    (seq,) = engine.generate_batch([request])
    assert seq.text == records[0]["reply"]


@pytest.mark.slow
@pytest.mark.skipif(
    not (data.available("gsm8k") and data.available("humaneval")),
    reason=f"needs the data wheels ({data.INSTALL_LINE})",
)
def test_gsm8k_and_humaneval_smoke(tmp_path, smollm2_path, cli_main, capsys):
    base = ["eval", "-m", str(smollm2_path), "--json", "--limit", "1", "--max-tokens", "16"]
    assert cli_main([*base, "--task", "gsm8k", "--num-fewshot", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"] == "exact_match" and summary["n"] == 1
    out = tmp_path / "he.jsonl"
    assert cli_main([*base, "--task", "humaneval", "--samples", "2", "--seed", "1",
                     "--output", str(out)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"] == "pass@1" and {"pass@1"} <= summary["metrics"].keys()
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["task_id"] == "HumanEval/0" and record["samples"] == 2
    assert len(record["status"]) == 2


@pytest.mark.slow
def test_perplexity_of_a_folder(tmp_path, smollm2_path, cli_main, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 12)
    (folder / "b.txt").write_text("Pack my box with five dozen liquor jugs. " * 10)
    out = tmp_path / "docs.jsonl"
    args = ["eval", "-m", str(smollm2_path), "--task", "perplexity", "--data", str(folder)]
    assert cli_main([*args, "--ctx", "64", "--stride", "32", "--json", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "perplexity" and summary["n"] == 2
    metrics = summary["metrics"]
    assert 1 < summary["value"] < 50 and metrics["windows"] > 2 and metrics["bits_per_byte"] > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["file"]).name for r in records] == ["a.txt", "b.txt"]
    assert sum(r["tokens"] for r in records) == metrics["tokens"]


def _bad_jsonl(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "/nonexistent/items.jsonl"], "no such file"),
        (["--task", "hellaswag"], "unknown task 'hellaswag'"),
        (["--task", "BAD:{\"context\": \"a\", \"choices\": [\"x\"], \"label\": 0}\n{oops\n"],
         "bad.jsonl:2: not valid JSON"),
        (["--task", "BAD:{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"label\": 5}\n"],
         "label 5 is out of range"),
        (["--task", "perplexity"], "needs it"),
        (["--task", "perplexity", "--data", "/nonexistent/dir"], "no such file or folder"),
        (["--task", "mmlu", "--subjects", "astrology"], "unknown MMLU subject"),
        (["--task", "siqa", "--samples", "3"], "--samples applies"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_without_traceback(tmp_path, args, message):
    args = [
        _bad_jsonl(tmp_path, a.removeprefix("BAD:")) if a.startswith("BAD:") else a for a in args
    ]
    result = run_cli("eval", *args, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamalab: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
