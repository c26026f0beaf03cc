"""Transfers: retries with backoff, cancellation, the progress line and the hashing file sink.

What every upload and download goes through, whichever store it is for: :func:`retry_call`
with a :class:`RetryPolicy` (and :func:`default_is_transient`), :class:`Cancelled` to stop the
other transfers when one fails, :class:`Progress` for the one-line display, :class:`Sink` that
an SDK streams an object into (counting and hashing it), and :func:`md5_from_etag`.
Nothing here imports a cloud SDK.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from ..errors import ChecksumMismatch

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The read size for streamed downloads.
CHUNK_SIZE = 1024 * 1024
#: Parallel transfers per fetch or upload.
DEFAULT_WORKERS = 8

_MD5_HEX = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    :param attempts: the total number of tries (1: no retry).
    :param backoff: the first delay in seconds; each further delay doubles, with jitter.
    :param max_backoff: the longest delay in seconds.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay(self, failures: int) -> float:
        """The pause after the ``failures``-th failure (1-based), with +-25% jitter."""
        base = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        return base * random.uniform(0.75, 1.25)


def retry_call(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
    cancel: threading.Event | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors with exponential backoff.

    :param fn: the operation.
    :param policy: attempts and delays.
    :param is_transient: True for errors worth another try (network, 5xx, checksum).
    :param what: a description for the log ("GET s3://b/k").
    :param cancel: when set, stop retrying and raise :class:`Cancelled`.
    :returns: what ``fn`` returned.
    :raises: the last error, unchanged, when it is not transient or the attempts are used up.
    """
    failures = 0
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(what)
        try:
            return fn()
        except Cancelled:
            raise
        except Exception as e:
            failures += 1
            if failures >= policy.attempts or not is_transient(e):
                raise
            pause = policy.delay(failures)
            logger.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(e).__name__,
                e,
                failures,
                policy.attempts - 1,
                pause,
            )
            if cancel is not None:
                if cancel.wait(pause):
                    raise Cancelled(what) from e
            else:
                time.sleep(pause)


class Cancelled(Exception):
    """A download stopped because another one failed or the fetch was interrupted."""


def default_is_transient(exc: BaseException) -> bool:
    """Errors every store retries: checksum mismatches and plain OS-level network errors."""
    return isinstance(exc, (ChecksumMismatch, ConnectionError, TimeoutError))


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 MB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns at GB


class Progress:
    """A one-line progress display (files and bytes) on a terminal; silent otherwise.

    It draws only when ``quiet`` is false and ``stream`` (default ``sys.stderr``) is a TTY,
    at most ten times a second. Thread-safe.

    :param label: what is being transferred ("fetching s3://b/p/key").
    :param total_files: the number of files.
    :param total_bytes: their total size.
    :param quiet: never draw.
    :param stream: where to draw.
    """

    def __init__(
        self,
        label: str,
        total_files: int,
        total_bytes: int,
        *,
        quiet: bool = False,
        stream: IO[str] | None = None,
    ) -> None:
        self.label = label
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self._stream = stream if stream is not None else sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self.enabled = not quiet and bool(isatty is not None and isatty())
        self._lock = threading.Lock()
        self._last = 0.0
        self._drawn = False

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more (negative to undo a failed attempt)."""
        with self._lock:
            self.bytes += nbytes
            self._draw(force=False)

    def file_done(self) -> None:
        with self._lock:
            self.files += 1
            self._draw(force=self.files == self.total_files)

    def close(self) -> None:
        """End the line (if anything was drawn)."""
        with self._lock:
            if self.enabled and self._drawn:
                self._draw(force=True)
                self._stream.write("\n")
                self._stream.flush()

    def line(self) -> str:
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        return (
            f"{self.label}: {self.files}/{self.total_files} files, "
            f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} ({pct:.0f}%)"
        )

    def _draw(self, *, force: bool) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self._drawn = True
        self._stream.write("\r" + self.line() + "\x1b[K")
        self._stream.flush()


# --------------------------------------------------------------------------------------------
# Writing one file
# --------------------------------------------------------------------------------------------


class Sink:
    """A write-only file the SDKs stream an object into: hashes, counts and can be cancelled.

    :param path: the file to create (any previous content is truncated).
    :param progress: counts the bytes written.
    :param cancel: when set, the next :meth:`write` raises :class:`Cancelled`.
    """

    def __init__(self, path: Path, progress: Progress, cancel: threading.Event) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o644)
        self._file = os.fdopen(fd, "wb")
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._progress = progress
        self._cancel = cancel
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._cancel.is_set():
            raise Cancelled("fetch cancelled")
        n = self._file.write(data)
        self._md5.update(data)
        self.written += n
        self._progress.add(n)
        return n

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def md5_hex(self) -> str:
        return self._md5.hexdigest()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def md5_from_etag(etag: str) -> str:
    """The MD5 hex an S3-style ETag stands for, or ``""`` (multipart or non-MD5 ETags)."""
    etag = etag.strip().strip('"').lower()
    return etag if _MD5_HEX.fullmatch(etag) else ""
