"""SDK-free machinery shared by the remote stores: safe names, retries, progress, the cache.

A remote experiment's modeldir is fetched into a local cache under
:func:`studioserve.config.cache_dir`::

    <cache>/<store-id>/<key>.lock          a file lock, held while a process fetches <key>
    <cache>/<store-id>/<key>/v-<digest>/   one complete, verified copy of the modeldir:
        modeldir/**                        the files
        manifest.json                      size, ETag, MD5, CRC32C of each file
    <cache>/<store-id>/<key>/.tmp-*        a fetch in progress, or one that was killed

``<store-id>`` is derived from the store URL (and a custom endpoint), ``<digest>`` from the
remote listing (every object's name, size and MD5, or ETag/generation where there is no MD5),
so a changed remote object gives a new digest and is fetched again (files that did not change
are copied from the older version), while an unchanged experiment is found in the cache and
nothing is downloaded.

A fetch downloads into a fresh ``.tmp-*`` folder, checks every file's size (and MD5 where the
store gives one), writes ``manifest.json``, and only then renames the folder to ``v-<digest>``.
A killed fetch therefore never leaves a folder that looks complete; the next fetch (under the
lock) deletes the leftovers. Object names are untrusted: :func:`safe_relpath` refuses anything
that could name a path outside the cache folder, and no symlink is ever created.

:class:`RemoteStore` holds the store logic S3 and GCS share (complete-only listing,
``experiment.json`` written last and deleted first, retries, parallel transfers); each SDK
module implements its few primitive operations. Nothing here imports a cloud SDK.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any, TypeVar

import filelock

from ..config import cache_dir
from ..errors import ChecksumMismatch, ExperimentExists, StoreError, UnsafePath
from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MODELDIR,
    ExperimentInfo,
    Store,
    now_iso,
    validate_key,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RS = TypeVar("_RS", bound="RemoteStore")

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
CHUNK_SIZE = 1024 * 1024
DEFAULT_WORKERS = 8
DEFAULT_LOCK_TIMEOUT = 3600.0

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MD5_HEX = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------------------------
# Untrusted names
# --------------------------------------------------------------------------------------------


def safe_relpath(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise :class:`UnsafePath`.

    Refused: empty names, absolute paths (``/x``, ``C:x``), backslashes, ``.`` or ``..``
    parts, empty parts (``a//b``, a trailing ``/``) and control characters.

    :param name: an object name relative to the modeldir, as the remote store gave it.
    :raises UnsafePath: when the name could escape the folder it is written into.
    """
    why = ""
    if not isinstance(name, str) or not name:
        why = "it is empty"
    elif _CONTROL.search(name):
        why = "it contains control characters"
    elif "\\" in name:
        why = "it contains a backslash"
    elif name.startswith("/") or _DRIVE.match(name):
        why = "it is an absolute path"
    else:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            why = "it has an empty, '.' or '..' part"
    if why:
        raise UnsafePath(
            f"refusing object name {name!r}: {why}, so it could be written outside the cache "
            "folder; rename or delete that object in the store"
        )
    return name


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel`` after :func:`safe_relpath`, checked to resolve inside ``root``.

    :raises UnsafePath: when ``rel`` is unsafe or resolves (through an existing symlink)
        outside ``root``.
    """
    path = root.joinpath(*safe_relpath(rel).split("/"))
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePath(
            f"refusing object name {rel!r}: it resolves to {real}, outside {real_root}; "
            "delete the cache folder and fetch again"
        )
    return path


def local_files(src: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of each regular file under ``src``, sorted.

    Symlinked files are followed (as :class:`~studioserve.store.local.LocalStore` does);
    symlinked folders are not descended into.

    :raises UnsafePath: for a file name that is not a safe relative path (a backslash, ...).
    """
    out = []
    for path in sorted(src.rglob("*")):
        if path.is_file():
            rel = path.relative_to(src).as_posix()
            out.append((safe_relpath(rel), path))
    return out


def check_layout(rels: Iterable[str]) -> None:
    """Refuse a set of relative paths where one file is also another file's folder.

    :raises UnsafePath: naming both objects.
    """
    files = set(rels)
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise UnsafePath(
                    f"objects {parent!r} and {rel!r} clash: {parent!r} would be both a file "
                    "and a folder; delete one of them in the store"
                )


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


