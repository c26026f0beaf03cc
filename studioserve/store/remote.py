"""The store logic S3 and GCS share, on top of a few primitive operations per SDK.

:class:`RemoteStore` lists only complete experiments, writes ``experiment.json`` last on
``add`` and deletes it first on ``remove``, retries with backoff, runs transfers in parallel
and fetches through the verified :class:`~studioserve.store.cache.ModelCache`; it also puts
one file into an existing experiment, reads and writes ``serving.toml`` and fingerprints an
experiment from one listing (for hot reload). Each SDK module (:mod:`.s3`, :mod:`.gcs`)
implements the primitives, in the SDK-neutral terms of :class:`ObjectInfo` and
:class:`MissingObject`. Nothing here imports a cloud SDK.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ChecksumMismatch, ExperimentExists, StoreError
from ._names import check_layout, local_files, safe_relpath
from ._transfer import Cancelled, Progress, RetryPolicy, Sink, retry_call
from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MODELDIR,
    SERVING_FILE,
    ExperimentInfo,
    Store,
    check_serving_size,
    fingerprint_of,
    now_iso,
    serving_config_bytes,
    validate_key,
)
from .cache import ModelCache, RemoteObject, listing_digest

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RS = TypeVar("_RS", bound="RemoteStore")


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One object of a bucket listing, in SDK-neutral terms.

    The fields are those of :class:`~studioserve.store.cache.RemoteObject`, with the full
    object name only (not yet checked as a path).
    """

    name: str
    size: int
    etag: str = ""
    md5: str = ""
    crc32c: str = ""
    version: str = ""
    modified: float = 0.0


class MissingObject(Exception):
    """Raised by :meth:`RemoteStore._read_object` for an object that does not exist."""


