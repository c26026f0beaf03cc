"""The progress bar ``studio bench`` draws on a terminal while a level runs."""

from __future__ import annotations

from typing import IO


class Progress:
    """A one-line progress bar on a terminal stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def show(self, label: str, fraction: float, done: int) -> None:
        """Redraw the bar: ``fraction`` of the level done, ``done`` requests finished."""
        width = 30
        filled = int(round(fraction * width))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r  {label:<18} [{bar}] {fraction * 100:5.1f}%  {done:>9,} req")
        self.stream.flush()

    def clear(self) -> None:
        """Blank the line (the bar is drawn over, not scrolled)."""
        self.stream.write("\r" + " " * 78 + "\r")
        self.stream.flush()


def is_tty(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a progress bar is drawn only there)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