def _human(n: float) -> str:
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
            f"{_human(self.bytes)}/{_human(self.total_bytes)} ({pct:.0f}%)"
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
# Remote objects and the manifest
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RemoteObject:
    """One file of a remote modeldir, as the store's listing describes it.

    :param rel: the path relative to the modeldir (checked with :func:`safe_relpath`).
    :param name: the full object name in the bucket.
    :param size: the size in bytes.
    :param etag: the store's ETag (S3: quotes stripped; GCS: the object etag).
    :param md5: the content's MD5 as 32 hex digits, when the store vouches for it.
    :param crc32c: the content's CRC32C as the store writes it (GCS: base64), if any.
    :param version: a version id (GCS generation), if any.
    """

    rel: str
    name: str
    size: int
    etag: str = ""
    md5: str = ""
    crc32c: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        safe_relpath(self.rel)
        if self.size < 0:
            raise StoreError(f"object {self.name!r} reports a negative size; check the store")

    def identity(self) -> dict[str, Any]:
        """What decides whether a cached copy is still current.

        With an MD5 the content decides (re-uploading the same bytes changes nothing);
        without one the ETag and version (GCS generation) do.
        """
        if self.md5:
            return {"path": self.rel, "size": self.size, "md5": self.md5, "crc32c": self.crc32c}
        return {
            "path": self.rel,
            "size": self.size,
            "etag": self.etag,
            "crc32c": self.crc32c,
            "version": self.version,
        }


def md5_from_etag(etag: str) -> str:
    """The MD5 hex an S3-style ETag stands for, or ``""`` (multipart or non-MD5 ETags)."""
    etag = etag.strip().strip('"').lower()
    return etag if _MD5_HEX.fullmatch(etag) else ""


def listing_digest(objects: Sequence[RemoteObject]) -> str:
    """A short digest of a listing: equal listings give equal digests."""
    ident = sorted((o.identity() for o in objects), key=lambda d: str(d["path"]))
    raw = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def store_cache_id(url: str, endpoint: str | None = None) -> str:
    """A folder name for a store: readable, and unique per URL and custom endpoint."""
    ident = url.rstrip("/") + ("|" + endpoint if endpoint else "")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-.")[:60]
    scheme = url.split("://", 1)[0] if "://" in url else "store"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return f"{scheme}-{readable}-{digest}" if readable else f"{scheme}-{digest}"


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


