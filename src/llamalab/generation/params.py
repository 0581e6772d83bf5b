"""How to sample: the validated settings, with no dependency on torch.

Kept apart from the sampling functions so that the command line can show the defaults
(``llamalab --help``) without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
# OpenAI's limits for its presence_penalty, frequency_penalty and logit_bias parameters.
PRESENCE_FREQUENCY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS_ENTRIES = 300


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token. ``temperature == 0`` means greedy (argmax).

    Every field is checked when the object is made, so a request with impossible
    settings is refused before it reaches a batch; :class:`LlamalabError` names the field.

    ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` follow OpenAI's API:

    * ``presence_penalty`` and ``frequency_penalty`` (each in [-2, 2], 0 = off) lower
      a token's logit by ``frequency_penalty * count + presence_penalty * (count > 0)``,
      where ``count`` is how often the token occurs among the tokens generated so far in
      this completion. As in OpenAI's API, the prompt's tokens are not counted (unlike
      ``repeat_penalty``, which looks at the last ``repeat_last_n`` tokens, prompt
      included, as llama.cpp does). Negative values favour repetition.
    * ``logit_bias`` maps token ids (non-negative ints) to a bias in [-100, 100] added
      to their logits before anything else; at most 300 entries. It may be given as a
      mapping or as (id, bias) pairs and is stored as a tuple of pairs sorted by id, so
      that the object stays frozen and hashable. Whether each id is in the vocabulary
      is checked by the engine (``Engine.add``), which knows the vocabulary size.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()

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
        lo, hi = PRESENCE_FREQUENCY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not lo <= _real(name, value) <= hi:
                raise LlamalabError(f"{name} must be in [{lo:g}, {hi:g}] (0 = off), got {value}")
        # The dataclass is frozen: normalizing the field is the one write it allows itself.
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as validated (id, bias) pairs, sorted by id."""
        return self.logit_bias  # type: ignore[return-value]  # normalized in __post_init__

    @property
    def greedy(self) -> bool:
        """Whether every draw is the single most likely token."""
        return self.temperature == 0 or self.top_k == 1


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, or a LlamalabError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LlamalabError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (JSON allows any length)
        number = math.inf
    if not math.isfinite(number):
        raise LlamalabError(f"{name} must be a finite number, got {value!r}")
    return number


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """``value`` (a mapping or (id, bias) pairs) as sorted pairs, or a LlamalabError naming
    logit_bias."""
    if not isinstance(value, Mapping | tuple | list):
        raise LlamalabError(f"logit_bias must map token ids to biases, got {value!r}")
    # Counted before anything is copied or checked: the limit also bounds that work.
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise LlamalabError(
            f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}"
        )
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    if not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
        raise LlamalabError("logit_bias must map token ids to biases, or be (id, bias) pairs")
    lo, hi = LOGIT_BIAS_RANGE
    out: dict[int, float] = {}
    for token, bias in pairs:
        # Ids stay ints: a string such as "50256" (a JSON object key) is the caller's to
        # convert, so that a typo is not silently read as some other token.
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise LlamalabError(
                f"logit_bias keys must be token ids (integers from 0), got {token!r}"
            )
        if token in out:
            raise LlamalabError(f"logit_bias gives token {token} more than once")
        if not lo <= _real(f"logit_bias[{token}]", bias) <= hi:
            raise LlamalabError(f"logit_bias[{token}] must be in [{lo:g}, {hi:g}], got {bias}")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _integer(name: str, value: object) -> int:
    """``value`` as an int (bools refused), or a LlamalabError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LlamalabError(f"{name} must be an integer, got {value!r}")
    return value


GREEDY = SamplingParams(temperature=0.0)


# Prompt lookup's defaults. transformers and llama-cpp-python match 2-grams and draft 10
# tokens; a 3-gram is tried first here because a longer match predicts better (its
# acceptance is tracked apart), and the controller picks the draft length itself, so
# draft_max only bounds it.
DEFAULT_LOOKUP_NGRAM = 3
DEFAULT_DRAFT_MAX = 10
MAX_LOOKUP_NGRAM = 16  # a longer match adds nothing a 16-gram does not already say
MAX_DRAFT = 62  # one verification pass stays under the native step's 64 tokens


@dataclass(frozen=True)
class LookupParams:
    """Prompt lookup decoding: draft the tokens that followed the last ``ngram`` (or fewer)
    tokens where they occurred before, in the prompt or the reply, and verify them in
    one pass of the model. At most ``draft_max`` tokens are drafted at once; the engine
    chooses how many (none at all where drafts keep missing) from the acceptance it
    measures. The output is the same as without it."""

    ngram: int = DEFAULT_LOOKUP_NGRAM
    draft_max: int = DEFAULT_DRAFT_MAX

    def __post_init__(self) -> None:
        if not 1 <= _integer("lookup ngram", self.ngram) <= MAX_LOOKUP_NGRAM:
            raise LlamalabError(
                f"the lookup n-gram size must be between 1 and {MAX_LOOKUP_NGRAM}, got {self.ngram}"
            )
        if not 1 <= _integer("draft_max", self.draft_max) <= MAX_DRAFT:
            raise LlamalabError(
                f"the most tokens drafted at once must be between 1 and {MAX_DRAFT}, "
                f"got {self.draft_max}"
            )


DEFAULT_LOOKUP = LookupParams()
