"""What the ``trims-ray`` command prints: byte sizes, tables and the push's progress bar.

Plain text helpers with no Ray and no trims_ray state, so that ``cli`` holds only the commands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["PROGRESS_MIN_BYTES", "ProgressBar", "format_bytes", "format_table"]

# Uploads smaller than this finish before a bar would tell anything (auto mode only).
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: "512 B", "1.5 KiB", "64.0 MiB", "1.2 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(headers: list[str], rows: list[list[object]], *, align: str) -> str:
    """A compact table: columns two spaces apart, ``align`` "l" or "r" per column."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


class ProgressBar:
    """A one-line progress bar for ``ModelStore.register(progress=...)``, redrawn in place.

    Args:
        label: what is being done, shown before the bar.
        stream: where to draw (stderr).
        enabled: True always, False never, None for uploads of at least ``min_bytes`` when
            ``stream`` is a terminal.
        min_bytes: the size from which the bar shows in auto mode.
        clock: monotonic seconds (injectable for tests).
        min_interval_s: redraws closer than this are skipped, except the last.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO,
        *,
        enabled: bool | None = None,
        min_bytes: int = PROGRESS_MIN_BYTES,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 0.1,
        width: int = 30,
    ) -> None:
        self.label, self.stream, self.enabled = label, stream, enabled
        self.min_bytes, self.clock, self.min_interval_s, self.width = min_bytes, clock, min_interval_s, width
        self._started: float | None = None
        self._drawn = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self._started is None:
            self._started = now
            if self.enabled is None:
                self.enabled = total >= self.min_bytes and _is_terminal(self.stream)
        if not self.enabled or (done < total and now - self._drawn < self.min_interval_s):
            return
        self._drawn = now
        fraction = done / total if total else 1.0
        filled = int(fraction * self.width)
        elapsed = now - self._started
        rate = f", {format_bytes(done / elapsed)}/s" if elapsed > 0 and done else ""
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {fraction:6.1%} "
            f"{format_bytes(done)} / {format_bytes(total)}{rate}"
        )
        self.stream.write(f"\r{line}" + ("\n" if done >= total else ""))
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