#: A store's download function: stream ``obj`` into ``sink``; return the MD5 hex the content
#: must have (or ``None`` when the store gives no trustworthy MD5 and verified it otherwise).
Downloader = Callable[[RemoteObject, Sink], "str | None"]


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class ModelCache:
    """The local cache of one remote store's modeldirs.

    :param store_url: the store URL (part of the cache folder's identity).
    :param endpoint: a custom endpoint, if any (also part of the identity).
    :param root: the cache root; default :func:`studioserve.config.cache_dir`.
    :param lock_timeout: seconds to wait for another process fetching the same key.
    """

    def __init__(
        self,
        store_url: str,
        *,
        endpoint: str | None = None,
        root: Path | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self.store_url = store_url
        self.root = (Path(root) if root is not None else cache_dir()).expanduser()
        self.folder = self.root / store_cache_id(store_url, endpoint)
        self.lock_timeout = lock_timeout

    def key_dir(self, key: str) -> Path:
        return self.folder / validate_key(key)

    def lookup(self, key: str, objects: Sequence[RemoteObject]) -> Path | None:
        """The cached modeldir for exactly this listing, if complete and intact; else None."""
        version = self.key_dir(key) / f"v-{listing_digest(objects)}"
        if self._valid(version, objects):
            return version / MODELDIR
        return None

    def fetch(
        self,
        key: str,
        objects: Sequence[RemoteObject],
        download: Downloader,
        *,
        refresh: bool = False,
        quiet: bool = True,
        workers: int = DEFAULT_WORKERS,
        retry: RetryPolicy | None = None,
        is_transient: Callable[[BaseException], bool] = default_is_transient,
        stream: IO[str] | None = None,
    ) -> Path:
        """Return a verified local copy of ``key``'s modeldir, downloading what is needed.

        :param key: the experiment key.
        :param objects: the remote listing of the modeldir.
        :param download: streams one object into a :class:`Sink` (see :data:`Downloader`).
        :param refresh: download again even when the cache holds this listing.
        :param quiet: no progress line.
        :param workers: parallel downloads.
        :param retry: retries per file (default :class:`RetryPolicy`).
        :param is_transient: which errors are retried.
        :param stream: where the progress line goes (default stderr, only if a TTY).
        :returns: the cached modeldir folder.
        :raises UnsafePath: for object names that could escape the cache folder.
        :raises StoreError: when the lock cannot be taken or the disk write fails; download
            errors propagate unchanged after the retries, for the store to explain.
        """
        objects = list(objects)
        check_layout(o.rel for o in objects)
        key_dir = self.key_dir(key)
        digest = listing_digest(objects)
        final = key_dir / f"v-{digest}"
        if not refresh and self._valid(final, objects):
            logger.debug("cache hit for %s (%s)", key, final)
            return final / MODELDIR
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked(key):
            # Another process may have finished the same fetch while we waited.
            if not refresh and self._valid(final, objects):
                logger.info("using %s, fetched by another process", final)
                return final / MODELDIR
            key_dir.mkdir(parents=True, exist_ok=True)
            self._clean(key_dir, keep=None)
            reuse = {} if refresh else self._reusable(key_dir, objects)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=key_dir))
            try:
                self._download_all(
                    key,
                    tmp / MODELDIR,
                    objects,
                    download,
                    reuse=reuse,
                    quiet=quiet,
                    workers=workers,
                    retry=retry or RetryPolicy(),
                    is_transient=is_transient,
                    stream=stream,
                )
                self._write_manifest(tmp, key, objects)
                self._commit(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._clean(key_dir, keep=final.name)
        return final / MODELDIR

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        path = self.folder / f"{validate_key(key)}.lock"
        lock = filelock.FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.info("waiting for another process fetching %s (lock %s)", key, path)
            try:
                lock.acquire(timeout=self.lock_timeout)
            except filelock.Timeout:
                raise StoreError(
                    f"another process has held {path} for {self.lock_timeout:.0f}s while "
                    f"fetching {key!r}; stop it (or, if none is running, delete that file) "
                    "and try again"
                ) from None
        try:
            yield
        finally:
            lock.release()

    def _valid(self, version: Path, objects: Sequence[RemoteObject]) -> bool:
        manifest = version / MANIFEST_FILE
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return False
        want = sorted((o.identity() for o in objects), key=lambda d: str(d["path"]))
        if data.get("files") != want:
            return False
        modeldir = version / MODELDIR
        try:
            for obj in objects:
                path = safe_join(modeldir, obj.rel)
                st = path.lstat()
                if not path.is_file() or path.is_symlink() or st.st_size != obj.size:
                    logger.warning("cached %s is damaged; fetching again", path)
                    return False
        except (OSError, UnsafePath):
            return False
        return modeldir.is_dir()

    def _reusable(self, key_dir: Path, objects: Sequence[RemoteObject]) -> dict[str, Path]:
        """Files of older cached versions identical to wanted ones: copied, not downloaded."""
        wanted = {o.rel: o.identity() for o in objects}
        found: dict[str, Path] = {}
        for version in sorted(key_dir.glob("v-*")):
            try:
                data = json.loads((version / MANIFEST_FILE).read_text(encoding="utf-8"))
                entries = data["files"] if data.get("version") == MANIFEST_VERSION else []
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            for entry in entries:
                rel = entry.get("path") if isinstance(entry, dict) else None
                if not isinstance(rel, str) or rel in found or wanted.get(rel) != entry:
                    continue
                try:
                    path = safe_join(version / MODELDIR, rel)
                    st = path.lstat()
                except (OSError, UnsafePath):
                    continue
                if path.is_file() and not path.is_symlink() and st.st_size == entry["size"]:
                    found[rel] = path
        return found

    def _write_manifest(self, tmp: Path, key: str, objects: Sequence[RemoteObject]) -> None:
        data = {
            "version": MANIFEST_VERSION,
            "store": self.store_url,
            "key": key,
            "fetched": now_iso(),
            "files": sorted((o.identity() for o in objects), key=lambda d: str(d["path"])),
        }
        (tmp / MODELDIR).mkdir(exist_ok=True)  # an empty modeldir is still a modeldir
        path = tmp / MANIFEST_FILE
        with path.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def _commit(self, tmp: Path, final: Path) -> None:
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _clean(self, key_dir: Path, *, keep: str | None) -> None:
        """Delete temp folders of killed fetches and, with ``keep``, older versions.

        Called with the lock held, so no other process is writing here.
        """
        try:
            entries = list(key_dir.iterdir())
        except OSError:
            return
        for entry in entries:
            stale_tmp = entry.name.startswith((".tmp-", ".old-"))
            old_version = keep is not None and entry.name.startswith("v-") and entry.name != keep
            if stale_tmp or old_version:
                logger.debug("removing %s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    def _download_all(
        self,
        key: str,
        modeldir: Path,
        objects: Sequence[RemoteObject],
        download: Downloader,
        *,
        reuse: dict[str, Path],
        quiet: bool,
        workers: int,
        retry: RetryPolicy,
        is_transient: Callable[[BaseException], bool],
        stream: IO[str] | None,
    ) -> None:
        modeldir.mkdir(parents=True, exist_ok=True)
        total = sum(o.size for o in objects)
        progress = Progress(
            f"fetching {self.store_url.rstrip('/')}/{key}",
            len(objects),
            total,
            quiet=quiet,
            stream=stream,
        )
        cancel = threading.Event()
        started = time.monotonic()
        # Biggest first, so one large checkpoint does not start last.
        ordered = sorted(objects, key=lambda o: o.size, reverse=True)
        pool = ThreadPoolExecutor(
            max_workers=max(1, min(workers, len(ordered) or 1)),
            thread_name_prefix="studioserve-fetch",
        )
        try:
            futures: list[Future[None]] = [
                pool.submit(
                    self._download_one,
                    modeldir,
                    obj,
                    reuse.get(obj.rel),
                    download,
                    progress,
                    cancel,
                    retry,
                    is_transient,
                )
                for obj in ordered
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and fut.exception() is not None:
                    cancel.set()
                    fut.result()
        except BaseException:
            cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
        logger.info(
            "fetched %d files (%s, %d reused from the cache) of %s/%s in %.1fs",
            len(objects),
            _human(total),
            len(reuse),
            self.store_url.rstrip("/"),
            key,
            time.monotonic() - started,
        )

    def _download_one(
        self,
        modeldir: Path,
        obj: RemoteObject,
        source: Path | None,
        download: Downloader,
        progress: Progress,
        cancel: threading.Event,
        retry: RetryPolicy,
        is_transient: Callable[[BaseException], bool],
    ) -> None:
        path = safe_join(modeldir, obj.rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {path.parent}: {e}; check the cache folder") from e
        # mkdir followed no symlink we did not create, but check the result anyway.
        safe_join(modeldir, obj.rel)
        if source is not None:
            try:
                shutil.copyfile(source, path)  # writes a regular file, never a link
                if path.stat().st_size == obj.size:
                    logger.debug("reused cached %s for %s", source, obj.name)
                    progress.add(obj.size)
                    progress.file_done()
                    return
            except OSError as e:
                logger.debug("cannot reuse %s (%s); downloading %s", source, e, obj.name)

        def attempt() -> None:
            try:
                sink = Sink(path, progress, cancel)
            except OSError as e:
                raise StoreError(f"cannot write {path}: {e}; check the cache folder") from e
            try:
                with sink:
                    expected_md5 = download(obj, sink)
                if sink.written != obj.size:
                    raise ChecksumMismatch(
                        f"{obj.name}: got {sink.written} bytes, the store listed {obj.size}"
                    )
                if expected_md5 and sink.md5_hex() != expected_md5.lower():
                    raise ChecksumMismatch(
                        f"{obj.name}: MD5 {sink.md5_hex()} differs from the store's {expected_md5}"
                    )
            except BaseException:
                progress.add(-sink.written)
                raise

        retry_call(
            attempt,
            policy=retry,
            is_transient=lambda e: default_is_transient(e) or is_transient(e),
            what=f"download of {obj.name}",
            cancel=cancel,
        )
        progress.file_done()


# --------------------------------------------------------------------------------------------
# The store logic shared by S3 and GCS
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One object of a bucket listing, in SDK-neutral terms (see :class:`RemoteObject`)."""

    name: str
    size: int
    etag: str = ""
    md5: str = ""
    crc32c: str = ""
    version: str = ""


class MissingObject(Exception):
    """Raised by :meth:`RemoteStore._read_object` for an object that does not exist."""


class RemoteStore(Store):
    """An object-store experiment store: ``<prefix>/<key>/modeldir/**`` + ``experiment.json``.

    Subclasses (:class:`~studioserve.store.s3.S3Store`,
    :class:`~studioserve.store.gcs.GCSStore`) provide a handful of primitive operations on one
    SDK; this class builds the store on them: listing only complete experiments, uploads that
    write ``experiment.json`` last, deletes that remove it first, retries with backoff, and
    fetches through the verified :class:`ModelCache`.
    """

    scheme = ""
    #: how many names one :meth:`_delete_objects` call takes
    delete_batch_size = 1

    bucket: str
    prefix: str
    endpoint: str
    workers: int
    retry: RetryPolicy
    _cache: ModelCache

    def _setup(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint: str,
        custom_endpoint: str | None,
        cache_root: Path | None,
        workers: int,
        retry: RetryPolicy | None,
        lock_timeout: float,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        base = f"{self.scheme}://{bucket}"
        self.url = f"{base}/{self.prefix}" if self.prefix else base
        self.endpoint = endpoint
        self.workers = max(1, workers)
        self.retry = retry or RetryPolicy()
        self._cache = ModelCache(
            self.url, endpoint=custom_endpoint, root=cache_root, lock_timeout=lock_timeout
        )

    # -- primitives (one SDK each) -----------------------------------------------------------

    @abc.abstractmethod
    def _list_page(
        self, prefix: str, delimiter: str | None, token: str | None
    ) -> tuple[list[ObjectInfo], list[str], str | None]:
        """One page: (objects, common prefixes, next page token or None)."""

    @abc.abstractmethod
    def _exists_object(self, name: str) -> bool:
        """Whether object ``name`` exists (a missing bucket is an error, not False)."""

    @abc.abstractmethod
    def _read_object(self, name: str) -> bytes:
        """The content of a small object; :class:`MissingObject` if it does not exist."""

    @abc.abstractmethod
    def _write_object(self, name: str, data: bytes, content_type: str) -> None:
        """Create or replace a small object."""

    @abc.abstractmethod
    def _upload_file(self, path: Path, name: str, progress: Callable[[int], None]) -> None:
        """Upload a local file (multipart/resumable when big), reporting bytes sent."""

    @abc.abstractmethod
    def _delete_objects(self, names: list[str]) -> None:
        """Delete up to :attr:`delete_batch_size` objects; missing ones are not an error."""

    @abc.abstractmethod
    def _download_object(self, obj: RemoteObject, sink: Sink) -> str | None:
        """Stream ``obj`` into ``sink``; see :data:`Downloader`."""

    @abc.abstractmethod
    def _is_transient(self, exc: BaseException) -> bool:
        """True for this SDK's errors worth retrying."""

    @abc.abstractmethod
    def _explain(self, exc: BaseException, what: str) -> StoreError:
        """A StoreError for an SDK error: missing bucket, denied access, network, ..."""

    # -- names -------------------------------------------------------------------------------

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _base(self, key: str) -> str:
        return f"{self._root()}{validate_key(key)}/"

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _object_url(self, name: str) -> str:
        return f"{self.scheme}://{self.bucket}/{name}"

    # -- the Store interface -----------------------------------------------------------------

    def keys(self) -> list[str]:
        root = self._root()
        _, prefixes = self._list(root, delimiter="/")
        candidates = []
        for p in prefixes:
            name = p[len(root) :].rstrip("/")
            if KEY_PATTERN.fullmatch(name) and name not in (".", ".."):
                candidates.append(name)
            else:
                logger.debug("ignoring %s in %s: not an experiment key", p, self.url)

        def complete(key: str) -> bool:
            meta = self._base(key) + EXPERIMENT_FILE
            return self._call(lambda: self._exists_object(meta), what=f"check {self._where(key)}")

        flags = self._parallel(complete, candidates)
        return sorted(k for k, ok in zip(candidates, flags, strict=True) if ok)

    def info(self, key: str) -> ExperimentInfo:
        name = self._base(key) + EXPERIMENT_FILE
        try:
            raw = self._call(lambda: self._read_object(name), what=f"read {self._object_url(name)}")
        except MissingObject:
            raise self.not_found(key) from None
        return ExperimentInfo.parse(
            raw,
            key,
            where=self._object_url(name),
            fix=f"fix it, or re-add the experiment with 'studio experiments add {key} DIR --force'",
        )

    def add(
        self,
        key: str,
        src: Path,
        *,
        description: str = "",
        framework: str = "",
        force: bool = False,
        quiet: bool = True,
    ) -> ExperimentInfo:
        """Upload folder ``src`` as ``key``'s modeldir, then write ``experiment.json``.

        With ``force`` an existing experiment is first made incomplete (its
        ``experiment.json`` is deleted, so it is no longer listed), then its files are
        replaced; files of the old version that the new one lacks are deleted before
        ``experiment.json`` is written again.

        :param quiet: no progress line (it is only drawn on a terminal anyway).
        :raises ExperimentExists: when ``key`` exists and ``force`` is false.
        :raises UnsafePath: for a file name that is not a safe relative path.
        :raises StoreError: for a missing bucket, denied access or network failures.
        """
        base = self._base(key)
        src = Path(src)
        if not src.is_dir():
            raise StoreError(f"{src} is not a folder; pass the folder that holds the checkpoints")
        files = local_files(src)
        meta = base + EXPERIMENT_FILE
        where = self._where(key)
        exists = self._call(lambda: self._exists_object(meta), what=f"check {where}")
        if exists and not force:
            raise ExperimentExists(
                f"experiment {key!r} already exists in {self.url}; pass --force to replace it"
            )
        if exists:
            self._delete([meta], what=f"delete {self._object_url(meta)}")
        info = ExperimentInfo(
            key=key, created=now_iso(), framework=framework, description=description
        )
        self._upload_all(key, base, files, quiet=quiet)
        wanted = {base + MODELDIR + "/" + rel for rel, _ in files}
        old, _ = self._list(base)
        stale = [o.name for o in old if o.name not in wanted and o.name != meta]
        self._delete(stale, what=f"delete old files of {where}")
        body = json.dumps(info.to_json(), indent=2).encode()
        self._call(
            lambda: self._write_object(meta, body, "application/json"),
            what=f"write {self._object_url(meta)}",
        )
        logger.info("added experiment %s to %s (%d files)", key, self.url, len(files))
        return info

    def remove(self, key: str) -> None:
        """Delete ``key``: ``experiment.json`` first, so it is never listed half-deleted.

        :raises ExperimentNotFound: when no object exists under the key.
        """
        base = self._base(key)
        objects, _ = self._list(base)
        names = [o.name for o in objects]
        if not names:
            raise self.not_found(key)
        meta = base + EXPERIMENT_FILE
        if meta in names:
            self._delete([meta], what=f"delete {self._object_url(meta)}")
        self._delete([n for n in names if n != meta], what=f"delete {self._where(key)}")
        logger.info("removed experiment %s from %s", key, self.url)

    def fetch(self, key: str, *, refresh: bool = False, quiet: bool = True) -> Path:
        """A verified local copy of ``key``'s modeldir, downloaded only when needed.

        A second fetch of an unchanged experiment lists the remote folder and downloads
        nothing; a changed object (size or ETag/generation) is fetched again.

        :param refresh: download again even when the cache is current.
        :param quiet: no progress line (it is only drawn when stderr is a terminal).
        :returns: the cached modeldir folder.
        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises UnsafePath: for object names that could escape the cache folder.
        :raises StoreError: for a missing bucket, denied access, network failures after
            retries, or files that fail verification.
        """
        objects = self._modeldir(key)
        try:
            return self._cache.fetch(
                key,
                objects,
                self._download_object,
                refresh=refresh,
                quiet=quiet,
                workers=self.workers,
                retry=self.retry,
                is_transient=self._is_transient,
            )
        except ChecksumMismatch as e:
            raise self._translate(e, what=f"fetch {self._where(key)}") from e
        except StoreError:
            raise
        except Exception as e:
            raise self._translate(e, what=f"fetch {self._where(key)}") from e

    def files(self, key: str) -> list[tuple[str, int]]:
        """``(relative path, size)`` of each file in ``key``'s remote modeldir (no download)."""
        return sorted((o.rel, o.size) for o in self._modeldir(key))

    def cached(self, key: str) -> Path | None:
        """The cached modeldir if it matches the remote listing now, else None (no download)."""
        return self._cache.lookup(key, self._modeldir(key))

    def close(self) -> None:
        """Release the SDK client's connections (the store cannot be used afterwards)."""

    def __enter__(self: _RS) -> _RS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------------

    def _list(
        self, prefix: str, *, delimiter: str | None = None
    ) -> tuple[list[ObjectInfo], list[str]]:
        """Every object (and common prefix) under ``prefix``, all pages."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        token: str | None = None
        while True:
            page_objects, page_prefixes, token = self._call(
                functools.partial(self._list_page, prefix, delimiter, token),
                what=f"list {self._object_url(prefix)}",
            )
            objects.extend(page_objects)
            prefixes.extend(page_prefixes)
            if not token:
                return objects, prefixes

    def _modeldir(self, key: str) -> list[RemoteObject]:
        """The modeldir listing of a complete experiment; not_found when it is incomplete."""
        base = self._base(key)
        listing, _ = self._list(base)
        if not any(o.name == base + EXPERIMENT_FILE for o in listing):
            raise self.not_found(key)
        mbase = base + MODELDIR + "/"
        out = []
        for o in listing:
            if not o.name.startswith(mbase):
                continue
            rel = o.name[len(mbase) :]
            if (not rel or rel.endswith("/")) and o.size == 0:
                continue  # a "folder" marker that web consoles create
            out.append(
                RemoteObject(
                    rel=safe_relpath(rel),
                    name=o.name,
                    size=o.size,
                    etag=o.etag,
                    md5=o.md5,
                    crc32c=o.crc32c,
                    version=o.version,
                )
            )
        return out

    def _delete(self, names: list[str], *, what: str) -> None:
        size = max(1, self.delete_batch_size)
        batches = [names[i : i + size] for i in range(0, len(names), size)]

        def delete(batch: list[str]) -> None:
            self._call(functools.partial(self._delete_objects, batch), what=what)

        self._parallel(delete, batches)

    def _upload_all(
        self, key: str, base: str, files: list[tuple[str, Path]], *, quiet: bool
    ) -> None:
        sizes = [path.stat().st_size for _, path in files]
        progress = Progress(f"uploading {self._where(key)}", len(files), sum(sizes), quiet=quiet)
        cancel = threading.Event()

        def upload(item: tuple[str, Path]) -> None:
            rel, path = item
            name = base + MODELDIR + "/" + rel
            sent = [0]

            def report(n: int) -> None:
                sent[0] += n
                progress.add(n)

            def attempt() -> None:
                if cancel.is_set():
                    raise Cancelled(f"upload of {path}")
                try:
                    self._upload_file(path, name, report)
                except BaseException:
                    progress.add(-sent[0])
                    sent[0] = 0
                    raise

            self._call(attempt, what=f"upload {path} to {self._object_url(name)}", cancel=cancel)
            progress.file_done()

        try:
            self._parallel(upload, files, cancel=cancel)
        finally:
            progress.close()

    def _parallel(
        self,
        fn: Callable[[Any], T],
        items: Sequence[Any],
        *,
        cancel: threading.Event | None = None,
    ) -> list[T]:
        """``[fn(x) for x in items]`` on up to :attr:`workers` threads, joined before return.

        On the first failure the rest are cancelled (``cancel`` is set) and the error raised.
        """
        if len(items) <= 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(
            max_workers=min(self.workers, len(items)),
            thread_name_prefix=f"studioserve-{self.scheme}",
        )
        try:
            futures = [pool.submit(fn, x) for x in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and not fut.cancelled() and fut.exception() is not None:
                    if cancel is not None:
                        cancel.set()
                    fut.result()
            return [fut.result() for fut in futures]
        except BaseException:
            if cancel is not None:
                cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _call(self, fn: Callable[[], T], *, what: str, cancel: threading.Event | None = None) -> T:
        """Run one operation with retries; explain a final failure as a StoreError."""
        try:
            return retry_call(
                fn, policy=self.retry, is_transient=self._is_transient, what=what, cancel=cancel
            )
        except (StoreError, MissingObject, Cancelled):
            raise
        except Exception as e:
            raise self._translate(e, what=what) from e

    def _translate(self, exc: BaseException, *, what: str) -> StoreError:
        if isinstance(exc, StoreError):
            if isinstance(exc, ChecksumMismatch):
                return StoreError(
                    f"{exc} (after {self.retry.attempts} attempts); the object changed while it "
                    "was fetched or is damaged in the store: run again, and re-add the "
                    "experiment if it persists"
                )
            return exc
        if isinstance(exc, Cancelled):
            return StoreError(f"{what} was interrupted; run the command again")
        return self._explain(exc, what)