class RemoteStore(Store):
    """An object-store experiment store: ``<prefix>/<key>/modeldir/**``, ``experiment.json``
    and an optional ``serving.toml``.

    Subclasses (:class:`~studioserve.store.s3.S3Store`,
    :class:`~studioserve.store.gcs.GCSStore`) provide a handful of primitive operations on one
    SDK; this class builds the store on them: listing only complete experiments, uploads that
    write ``experiment.json`` last, deletes that remove it first, retries with backoff, and
    fetches through the verified :class:`ModelCache`. Each object is written whole (one PUT,
    or a multipart/resumable upload that only appears once complete), so :meth:`put_file`
    never shows half a checkpoint; a checkpoint of several files appears file by file.
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
        """Stream ``obj`` into ``sink``; see :data:`~studioserve.store.cache.Downloader`."""

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
        serving_config: bytes | Path | None = None,
    ) -> ExperimentInfo:
        """Upload folder ``src`` as ``key``'s modeldir, then write ``experiment.json``.

        With ``force`` an existing experiment is first made incomplete (its
        ``experiment.json`` is deleted, so it is no longer listed), then its files are
        replaced; files of the old version that the new one lacks (its ``serving.toml``
        included, unless a new one is given) are deleted before ``experiment.json`` is
        written again.

        :param quiet: no progress line (it is only drawn on a terminal anyway).
        :param serving_config: the experiment's ``serving.toml`` (bytes, or a file to copy),
            written after the modeldir and before ``experiment.json``.
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
        serving_name = base + SERVING_FILE
        where = self._where(key)
        serving = (
            None if serving_config is None else serving_config_bytes(serving_config, where=where)
        )
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
        if serving is not None:
            self._write_serving(serving_name, serving)
            wanted.add(serving_name)
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
        nothing; after a change (a file put, rewritten or removed: a new :meth:`fingerprint`)
        it downloads only the new and changed objects, copies the others from the cached
        version, and returns a new folder (the older version is then deleted). Each cached
        file gets the object's modification time in the store as its mtime, so the newest
        checkpoint in the cache is the newest one in the store.

        :param refresh: download everything again even when the cache is current (for a
            damaged cache; a change in the store needs no refresh).
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

    def fingerprint(self, key: str) -> str:
        """A token of ``key``'s modeldir and ``serving.toml``, from one listing (no download).

        Built from what decides whether the cache is current (each object's name, size and
        MD5, or ETag/generation where there is no MD5), so a new token means :meth:`fetch`
        has something to download, and re-uploading identical bytes changes nothing.

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises UnsafePath: for a modeldir object name that could escape the cache folder.
        """
        base = self._base(key)
        listing = self._experiment(key)
        entries = [(MODELDIR, listing_digest(self._objects(key, listing)))]
        for o in listing:
            if o.name == base + SERVING_FILE:
                serving = RemoteObject(
                    SERVING_FILE, o.name, o.size, o.etag, o.md5, o.crc32c, o.version
                )
                entries.append((SERVING_FILE, listing_digest([serving])))
        return fingerprint_of(entries)

    def serving_config(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and URL of ``key``'s ``serving.toml``, or None; one listing, one read.

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises StoreError: for an object over the size limit (checked in the listing,
            before any download), or network failures.
        """
        base = self._base(key)
        name = base + SERVING_FILE
        url = self._object_url(name)
        top, _ = self._list(base, delimiter="/")
        names = {o.name: o for o in top}
        if base + EXPERIMENT_FILE not in names:
            raise self.not_found(key)
        listed = names.get(name)
        if listed is None:
            return None
        check_serving_size(listed.size, url)
        try:
            raw = self._call(lambda: self._read_object(name), what=f"read {url}")
        except MissingObject:
            return None  # deleted since the listing
        check_serving_size(len(raw), url)  # replaced by a bigger one since the listing
        return raw, url

    def put_serving_config(self, key: str, data: bytes | Path) -> None:
        """Create or replace ``key``'s ``serving.toml`` (one object write).

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        """
        raw = serving_config_bytes(data, where=self._where(key))
        self._require(key)
        name = self._base(key) + SERVING_FILE
        self._write_serving(name, raw)
        logger.info("wrote %s", self._object_url(name))

    def remove_serving_config(self, key: str) -> bool:
        """Delete ``key``'s ``serving.toml``; False if it had none.

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        """
        self._require(key)
        name = self._base(key) + SERVING_FILE
        url = self._object_url(name)
        if not self._call(lambda: self._exists_object(name), what=f"check {url}"):
            return False
        self._delete([name], what=f"delete {url}")
        logger.info("removed %s", url)
        return True

    def put_file(
        self, key: str, relative_path: str, local_path: Path, *, quiet: bool = True
    ) -> None:
        """Upload ``local_path`` as ``<key>/modeldir/<relative_path>`` (one object).

        The object appears whole once its upload completes (S3 and GCS never show a partial
        object); the experiment stays listed and fetchable throughout.

        :param quiet: no progress line.
        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises UnsafePath: for a path that is not a safe relative path, or that would make
            a file of modeldir also a folder.
        :raises StoreError: when ``local_path`` is not a readable file, or the upload fails.
        """
        rel = safe_relpath(relative_path)
        src = Path(local_path)
        existing = self._modeldir(key)
        if not src.is_file():
            raise StoreError(f"{src} is not a file; pass the checkpoint file to put")
        check_layout([o.rel for o in existing if o.rel != rel] + [rel])
        self._upload_all(key, self._base(key), [(rel, src)], quiet=quiet)
        logger.info("put %s into %s/%s/%s", src, self._where(key), MODELDIR, rel)

    def remove_file(self, key: str, relative_path: str) -> bool:
        """Delete the object ``<key>/modeldir/<relative_path>``; False if there is none.

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises UnsafePath: for a path that is not a safe relative path.
        :raises StoreError: when the path names a folder of modeldir, or the delete fails.
        """
        rel = safe_relpath(relative_path)
        objects = self._modeldir(key)
        url = f"{self._where(key)}/{MODELDIR}/{rel}"
        found = [o for o in objects if o.rel == rel]
        if not found:
            if any(o.rel.startswith(rel + "/") for o in objects):
                raise StoreError(f"{url} is a folder; name a file of it")
            return False
        self._delete([found[0].name], what=f"delete {url}")
        logger.info("removed %s", url)
        return True

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

    def _experiment(self, key: str) -> list[ObjectInfo]:
        """Every object of a complete experiment (one listing); not_found when incomplete."""
        base = self._base(key)
        listing, _ = self._list(base)
        if not any(o.name == base + EXPERIMENT_FILE for o in listing):
            raise self.not_found(key)
        return listing

    def _require(self, key: str) -> None:
        """Raise not_found unless ``key`` is a complete experiment (one HEAD)."""
        meta = self._base(key) + EXPERIMENT_FILE
        if not self._call(lambda: self._exists_object(meta), what=f"check {self._where(key)}"):
            raise self.not_found(key)

    def _write_serving(self, name: str, data: bytes) -> None:
        self._call(
            lambda: self._write_object(name, data, "application/toml"),
            what=f"write {self._object_url(name)}",
        )

    def _modeldir(self, key: str) -> list[RemoteObject]:
        """The modeldir listing of a complete experiment; not_found when it is incomplete."""
        return self._objects(key, self._experiment(key))

    def _objects(self, key: str, listing: Sequence[ObjectInfo]) -> list[RemoteObject]:
        """The modeldir files among ``key``'s ``listing``, as the cache describes them."""
        mbase = self._base(key) + MODELDIR + "/"
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
                    modified=o.modified,
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
