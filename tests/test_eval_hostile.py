"""``llamalab eval`` against hostile or mistaken input: an --output that exists, user JSONL
files with huge numbers, lone surrogates, a byte-order mark or far too much text, a model
whose context is shorter than the default window, and MMLU zero-shot's scored set."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_tiny_gguf

from llamalab.errors import LlamalabError
from llamalab.eval import data
from llamalab.eval.tasks import load_task

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


def _one_error_line(result, *needles: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamalab: error:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 9, n))


# ----------------------------------------------------------------------------- --output
def test_output_that_exists_is_refused_before_any_work(tmp_path):
    task = tmp_path / "items.jsonl"
    task.write_bytes((FIXTURES / "mc.jsonl").read_bytes())
    before = task.read_bytes()
    # The task file itself as --output, and a model that does not exist: the refusal
    # comes first, so nothing was loaded and nothing written.
    result = run_cli(
        "eval", "--task", str(task), "--output", str(task), "--model", "/nonexistent.gguf",
        timeout=120,
    )  # fmt: skip
    _one_error_line(result, str(task), "already exists", "nothing was overwritten")
    assert task.read_bytes() == before
    link = tmp_path / "dangling.jsonl"
    link.symlink_to(tmp_path / "nowhere")
    result = run_cli("eval", "--task", str(task), "--output", str(link), timeout=120)
    _one_error_line(result, "already exists")
    result = run_cli("eval", "--task", str(task), "--output", str(tmp_path / "no" / "x.jsonl"))
    _one_error_line(result, "does not exist")


def test_records_are_written_to_a_new_file_only(tmp_path):
    from llamalab.cli.eval import write_records

    out = tmp_path / "out.jsonl"
    write_records(out, [{"id": 0, "prediction": 1}, {"id": 1, "prediction": "é"}])
    assert [json.loads(line) for line in out.read_text("utf-8").splitlines()] == [
        {"id": 0, "prediction": 1},
        {"id": 1, "prediction": "é"},
    ]
    # A file that appeared while the run went on is kept, and no temporary file is left.
    out.write_text("precious\n")
    with pytest.raises(LlamalabError, match="nothing was overwritten"):
        write_records(out, [{"id": 0}])
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# ----------------------------------------------------------------------------- user JSONL
def _write(tmp_path: Path, lines: list[str], name: str = "task.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_number_of_5001_digits_is_one_clear_error(tmp_path):
    path = _write(
        tmp_path, ['{"context": "a", "choices": ["x", "y"], "label": 1' + "0" * 5000 + "}"]
    )
    with pytest.raises(
        LlamalabError, match=r"task.jsonl:1: holds a number of more than 4300 digits"
    ):
        load_task(str(path))


def test_a_lone_surrogate_is_one_clear_error(tmp_path):
    path = _write(tmp_path, ['{"context": "Paris is \\ud800 the", "choices": ["x"], "label": 0}'])
    with pytest.raises(LlamalabError, match=r"task.jsonl:1: 'context' holds a lone surrogate"):
        load_task(str(path))
    path = _write(tmp_path, ['{"context": "a", "choices": ["x", "\\udfff"], "label": 0}'])
    with pytest.raises(LlamalabError, match="choice 1 holds a lone surrogate"):
        load_task(str(path))
    path = _write(tmp_path, ['{"prompt": "a", "answer": "\\udc80"}'])
    with pytest.raises(LlamalabError, match="'answer' holds a lone surrogate"):
        load_task(str(path))


def test_a_byte_order_mark_opening_the_file_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "mc.jsonl").read_bytes())
    task = load_task(str(path))
    assert [i.id for i in task.items] == [0, 1, 2, 3]
    assert task.items[0].context == "The capital of France is"


def test_far_too_long_contexts_are_refused_at_once(tmp_path):
    one = _write(
        tmp_path, [json.dumps({"context": _words(150_000), "choices": ["a", "b"], "label": 0})]
    )
    start = time.monotonic()
    with pytest.raises(LlamalabError, match=r"task.jsonl:1: 'context' is [0-9,]+ characters long"):
        load_task(str(one))
    lines = [
        json.dumps({"context": _words(30_000, i), "choices": ["a", "b"], "label": 0})
        for i in range(7)
    ]
    # Each item alone is too long already; shorter items whose exemplars make it so:
    shots = [
        json.dumps({"context": _words(4_000, i), "choices": ["a", "b"], "label": 0})
        for i in range(7)
    ]
    with pytest.raises(LlamalabError, match="'context' is"):
        load_task(str(_write(tmp_path, lines, "five.jsonl")), num_fewshot=5)
    with pytest.raises(
        LlamalabError, match=r"five.jsonl:6: with its 5 exemplars .* smaller --num-fewshot"
    ):
        load_task(str(_write(tmp_path, shots, "five.jsonl")), num_fewshot=5)
    assert time.monotonic() - start < 10  # they were refused, not tokenized or scored


@pytest.mark.slow
def test_hostile_user_files_on_the_command_line(tmp_path, smollm2_path):
    """The reported cases, as a user runs them: one error line each, in seconds."""
    cases = [
        (['{"context": "a", "choices": ["x", "y"], "label": 1' + "0" * 5000 + "}"], "4300 digits"),
        (['{"context": "\\ud800", "choices": ["x", "y"], "label": 0}'], "lone surrogate"),
        ([json.dumps({"context": _words(150_000), "choices": ["a", "b"], "label": 0})], "characters long"),
    ]  # fmt: skip
    for lines, message in cases:
        path = _write(tmp_path, lines)
        start = time.monotonic()
        result = run_cli("eval", "--task", str(path), "-m", str(smollm2_path), timeout=120)
        _one_error_line(result, message)
        assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_prompt_longer_than_the_window_loses_its_oldest_tokens(tmp_path, smollm2_path):
    """As lm-eval's models do: the result comes, with a note and a per-item count."""
    from llamalab.eval.likelihood import split_pair
    from llamalab.tokenizer import load_tokenizer

    context = _words(300) + " The capital of France is"
    path = _write(
        tmp_path, [json.dumps({"context": context, "choices": ["Paris", "Berlin"], "label": 0})]
    )
    out = tmp_path / "records.jsonl"
    result = run_cli(
        "eval", "--task", str(path), "-m", str(smollm2_path), "--ctx", "64", "--json",
        "--output", str(out), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 of 1 prompts lost their oldest tokens" in result.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = load_tokenizer(smollm2_path)
    head, cont = split_pair(tokenizer, context, " Paris")
    assert record["context_tokens_dropped"] == len(head) + len(cont) - 1 - 64
    assert json.loads(result.stdout)["n"] == 1


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_data_that_is_a_fifo_is_named_as_one(tmp_path):
    """A FIFO exists: "no such file" sent its user looking for a typo. Nobody writes to it,
    so the run must refuse it without opening it (which would wait forever)."""
    import os

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    result = run_cli("eval", "--task", "perplexity", "--data", str(fifo), timeout=60)
    line = _one_error_line(result, str(fifo), "FIFO")
    assert "no such file" not in line
    assert line.endswith("not a regular file or folder")


@pytest.mark.slow
def test_perplexity_window_and_stride_follow_a_short_model_context(tmp_path, smollm2_path):
    from llamalab.tokenizer import load_tokenizer

    model = write_tiny_gguf(tmp_path / "ctx128.gguf", smollm2_path, context_length=128)
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    n = 1 + len(load_tokenizer(smollm2_path).encode(doc.read_text(), add_bos=False, special=False))
    assert n > 300
    # Hugging Face's sliding-window recipe over n tokens: a first window of 128, then one
    # more window per 64 new tokens (half the 128-token window actually used).
    expected_windows = 1 + math.ceil((n - 128) / 64)
    for extra in ([], ["--ctx", "4096"]):
        result = run_cli(
            "eval", "--task", "perplexity", "--data", str(doc), "-m", str(model), "--json",
            *extra, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        metrics = json.loads(result.stdout)["metrics"]
        assert metrics["windows"] == expected_windows and metrics["tokens"] == n - 1
    result = run_cli(
        "eval", "--task", "perplexity", "--data", str(doc), "-m", str(model), "--stride", "128",
        timeout=300,
    )  # fmt: skip
    _one_error_line(result, "--stride must be 1 to 127", "window of 128 tokens")


# ----------------------------------------------------------------------------- MMLU
@pytest.mark.skipif(not data.available("mmlu"), reason=f"needs the MMLU data ({data.INSTALL_LINE})")
def test_mmlu_zero_shot_scores_every_item_of_a_subject():
    counts: dict[str, int] = {}
    for line in data.read_verified("mmlu").decode("utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            if obj["question"] != "question":  # the file's two stray CSV header rows
                counts[obj["topic"]] = counts.get(obj["topic"], 0) + 1
    subjects = ["college mathematics", "high school physics"]
    total = sum(counts[s] for s in subjects)
    names = [s.replace(" ", "_") for s in subjects]
    zero = load_task("mmlu", subjects=names, num_fewshot=0)
    assert len(zero.items) == total
    assert len({i.id for i in zero.items}) == total
    for shots in (1, 5):  # with exemplars shown, the five of each subject stay out
        assert len(load_task("mmlu", subjects=names, num_fewshot=shots).items) == total - 10
