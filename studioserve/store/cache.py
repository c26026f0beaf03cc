"""The verified local cache of remote modeldirs: manifest, listing digest, atomic commit, locks.

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
store gives one), sets each file's mtime to the object's time in the store (where the listing
gives one), writes ``manifest.json``, and only then renames the folder to ``v-<digest>``.
A killed fetch therefore never leaves a folder that looks complete; the next fetch (under the
lock) deletes the leftovers. Object names are untrusted: every one goes through
:mod:`studioserve.store._names`, and no symlink is ever created. The cache knows nothing of
any store: it is given a listing of :class:`RemoteObject` and a :data:`Downloader`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any

import filelock

from ..config import cache_dir
from ..errors import ChecksumMismatch, StoreError, UnsafePath
from ._names import check_layout, safe_join, safe_relpath
from ._transfer import (
    DEFAULT_WORKERS,
    Progress,
    RetryPolicy,
    Sink,
    default_is_transient,
    human_bytes,
    retry_call,
)
from .base import MODELDIR, now_iso, validate_key

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_LOCK_TIMEOUT = 3600.0


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
    :param modified: when the object was last written in the store (POSIX seconds; 0:
        unknown). The cached file gets it as its mtime, so "the newest checkpoint" means the
        same in the cache as in the store. Not part of :meth:`identity`.
    """

    rel: str
    name: str
    size: int
    etag: str = ""
    md5: str = ""
    crc32c: str = ""
    version: str = ""
    modified: float = 0.0

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
            human_bytes(total),
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
                    _set_mtime(path, obj)
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
        _set_mtime(path, obj)
        progress.file_done()


def _set_mtime(path: Path, obj: RemoteObject) -> None:
    """Give a cached file the object's modification time in the store, when known."""
    if obj.modified > 0:
        try:
            os.utime(path, (obj.modified, obj.modified))
        except OSError as e:
            raise StoreError(f"cannot set the mtime of {path}: {e}; check the cache folder") from e
