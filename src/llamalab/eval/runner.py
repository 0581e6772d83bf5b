"""Run a task on a model: score or generate every item, then summarise.

Multiple-choice items are scored by :class:`~llamalab.eval.likelihood.LikelihoodScorer`;
generation runs on the same :class:`~llamalab.generation.Engine` as ``llamalab
generate``; HumanEval replies run in :mod:`llamalab.eval.sandbox`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.eval.items import ChoiceItem, Task
from llamalab.eval.scoring import ANSWER_CONTEXT, macro_average, mean_and_stderr, pick_choices
from llamalab.generation.params import DEFAULT_LOOKUP

METRIC_OF_NORM = {"raw": "acc", "char": "acc_char", "answer": "acc_answer"}
PASS_AT = (1, 10, 100)


def scoring_kernels(model) -> AbstractContextManager:
    """The kernel setting evaluation scores and generates under, for as long as the
    ``with`` block lasts: on llamalab's packed kernels, a second int8 pass over every
    activation row (its rounding residual; ``kernels.native.activation_passes``).

    Scores decide between near ties, and one pass moved SmolLM2's MMLU log-likelihoods
    by up to 0.10 from float32, flipping 9 of 200 5-shot picks; with two, 0.0006 and
    none. Elsewhere (float32, torch's kernels, a GPU) and on tensor-parallel ranks (whose
    other ranks would not follow the setting) nothing changes."""
    import contextlib

    from llamalab.kernels import isa_in_use
    from llamalab.parallel.launch import world_size

    if world_size() > 1 or isa_in_use(model) == "torch":
        return contextlib.nullcontext()
    from llamalab.kernels.native import activation_passes

    return activation_passes(2)


@dataclass
class EvalResult:
    """A task's headline figure, its other metrics, per-group figures and per-item records.

    ``records`` hold, for each scored item in file order, at least ``id`` (the item's
    0-based line number in its source file), ``prediction``, ``label`` and ``correct``.
    """

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    metrics: dict[str, float | None] = field(default_factory=dict)
    groups: dict[str, dict[str, float | None]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    # Generation tasks: speculation's drafted and accepted tokens (the replies are the
    # same as without it; only how fast they came differs).
    speculation: dict[str, int] | None = None

    def summary(self) -> dict[str, Any]:
        """The object ``--json`` prints."""
        return {
            "task": self.task,
            "metric": self.metric,
            "value": _finite(self.value),
            "stderr": _finite(self.stderr),
            "n": self.n,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            **({"groups": self.groups} if self.groups else {}),
            **({"speculation": self.speculation} if self.speculation is not None else {}),
        }


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _progress(iterable: Iterable, total: int, desc: str, show: bool):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="item", leave=False)


# ---------------------------------------------------------------------------- choices
def choice_pairs(tokenizer, item: ChoiceItem) -> tuple[list[int], list[list[int]]]:
    """An item's context tokens and each choice's own tokens (lm-eval's split)."""
    from llamalab.eval.likelihood import split_pairs

    pairs = split_pairs(tokenizer, item.context, item.continuations())
    context = pairs[0][0]
    if any(p[0] != context for p in pairs) or any(not p[1] for p in pairs):
        # Cannot happen for a non-empty context (its encoding does not depend on the
        # choice); an empty continuation means a choice merged into the context.
        raise LlamalabError(f"item {item.id}: a choice has no tokens of its own")
    return context, [p[1] for p in pairs]


def _dropped(scorer, context: list[int], continuations: list[list[int]]) -> int:
    # The scorer keeps the newest tokens that fit (lm-eval's rule); say how many it drops.
    window = getattr(scorer, "max_seq_len", None)  # a stand-in scorer may have no window
    longest = max(len(c) for c in continuations)
    return 0 if window is None else max(0, len(context) + longest - 1 - window)


def score_choice_items(
    scorer, tokenizer, items: list[ChoiceItem], answer_normalised: bool,
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:  # fmt: skip
    """Each item's log-likelihoods, the choice each normalisation picks, and how many of the
    context's oldest tokens were left out to fit the scorer's window (``dropped``), scored
    together where the scorer can (``score_many``: items of one few-shot prompt share its
    prefix and run in batches)."""
    from llamalab.eval.likelihood import split_pairs

    requests = [choice_pairs(tokenizer, item) for item in items]
    unconditional_requests = []
    if answer_normalised:
        for item in items:
            upairs = split_pairs(tokenizer, ANSWER_CONTEXT, item.continuations())
            unconditional_requests.append((upairs[0][0], [p[1] for p in upairs]))
    everything = requests + unconditional_requests
    if hasattr(scorer, "score_many"):
        scored = scorer.score_many(everything, on_done=on_done)
    else:  # a stand-in with score() only
        scored = []
        for context, continuations in everything:
            scored.append(scorer.score(context, continuations))
            if on_done is not None:
                on_done(1)
    out = []
    for k, (item, (context, continuations)) in enumerate(zip(items, requests, strict=True)):
        logprobs = [lp for lp, _ in scored[k]]
        unconditional = None
        if answer_normalised:
            unconditional = [lp for lp, _ in scored[len(items) + k]]
        out.append(
            {
                "logprobs": logprobs,
                "unconditional": unconditional,
                "picks": pick_choices(logprobs, item.choices, unconditional),
                "dropped": _dropped(scorer, context, continuations),
            }
        )
    return out


def run_choice(task: Task, scorer, tokenizer, *, progress: bool = False) -> EvalResult:
    """Score every multiple-choice item; the headline accuracy is ``task.norm``'s."""
    norms = ["raw", "char"] + (["answer"] if task.answer_normalised else [])
    if task.norm not in norms:
        raise LlamalabError(f"task {task.name} is not scored with the {task.norm!r} normalisation")
    items = list(task.items)
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(items) * (2 if task.answer_normalised else 1)
        bar = tqdm(total=total, desc=task.name, unit="item", leave=False)
    try:
        scores = score_choice_items(
            scorer, tokenizer, items, task.answer_normalised,
            on_done=bar.update if bar is not None else None,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    records = []
    for item, scored in zip(items, scores, strict=True):
        picks = scored["picks"]
        record = {
            "id": item.id,
            "prediction": picks.get(task.norm),
            "label": item.label,
            "correct": picks.get(task.norm) == item.label,
            **({"subject": item.group} if item.group else {}),
            "logprobs": scored["logprobs"],
            **({"unconditional": scored["unconditional"]} if task.answer_normalised else {}),
            "predictions": {n: picks.get(n) for n in norms},
            **({"context_tokens_dropped": scored["dropped"]} if scored["dropped"] else {}),
        }
        records.append(record)
    records.sort(key=lambda r: r["id"])
    metrics: dict[str, float | None] = {}
    groups: dict[str, dict[str, float | None]] = {}
    if task.groups:  # MMLU: macro-average over subjects, then per category
        by_subject: dict[str, list[dict]] = {}
        for r in records:
            by_subject.setdefault(r["subject"], []).append(r)
        for norm in norms:
            name = METRIC_OF_NORM[norm]
            per_subject = {
                s: mean_and_stderr([float(r["predictions"][norm] == r["label"]) for r in rs])
                for s, rs in by_subject.items()
            }
            metrics[name], metrics[f"{name}_stderr"] = macro_average(list(per_subject.values()))
            for s, (m, _) in per_subject.items():
                groups.setdefault(s, {"n": len(by_subject[s])})[name] = m
            for category in sorted(set(task.groups.values())):
                members = [v for s, v in per_subject.items() if task.groups.get(s) == category]
                if members:
                    groups.setdefault(category, {"n": None})[name] = macro_average(members)[0]
    else:
        for norm in norms:
            name = METRIC_OF_NORM[norm]
            values = [float(r["predictions"][norm] == r["label"]) for r in records]
            metrics[name], metrics[f"{name}_stderr"] = mean_and_stderr(values)
    headline = METRIC_OF_NORM[task.norm]
    return EvalResult(
        task.name, headline, metrics[headline], metrics[f"{headline}_stderr"], len(records),
        metrics, groups, records,
    )  # fmt: skip


# ---------------------------------------------------------------------------- generation
def generate_texts(
    engine, tokenizer, prompts: list[str], *, sampling, max_tokens: int, stop: tuple[str, ...],
    batch_size: int, progress: bool = False, desc: str = "generate",
    seeds: list[int | None] | None = None, lookup=DEFAULT_LOOKUP,
    drafts: dict[str, int] | None = None,
) -> list[str]:  # fmt: skip
    """The reply to each prompt, generated ``batch_size`` at a time on ``engine``.

    ``lookup`` is each request's prompt lookup (None: off); ``drafts``, if given, gets the
    drafted and accepted tokens added to its ``draft_tokens`` and ``accepted_draft_tokens``.
    """
    from dataclasses import replace

    from llamalab.generation import Request

    # Every prompt is encoded and checked first: one that does not fit fails the run
    # before any generating, not after hours. Repeated prompts (samples) are encoded once.
    encoded: dict[str, list[int]] = {}
    for text in prompts:
        if text not in encoded:
            ids = tokenizer.encode(text, special=False)
            if engine.max_seq_len - len(ids) < 1:
                raise LlamalabError(
                    f"a prompt of {len(ids)} tokens does not fit the context of "
                    f"{engine.max_seq_len} (--ctx)"
                )
            encoded[text] = ids
    out: list[str] = []
    batches = range(0, len(prompts), batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="item", leave=False)
    try:
        for at in batches:
            requests = []
            for i in range(at, min(at + batch_size, len(prompts))):
                ids = encoded[prompts[i]]
                params = sampling if seeds is None else replace(sampling, seed=seeds[i])
                room = engine.max_seq_len - len(ids)
                requests.append(
                    Request(ids, max_tokens=min(max_tokens, room), sampling=params, stop=stop,
                            lookup=lookup)
                )  # fmt: skip
            for seq in engine.generate_batch(requests):
                if seq.finish_reason == "error":
                    raise LlamalabError(f"generation failed: {seq.text or 'internal error'}")
                out.append(seq.text)
                if drafts is not None:
                    drafts["draft_tokens"] = drafts.get("draft_tokens", 0) + seq.timing.draft_tokens
                    accepted = drafts.get("accepted_draft_tokens", 0) + seq.timing.accepted_tokens
                    drafts["accepted_draft_tokens"] = accepted
            if bar is not None:
                bar.update(len(requests))
    finally:
        if bar is not None:
            bar.close()
    return out


def run_generate(
    task: Task, engine, tokenizer, *, batch_size: int = 1, progress: bool = False,
    extract: Callable[[str], str | None] | None = None, lookup=DEFAULT_LOOKUP,
) -> EvalResult:  # fmt: skip
    """Greedy replies; exact match of the extracted answer (GSM8K: the final number).
    ``lookup``: the replies' prompt lookup (None: off), which changes their speed only."""
    from llamalab.generation.params import GREEDY

    drafts = {"draft_tokens": 0, "accepted_draft_tokens": 0}
    replies = generate_texts(
        engine, tokenizer, [i.prompt for i in task.items], sampling=GREEDY,
        max_tokens=task.max_tokens, stop=task.stop, batch_size=batch_size, progress=progress,
        desc=task.name, lookup=lookup, drafts=drafts,
    )  # fmt: skip
    if extract is None:

        def extract(reply: str) -> str:
            return reply.strip()

    records = []
    for item, reply in zip(task.items, replies, strict=True):
        answer = extract(reply)
        expected = item.answer.strip()
        records.append(
            {"id": item.id, "prediction": answer, "label": expected, "correct": answer == expected,
             "reply": reply}
        )  # fmt: skip
    value, stderr = mean_and_stderr([float(r["correct"]) for r in records])
    return EvalResult(
        task.name, "exact_match", value, stderr, len(records),
        {"exact_match": value, "exact_match_stderr": stderr}, {}, records, drafts,
    )  # fmt: skip


def run_code(
    task: Task, engine, tokenizer, *, samples: int = 1, temperature: float = 0.1,
    top_p: float = 0.95, batch_size: int = 1, seed: int | None = None, progress: bool = False,
    limits=None, lookup=DEFAULT_LOOKUP,
) -> EvalResult:  # fmt: skip
    """HumanEval: ``samples`` replies per problem, run in the sandbox; pass@k for k ≤ samples.

    The paper's settings: pass@1 at temperature 0.1, pass@100 at 0.8 (with ``samples``
    well above 100, e.g. 200, for the unbiased estimator to be tight); top-p 0.95.
    """
    from llamalab.eval.passk import mean_pass_at_k
    from llamalab.eval.sandbox import run_program
    from llamalab.eval.tasks.humaneval import program
    from llamalab.generation.params import SamplingParams

    sampling = SamplingParams(temperature=temperature, top_k=0, top_p=top_p, min_p=0.0)
    prompts = [i.prompt for i in task.items for _ in range(samples)]
    seeds = None
    if seed is not None:
        seeds = [(seed + k) % 2**64 for k in range(len(prompts))]
    drafts = {"draft_tokens": 0, "accepted_draft_tokens": 0}
    replies = generate_texts(
        engine, tokenizer, prompts, sampling=sampling, max_tokens=task.max_tokens,
        stop=task.stop, batch_size=batch_size, progress=progress, desc=task.name, seeds=seeds,
        lookup=lookup, drafts=drafts,
    )  # fmt: skip
    records, counts = [], []
    runs = _progress(range(len(task.items)), len(task.items), "tests", progress)
    for p in runs:
        item = task.items[p]
        mine = replies[p * samples : (p + 1) * samples]
        outcomes = [run_program(program(item, reply), limits) for reply in mine]
        passed = sum(o.passed for o in outcomes)
        counts.append((samples, passed))
        records.append(
            {
                "id": item.id,
                "task_id": item.extra["task_id"],
                "prediction": mine[0],
                "label": None,
                "correct": outcomes[0].passed,
                "passed": passed,
                "samples": samples,
                "status": [o.status for o in outcomes],
                **({"predictions": mine} if samples > 1 else {}),
            }
        )
    metrics: dict[str, float | None] = {}
    for k in PASS_AT:
        if k <= samples:
            metrics[f"pass@{k}"] = mean_pass_at_k(counts, k)
    per_problem = [c / n for n, c in counts]
    value, stderr = mean_and_stderr(per_problem)
    metrics["pass@1_stderr"] = stderr
    return EvalResult(
        task.name, "pass@1", value, stderr, len(records), metrics, {}, records, drafts
    )


# ---------------------------------------------------------------------------- perplexity
def run_perplexity(
    files, scorer, tokenizer, *, window: int, stride: int, progress: bool = False
) -> EvalResult:
    """Token perplexity and bits per byte over documents (files), each scored on its own."""
    from llamalab.eval.perplexity import (
        PerplexityResult,
        document_tokens,
        read_document,
        score_document,
    )

    window = min(window, scorer.max_seq_len)
    total = PerplexityResult()
    records = []
    for i, path in enumerate(_progress(files, len(files), "perplexity", progress)):
        text = read_document(path)
        one = PerplexityResult()
        tokens = document_tokens(tokenizer, text)
        score_document(scorer, tokens, window, stride, one)
        one.bytes = len(text.encode("utf-8"))
        one.documents = 1
        for name in ("nll", "tokens", "bytes", "windows", "documents"):
            setattr(total, name, getattr(total, name) + getattr(one, name))
        records.append(
            {"id": i, "file": str(path), "prediction": _finite(one.perplexity), "label": None,
             "correct": None, "tokens": one.tokens, "bytes": one.bytes, "nll": one.nll,
             "bits_per_byte": _finite(one.bits_per_byte)}
        )  # fmt: skip
    if total.tokens == 0:
        raise LlamalabError("the documents hold no tokens to score")
    metrics = {
        "perplexity": total.perplexity,
        "bits_per_byte": total.bits_per_byte,
        "tokens": float(total.tokens),
        "bytes": float(total.bytes),
        "windows": float(total.windows),
    }
    return EvalResult("perplexity", "perplexity", total.perplexity, None, total.documents,
                      metrics, {}, records)  # fmt: skip
