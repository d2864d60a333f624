"""Stop conditions for a stream of text: end-of-generation tokens, stop strings, a token budget.

Stop strings can straddle tokens, so text that could be the start of a stop string is held back until
it is either confirmed (stop, never shown) or ruled out (released).
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        """Add newly decoded text; return the part that is safe to show. After a hit, returns ''."""
        if self.hit is not None:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        first = None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.hit = first[1]
            self._pending = ""
            return buf[: first[0]]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation, release anything held back."""
        out, self._pending = self._pending, ""
        return out if self.hit is None else ""
