"""Sampling as small pure functions: logits in, probabilities or a token out.

The order of the filters follows llama.cpp's default chain: repetition penalty, then
top-k, top-p and min-p on the temperature-scaled distribution, then a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamalab.errors import LlamalabError


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LlamalabError(f"temperature must be at least 0, got {self.temperature}")
        if self.top_k < 0:
            raise LlamalabError(f"top_k must be at least 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlamalabError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise LlamalabError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise LlamalabError(f"repeat_penalty must be positive, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise LlamalabError(f"repeat_last_n must be at least 0 (0 = off), got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams(temperature=0.0)


def apply_repetition_penalty(logits: torch.Tensor, recent_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make recently seen tokens less likely: positive logits divided, negative multiplied (CTRL's rule)."""
    if penalty == 1.0 or recent_ids.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[recent_ids]
    logits[recent_ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def logits_to_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """The sampling distribution over the vocabulary (V,) after temperature and the filters."""
    logits = logits.float() / max(temperature, 1e-5)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    recent_ids: torch.Tensor | None = None,
) -> int:
    """Choose the next token from one position's logits (V,)."""
    if recent_ids is not None:
        logits = apply_repetition_penalty(logits, recent_ids, params.repeat_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``k`` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logprobs[token])
    if k <= 0:
        return chosen, []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))
