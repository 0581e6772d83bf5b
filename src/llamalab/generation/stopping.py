"""Stop strings over streamed text: never print a stop string, even one split across tokens.

Text that could still turn out to be the start of a stop string is held back until the
next token shows whether it is; everything else is released at once.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas; get back what is safe to emit, and whether a stop string appeared."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.emitted = ""  # everything released so far
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add newly decoded text; return the part that can be shown now."""
        if self.stopped:
            return ""
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return self._release(text[: min(hits)])
        keep = self._longest_partial_stop(text)
        self._held = text[len(text) - keep :] if keep else ""
        return self._release(text[: len(text) - keep])

    def flush(self) -> str:
        """At the end of generation, release what was held back (it never became a stop)."""
        held, self._held = self._held, ""
        return self._release(held) if not self.stopped else ""

    def _release(self, text: str) -> str:
        self.emitted += text
        return text

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
