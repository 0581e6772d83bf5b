"""How to sample: the validated settings, with no dependency on torch.

Kept apart from the sampling functions so that the command line can show the defaults
(``llamalab --help``) without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llamalab.errors import LlamalabError

# Probabilities are float32: a top_p below float32's smallest normal number (~1.2e-38)
# rounds to 0 there. Such a value is a mistake, not a preference (anything below ~1e-7
# already keeps only the most likely token), so it is refused rather than reinterpreted.
MIN_TOP_P = 1.2e-38
# Repetition penalties outside this range are not a preference but an overflow: dividing
# a logit by 1e-40 gives +inf, and the distribution becomes NaN.
REPEAT_PENALTY_RANGE = (0.01, 100.0)
SEED_LIMIT = 2**64  # torch.Generator takes a 64-bit unsigned seed


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token. ``temperature == 0`` means greedy (argmax).

    Every field is checked when the object is made, so a request with impossible
    settings is refused before it reaches a batch; :class:`LlamalabError` names the field.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature)
        if not temperature >= 0:
            raise LlamalabError(f"temperature must be at least 0, got {self.temperature}")
        top_p = _real("top_p", self.top_p)
        if not MIN_TOP_P <= top_p <= 1:
            raise LlamalabError(
                f"top_p must be in [{MIN_TOP_P:g}, 1] (smaller values underflow), got {self.top_p}"
            )
        if not 0 <= _real("min_p", self.min_p) <= 1:
            raise LlamalabError(f"min_p must be in [0, 1], got {self.min_p}")
        lo, hi = REPEAT_PENALTY_RANGE
        if not lo <= _real("repeat_penalty", self.repeat_penalty) <= hi:
            raise LlamalabError(
                f"repeat_penalty must be in [{lo}, {hi}] (1 = off), got {self.repeat_penalty}"
            )
        if _integer("top_k", self.top_k) < 0:
            raise LlamalabError(f"top_k must be at least 0 (0 = off), got {self.top_k}")
        if _integer("repeat_last_n", self.repeat_last_n) < 0:
            raise LlamalabError(
                f"repeat_last_n must be at least 0 (0 = off), got {self.repeat_last_n}"
            )
        if self.seed is not None and not 0 <= _integer("seed", self.seed) < SEED_LIMIT:
            raise LlamalabError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """Whether every draw is the single most likely token."""
        return self.temperature == 0 or self.top_k == 1


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, or a LlamalabError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LlamalabError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise LlamalabError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    """``value`` as an int (bools refused), or a LlamalabError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LlamalabError(f"{name} must be an integer, got {value!r}")
    return value


GREEDY = SamplingParams(temperature=0.0)
