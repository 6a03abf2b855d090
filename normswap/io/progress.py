"""A small progress bar on stderr for long command-line work (no dependency).

On a terminal it redraws one line at most ten times a second; elsewhere (logs, pipes) it prints nothing
until the end, then one summary line. ``enabled=False`` (``--quiet``) silences it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class Progress:
    """Count work done toward ``total`` (bytes when ``unit="bytes"``) and show it.

    Example:
        >>> with Progress("writing", total=10, enabled=False) as bar:
        ...     bar.update(10)
    """

    def __init__(self, label: str, total: float, *, unit: str = "bytes", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0.0
        self.status = ""
        self.start = time.perf_counter()
        self._shown = 0.0

    def _fmt(self, n: float) -> str:
        return _size(n) if self.unit == "bytes" else f"{n:.0f}"

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(24 * frac)
        rate = f", {_size(self.done / elapsed)}/s" if self.unit == "bytes" and elapsed > 0 else ""
        status = f" {self.status}" if self.status else ""
        return (f"{self.label} [{bar:<24}] {self._fmt(self.done)}/{self._fmt(self.total)} "
                f"({100 * frac:.0f}%, {elapsed:.1f} s{rate}){status}")

    def update(self, n: float, status: str | None = None) -> None:
        """Count ``n`` more units done; ``status`` (e.g. ``"loss 0.52"``) is shown after the bar."""
        self.done += n
        if status is not None:
            self.status = status
        now = time.perf_counter()
        if self.tty and now - self._shown > 0.1:
            self._shown = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
            self.stream.flush()
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
