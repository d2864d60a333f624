"""A one-line progress bar on stderr for long work (quantizing a model), redrawn in place on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Call with (done, total, what); on a terminal redraws one line, elsewhere prints every 10%."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.last_decile = -1
        self.last_draw = 0.0
        self.started = time.perf_counter()
        self.drawn = False

    def __call__(self, done: int, total: int, what: str = "") -> None:
        frac = done / total if total else 1.0
        if self.tty:
            now = time.perf_counter()
            if now - self.last_draw < 0.05 and done < total:
                return
            self.last_draw = now
            fill = int(frac * self.width)
            bar = "#" * fill + "-" * (self.width - fill)
            self.stream.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {what[:40]:<40}")
            self.stream.flush()
            self.drawn = True
            return
        decile = int(frac * 10)
        if decile > self.last_decile:
            self.last_decile = decile
            self.stream.write(f"{self.label}: {decile * 10}%\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
