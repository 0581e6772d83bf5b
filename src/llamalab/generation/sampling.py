"""Sampling as small pure functions: logits in, probabilities or a token out.

The order follows llama.cpp's default chain: the logit bias, then the penalties
(repetition, then presence and frequency), then top-k, top-p and min-p on the
temperature-scaled distribution, then a draw.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llamalab.errors import LlamalabError
from llamalab.generation.params import (  # noqa: F401  (re-exported: the sampling API)
    GREEDY,
    SamplingParams,
)


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add each (id, bias) pair's bias to that token's logit (OpenAI's ``logit_bias``)."""
    if not bias:
        return logits
    logits = logits.clone()
    ids, values = zip(*bias, strict=True)
    logits[list(ids)] += torch.tensor(values, dtype=logits.dtype)
    return logits


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: Mapping[int, int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: ``logit[t] -= frequency * counts[t] + presence * (counts[t] > 0)``.

    ``counts`` holds how often each token occurs among those generated so far (tokens
    absent from it occur 0 times), so the cost is in the number of distinct tokens seen.
    """
    if (presence == 0.0 and frequency == 0.0) or not counts:
        return logits
    ids = torch.tensor(list(counts.keys()), dtype=torch.long)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[ids] -= frequency * n + presence * (n > 0).to(logits.dtype)
    return logits


def apply_repetition_penalty(
    logits: torch.Tensor, recent_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make recently seen tokens less likely (CTRL's rule): positive logits are divided by
    ``penalty``, negative ones multiplied."""
    if penalty == 1.0 or recent_ids.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[recent_ids]
    logits[recent_ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def logits_to_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """The sampling distribution over the vocabulary (V,) after temperature and the filters.

    Raises :class:`LlamalabError` when no distribution exists (a NaN score, or every
    token ruled out); a score of +inf (an overflow) takes the whole mass.
    """
    logits = logits.float() / max(temperature, 1e-5)
    best = logits.max()
    if not torch.isfinite(best):
        if torch.isnan(best) or best < 0:
            raise LlamalabError("sampling failed: the model gave no finite score for any token")
        # softmax would give inf/inf = NaN; the overflowed tokens share the mass instead.
        logits = torch.where(logits == best, 0.0, float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p. The first token always stays,
        # even for a top_p so small that it rounds to 0 in float32.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop_sorted[0] = False
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    total = probs.sum()
    if not (torch.isfinite(total) and total > 0):
        raise LlamalabError("sampling failed: the probabilities are not finite")
    return probs / total


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    recent_ids: torch.Tensor | None = None,
    counts: Mapping[int, int] | None = None,
) -> int:
    """Choose the next token from one position's logits (V,).

    ``recent_ids`` are the tokens the repetition penalty looks at (llama.cpp's last
    ``repeat_last_n``, prompt included); ``counts`` how often each token was generated
    so far in this completion, for the presence and frequency penalties (OpenAI's rule:
    the whole completion, not a window, and not the prompt). The logit bias and the
    penalties apply before everything else, greedy choice (argmax) included. They only
    shape the choice: :func:`top_logprobs` on the same logits still reports the model's
    own distribution.

    Raises :class:`LlamalabError` when the scores hold a NaN: such a row has no meaningful
    next token (argmax would pick the NaN), and the caller fails that request alone.
    """
    # llama.cpp's chain: logit bias first, then its penalties sampler. That sampler applies
    # repeat, frequency and presence together over the last N tokens; here the latter two
    # count the whole completion instead, as OpenAI, whose parameters they are, defines.
    logits = apply_logit_bias(logits, params.logit_bias_pairs)
    if recent_ids is not None:
        logits = apply_repetition_penalty(logits, recent_ids, params.repeat_penalty)
    if counts is not None:
        logits = apply_presence_frequency_penalty(
            logits, counts, params.presence_penalty, params.frequency_penalty
        )
    # One pass finds both the choice and any NaN: argmax and max rank NaN above every
    # number, so a row holding one yields it (a separate isnan scan cost as much again).
    top = int(torch.argmax(logits))
    if bool(torch.isnan(logits[top])):
        raise LlamalabError("sampling failed: the model's scores are not numbers (NaN)")
    if params.greedy:
        return top
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``k`` most likely alternatives.

    Given the raw logits, these are the model's own probabilities: neither temperature
    nor the filters, the logit bias or the penalties that :func:`sample` applies.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logprobs[token])
    if k <= 0:
        return chosen, []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))
