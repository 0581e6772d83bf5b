"""Every evaluation task on the path users run: ``--dtype auto``, which on a CPU with
AVX-512 VNNI, AVX-VNNI or AVX2 is llamalab's packed integer kernel and its native decode
step, under the kernel setting ``llamalab eval`` runs under (``runner.scoring_kernels``:
two int8 passes over each activation row).

That path may differ from float32 (the reference maths) in the last bits: it rounds
activations to 8 bits twice (the value, then its residual). So each test bounds the
difference against float32 on the same items instead of switching the kernel off:

* a choice's log-likelihood within ``PER_TOKEN`` nats per scored token;
* a greedy reply whose every token float32 also ranks within ``GREEDY_GAP`` nats of its
  best (where two tokens nearly tie, either is a right greedy choice);
* perplexity within ``PPL_RELATIVE``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llamalab.eval import data

pytestmark = pytest.mark.slow

# Measured on SmolLM2-135M Q4_1 against float32 with one int8 pass: at most 0.18 nats per
# token over 20 SIQA items (0.10 on MMLU and the user fixture), perplexity 1.4% higher.
# With the two passes evaluation runs: at most 0.0006 on 200 MMLU items (5-shot).
PER_TOKEN = 0.01
GREEDY_GAP = 0.05
PPL_RELATIVE = 0.002


def needs(*names):
    return pytest.mark.skipif(
        not all(data.available(n) for n in names),
        reason=f"the {', '.join(names)} data is not installed ({data.INSTALL_LINE})",
    )


@pytest.fixture(scope="module")
def packed(smollm2_path):
    """The default model as ``llamalab eval`` loads it by default (``--dtype auto``)."""
    from llamalab.eval.runner import scoring_kernels
    from llamalab.kernels import isa_in_use
    from llamalab.kernels.native import set_activation_passes, vnni_available
    from llamalab.runtime import load_runtime

    model, tokenizer = load_runtime(str(smollm2_path), "auto", device="cpu", threads=2)
    if vnni_available():  # on this kind of CPU the default is the packed kernel: test it
        assert isa_in_use(model) != "torch"
    with scoring_kernels(model):  # for this module's tests only
        if vnni_available():
            assert set_activation_passes(2) == 2  # what scoring_kernels set
        yield model, tokenizer
    assert set_activation_passes(1) == 1  # and set back after them


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from llamalab.runtime import load_runtime

    return load_runtime(str(smollm2_path), "float32", device="cpu", threads=2)


def _scorer(model, rows=4):
    from llamalab.eval.likelihood import LikelihoodScorer

    return LikelihoodScorer(model, max_seq_len=2048, max_rows=rows)


def _assert_close_scores(ours: list[dict], theirs: list[dict], tokenizer, items) -> None:
    """Per item and choice: |Δ log-likelihood| ≤ PER_TOKEN per token of the choice."""
    from llamalab.eval.likelihood import split_pairs

    by_id = {i.id: i for i in items}
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        item = by_id[a["id"]]
        lengths = [len(c) for _, c in split_pairs(tokenizer, item.context, item.continuations())]
        for x, y, n in zip(a["logprobs"], b["logprobs"], lengths, strict=True):
            assert abs(x - y) <= PER_TOKEN * n, (a["id"], x, y, n)
        # Where float32 prefers one choice by more than the bound allows, so does the packed path.
        ranked = sorted(b["logprobs"], reverse=True)
        if len(ranked) > 1 and ranked[0] - ranked[1] > 2 * PER_TOKEN * max(lengths):
            assert a["predictions"]["raw"] == b["predictions"]["raw"], a["id"]


# ----------------------------------------------------------------------------- scoring
def test_choices_of_one_new_token_each_after_a_shared_context(packed, reference):
    """Continuations of two tokens run as one batch of rows with one new token each: the
    native step took them with a stride-0 position tensor and refused the pass."""
    model, tokenizer = packed
    context = tokenizer.encode("Q: Where is the Eiffel Tower?\nA:", special=False)
    words = [" in Paris", " in Rome", " in Berlin"]
    continuations = [tokenizer.encode(w, special=False) for w in words]
    assert all(len(c) == 2 for c in continuations)
    ours = _scorer(model).score(context, continuations)
    theirs = _scorer(reference[0]).score(context, continuations)
    for (x, _), (y, _) in zip(ours, theirs, strict=True):
        assert abs(x - y) <= PER_TOKEN * 2
    assert max(range(3), key=lambda i: ours[i][0]) == 0  # Paris


@needs("siqa")
def test_siqa(packed, reference):
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task

    task = load_task("siqa", limit=8)  # the eighth item is where the native step refused
    ours = runner.run_choice(task, _scorer(packed[0]), packed[1])
    assert ours.n == 8 and 0 <= ours.value <= 1
    few = replace(task, items=task.items[5:8])  # float32 is slower: three items suffice
    theirs = runner.run_choice(few, _scorer(reference[0]), reference[1])
    _assert_close_scores(ours.records[5:8], theirs.records, packed[1], few.items)


@needs("mmlu")
def test_mmlu(packed, reference):
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task

    task = load_task("mmlu", subjects=["astronomy"], limit=2, num_fewshot=1)
    ours = runner.run_choice(task, _scorer(packed[0]), packed[1])
    theirs = runner.run_choice(task, _scorer(reference[0]), reference[1])
    assert ours.n == 2
    _assert_close_scores(ours.records, theirs.records, packed[1], task.items)


def test_user_multiple_choice_file_on_the_command_line(tmp_path, smollm2_path, reference):
    from llamalab.cli import main
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task

    fixture = str(Path(__file__).resolve().parent / "fixtures" / "eval" / "mc.jsonl")
    out = tmp_path / "records.jsonl"
    assert main(["eval", "-m", str(smollm2_path), "--task", fixture, "--output", str(out)]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    task = load_task(fixture)
    theirs = runner.run_choice(task, _scorer(reference[0]), reference[1])
    _assert_close_scores(ours, theirs.records, reference[1], task.items)
    assert ours[0]["predictions"] == {"raw": 0, "char": 0}  # the capital of France


def test_perplexity(packed, reference):
    from llamalab.eval.perplexity import PerplexityResult, document_tokens, score_document

    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs. " * 3
    values = []
    for model, tokenizer in (packed, reference):
        result = PerplexityResult()
        score_document(_scorer(model, rows=1), document_tokens(tokenizer, text), 64, 32, result)
        values.append(result.perplexity)
    assert abs(values[0] / values[1] - 1) <= PPL_RELATIVE, values


# ----------------------------------------------------------------------------- generation
def _assert_near_greedy(reference, prompt_ids: list[int], reply_ids: list[int]) -> None:
    """Every token of a greedy reply is one float32 ranks within GREEDY_GAP of its best."""
    model = reference[0]
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)
    at = len(prompt_ids) - 1
    for k, token in enumerate(reply_ids):
        row = logprobs[at + k]
        gap = float(row.max() - row[token])
        assert gap <= GREEDY_GAP, (k, token, gap)


def _engine(packed, rows=1, ctx=2048):
    from llamalab.generation import Engine

    return Engine(packed[0], packed[1], max_batch=rows, max_seq_len=ctx)


@needs("gsm8k")
def test_gsm8k(packed, reference):
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task
    from llamalab.eval.tasks.gsm8k import extract_answer
    from llamalab.generation import GREEDY, Request

    task = load_task("gsm8k", limit=2, num_fewshot=1, max_tokens=24)
    result = runner.run_generate(
        task, _engine(packed, 2), packed[1], batch_size=2, extract=extract_answer
    )
    assert result.n == 2 and all(r["reply"] for r in result.records)
    tokenizer = packed[1]
    prompt = tokenizer.encode(task.items[0].prompt, special=False)
    (seq,) = _engine(packed).generate_batch(
        [Request(prompt, max_tokens=24, sampling=GREEDY, stop=list(task.stop))]
    )
    assert seq.text == result.records[0]["reply"]  # what `llamalab generate` replies
    _assert_near_greedy(reference, prompt, seq.ids)


@needs("humaneval")
def test_humaneval(packed, reference):
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task
    from llamalab.generation import GREEDY, Request

    task = load_task("humaneval", limit=1, max_tokens=32)
    result = runner.run_code(
        task, _engine(packed), packed[1], samples=2, temperature=0.1, batch_size=1, seed=1
    )
    (record,) = result.records
    assert record["task_id"] == "HumanEval/0" and len(record["status"]) == 2
    assert set(record["status"]) <= {"passed", "failed", "timeout", "killed"}
    prompt = packed[1].encode(task.items[0].prompt, special=False)
    (seq,) = _engine(packed).generate_batch(
        [Request(prompt, max_tokens=32, sampling=GREEDY, stop=list(task.stop))]
    )
    assert seq.ids
    _assert_near_greedy(reference, prompt, seq.ids)
