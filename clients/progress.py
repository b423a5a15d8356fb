"""A one-line progress display on stderr for long runs (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows `label: done/total (rate/s, eta)`; draws at most every `interval` seconds."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = self._start       # first draw after one interval, not at 0
        self._tty = self.stream.isatty()

    def update(self, done: int, extra: str = "") -> None:
        """Record progress; redraw if the interval has passed."""
        self.done = done
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw(now, extra)

    def close(self, extra: str = "") -> None:
        """Draw the final state and end the line."""
        self._draw(time.monotonic(), extra)
        if self._tty:
            self.stream.write("\n")
        self.stream.flush()

    def _draw(self, now: float, extra: str) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, eta {eta:.0f}s) {extra}".rstrip()
        self.stream.write(f"\r{line}\x1b[K" if self._tty else line + "\n")
        self.stream.flush()
