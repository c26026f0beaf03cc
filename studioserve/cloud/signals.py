"""Signals during a launch and its rollback.

While a launch runs, SIGTERM and SIGHUP (the terminal closed) stop it the way Ctrl-C does:
they raise :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread, so the one
rollback runs. During the rollback itself (:class:`Shield`) the first Ctrl-C, SIGTERM or
SIGHUP does not interrupt anything: it says what a second one would leave behind; only a
second one abandons, and even then every delete call left is still issued before returning.
The previous handlers are restored on the way out. Off the main thread (where Python cannot
install handlers) both are no-ops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

#: the signals a launch turns into its rollback (SIGINT already raises KeyboardInterrupt)
LAUNCH_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s
)
#: the signals the rollback shields itself from
ROLLBACK_SIGNALS = (signal.SIGINT, *LAUNCH_SIGNALS)


class Interrupted(KeyboardInterrupt):
    """A launch (or a rollback's wait) stopped by a signal; ``signal_name`` says which."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_interruption(e: BaseException) -> str:
    """How an interruption reads in messages: ``Ctrl-C`` or ``SIGTERM``..."""
    if isinstance(e, Interrupted) and e.signal_name != "SIGINT":
        return e.signal_name
    return "Ctrl-C"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(
    signums: tuple[int, ...], handler: Callable[[int, FrameType | None], Any]
) -> Iterator[None]:
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def launch_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Interrupted` while the block runs."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(_name(signum))

    with _handlers(LAUNCH_SIGNALS, stop):
        yield


class Shield:
    """The rollback's protection: the first signal warns, a second one abandons.

    ``left()`` gives the lines naming what would be left behind if the user abandoned now.
    After :attr:`abandoned` is set, the caller still issues every remaining delete call
    (without waiting) before it returns.
    """

    def __init__(self, left: Callable[[], list[str]]) -> None:
        self._left = left
        self.pressed = 0
        self.abandoned = False
        self._stack = contextlib.ExitStack()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pressed += 1
        if self.pressed == 1:
            left = self._left()
            logger.warning(
                "cleaning up, press Ctrl-C again only to abandon: these resources will be left: %s",
                "; ".join(left) if left else "none",
            )
            return
        if not self.abandoned:
            self.abandoned = True
            raise Interrupted(_name(signum))

    def __enter__(self) -> Shield:
        self._stack.enter_context(_handlers(ROLLBACK_SIGNALS, self._on_signal))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()
