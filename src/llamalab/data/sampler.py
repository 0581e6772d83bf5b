"""The mixture sampler: which window of which source each training sequence is.

The paper (Table 1) samples its sources in fixed proportions, so small, good sources
(Wikipedia, Books) are seen for more than two epochs while the big one (CommonCrawl) is
seen about once. This sampler does the same, exactly and deterministically:

- Each source is cut into ``n`` windows (the training code decides their length; window
  ``w`` is ``tokens[w·L : w·L + L + 1]``, documents packed back to back).
- The global order is one infinite sequence of ``(source, window)`` items. The source of
  each item is chosen by *smooth weighted round robin* on integer weights: every source
  gains its weight in credit, the richest is picked and pays the total. Over any stretch
  of items each source's share is within one item of its weight: the proportions hold
  exactly, not only in expectation, and there is no random number to replay.
- Inside a source, the j-th draw is window ``perm_e(j mod n)`` of epoch ``e = j // n``,
  where ``perm_e`` is a pseudo-random permutation of ``range(n)`` keyed by (seed, source,
  epoch): a small Feistel network with cycle walking, so it costs no memory, however big
  the source.
- Rank ``r`` of ``W`` takes global items ``r, r+W, r+2W, …``: every world size sees the
  same global order, and resuming with another world size continues it.

The state (global position, credits, draws per source) is a small dict that
`state_dict` returns and `load_state_dict` restores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llamalab.errors import LlamalabError

_MASK64 = (1 << 64) - 1
WEIGHT_SCALE = 1_000_000  # float weights become integers with this resolution


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def permute(index: int, n: int, key: int) -> int:
    """``index``'s image under a keyed pseudo-random permutation of ``range(n)``.

    A 4-round Feistel network over the smallest even number of bits that covers ``n``
    is a permutation of that power of two; applying it again until the value falls
    below ``n`` (cycle walking) restricts it to a permutation of ``range(n)``.
    """
    if not 0 <= index < n:
        raise ValueError(f"index {index} outside range({n})")
    if n == 1:
        return 0
    half = max(1, math.ceil(math.log2(n) / 2))
    mask = (1 << half) - 1
    x = index
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix64(key ^ (r << 56) ^ right) & mask)
        x = (left << half) | right
        if x < n:
            return x


def integer_weights(weights: Mapping[str, float]) -> dict[str, int]:
    """Float weights as positive integers in the same proportions (zero stays zero)."""
    total = sum(weights.values())
    out = {}
    for name, w in weights.items():
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise LlamalabError(f"weight of source {name!r} must be a number ≥ 0, got {w!r}")
        out[name] = 0 if w == 0 else max(1, round(w / total * WEIGHT_SCALE))
    return out


class MixtureSampler:
    """Deterministic weighted interleaving of sources, sliced per rank (see module docstring).

    Args:
        windows: number of windows per source, ``{name: n}`` (order matters: it is the
            tie-break order, keep it stable).
        weights: sampling proportions per source (any positive scale). ``None``: in
            proportion to size (``windows``). A source left out, or weighted 0, is
            never sampled.
        seed: keys the permutations.
        rank, world_size: this process's slice of the global order.
    """

    def __init__(
        self,
        windows: Mapping[str, int],
        weights: Mapping[str, float] | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.names = list(windows)
        self.windows = [int(windows[n]) for n in self.names]
        if weights is None:
            ints = dict(zip(self.names, self.windows, strict=True))
        else:
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise LlamalabError(
                    f"weights name unknown sources {', '.join(unknown)}; "
                    f"the data has {', '.join(self.names)}"
                )
            ints = integer_weights({n: weights.get(n, 0.0) for n in self.names})
        self.weights = [ints[n] for n in self.names]
        for name, n, w in zip(self.names, self.windows, self.weights, strict=True):
            if w and n < 1:
                raise LlamalabError(f"source {name!r} has no whole window to sample")
        self.total_weight = sum(self.weights)
        if self.total_weight <= 0:
            raise LlamalabError("every source has weight 0: nothing to sample")
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.position = 0  # global items consumed by all ranks together
        self.credits = [0] * len(self.names)
        self.draws = [0] * len(self.names)

    # ------------------------------------------------------------------ the order
    def _pick(self) -> int:
        for i, w in enumerate(self.weights):
            self.credits[i] += w
        best = max(range(len(self.names)), key=lambda i: (self.credits[i], -i))
        self.credits[best] -= self.total_weight
        return best

    def _window(self, source: int, draw: int) -> int:
        n = self.windows[source]
        epoch, j = divmod(draw, n)
        key = _mix64(_mix64(self.seed) ^ _mix64((source << 40) ^ epoch))
        return permute(j, n, key)

    def take(self, count: int) -> list[tuple[str, int]]:
        """This rank's next ``count`` items, ``(source name, window index)``.

        The global order advances by ``count × world_size`` items: every rank must call
        this with the same ``count``.
        """
        mine = []
        for _ in range(count):
            for r in range(self.world_size):
                s = self._pick()
                draw = self.draws[s]
                self.draws[s] += 1
                if r == self.rank:
                    mine.append((self.names[s], self._window(s, draw)))
            self.position += self.world_size
        return mine

    # ------------------------------------------------------------------ accounting
    def epochs(self) -> dict[str, float]:
        """Epochs seen so far per source, by all ranks together (Table 1's last column)."""
        return {
            n: (d / w if w else 0.0)
            for n, d, w in zip(self.names, self.draws, self.windows, strict=True)
        }

    def proportions(self) -> dict[str, float]:
        """Each source's sampling proportion."""
        return {n: w / self.total_weight for n, w in zip(self.names, self.weights, strict=True)}

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        return {"names": self.names, "windows": self.windows, "weights": self.weights}

    def state_dict(self) -> dict[str, Any]:
        """The position in the global order (JSON-serialisable)."""
        return {
            "position": self.position,
            "credits": list(self.credits),
            "draws": list(self.draws),
            "seed": self.seed,
            **self._identity(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; it must come from a sampler over the same data and weights."""
        mismatch = [k for k, v in self._identity().items() if state.get(k) != v]
        if mismatch or state.get("seed") != self.seed:
            raise LlamalabError(
                "the saved data position belongs to other data, weights or seed "
                f"({', '.join(mismatch) or 'seed'} differ); use a new out_dir"
            )
        position = int(state["position"])
        self.position = position
        self.credits = [int(c) for c in state["credits"]]
        self.draws = [int(d) for d in state["draws"]]
