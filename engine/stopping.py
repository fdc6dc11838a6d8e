"""Stop strings, found in the streamed text of one sequence.

A stop string may arrive split over several deltas, so text that could be its beginning is held back until the
next deltas show whether it is. The first stop string to be *completed* reading left to right wins (on a tie, the
longer one, which starts earlier); that rule gives the same answer however the text is split into deltas.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, stop: tuple[str, ...]) -> None:
        assert all(stop), "stop strings must be non-empty"
        self._stop = tuple(stop)
        self._held = ""  # the longest tail of the text seen that is a proper prefix of some stop string
        self.matched: str | None = None

    def feed(self, text_delta: str, may_match: bool = True) -> tuple[str, str | None]:
        """Returns (text safe to emit now, the stop string matched or None).

        On a match the emitted text ends right before the stop string, and the stop string and everything after
        it are dropped; the sequence is then finished and must not be fed again. With may_match False (the
        output is still shorter than its min_tokens) nothing matches: the text passes, less a possible start.
        """
        assert self.matched is None, "fed after a stop string matched"
        if not self._stop:
            return text_delta, None
        text = self._held + text_delta
        match = self._first_match(text) if may_match else None
        if match is not None:
            start, self.matched = match
            self._held = ""
            return text[:start], self.matched
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], None

    def flush(self) -> str:
        """At the end (length or EOS): release what was held back."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -length, stop): the smallest wins
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string (0 if none)."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
