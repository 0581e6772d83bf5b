"""How a multiple-choice answer is picked, and the summary statistics of a run.

The LLaMA paper (§3) ranks the completions of a context by their likelihood, normalised
by the number of characters of the completion; for OpenBookQA and BoolQ instead by the
ratio of the completion's likelihood given the context to its likelihood given
"Answer:" (Brown et al., 2020). The raw (unnormalised) score is reported as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

NORMALISATIONS = ("raw", "char", "answer")
ANSWER_CONTEXT = "Answer:"  # the neutral context of the "answer" normalisation


def argmax(scores: Sequence[float]) -> int:
    """Index of the highest score; the first one on a tie."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


@dataclass(frozen=True)
class ChoicePicks:
    """The choice each normalisation picks for one item."""

    raw: int
    char: int
    answer: int | None  # None when the item was not scored given "Answer:"

    def get(self, norm: str) -> int | None:
        """The pick of normalisation ``norm`` (one of ``NORMALISATIONS``)."""
        return getattr(self, norm)


def pick_choices(
    logprobs: Sequence[float],
    choices: Sequence[str],
    unconditional: Sequence[float] | None = None,
) -> ChoicePicks:
    """Pick a choice three ways.

    ``logprobs[i]``: log P(choice i | context); ``choices[i]``: its text, whose characters
    (without the space that joins it to the context) divide the per-character score;
    ``unconditional[i]``: log P(choice i | "Answer:"), for the "answer" normalisation:
    log P(c | context) - log P(c | "Answer:") is the log of the paper's likelihood ratio.
    """
    if len(logprobs) != len(choices) or not choices:
        raise ValueError("one log-probability per choice, and at least one choice")
    per_char = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    answer = None
    if unconditional is not None:
        answer = argmax([lp - u for lp, u in zip(logprobs, unconditional, strict=True)])
    return ChoicePicks(raw=argmax(logprobs), char=argmax(per_char), answer=answer)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / √n; None below 2)."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def macro_average(
    groups: Sequence[tuple[float, float | None]],
) -> tuple[float, float | None]:
    """The unweighted mean of per-group means, and its standard error from theirs."""
    if not groups:
        return math.nan, None
    mean = math.fsum(m for m, _ in groups) / len(groups)
    if any(s is None for _, s in groups):
        return mean, None
    return mean, math.sqrt(math.fsum(s * s for _, s in groups)) / len(groups)
