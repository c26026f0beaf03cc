"""Experiments in Google Cloud Storage: ``gs://bucket/prefix``.

Layout: ``<prefix>/<key>/modeldir/**``, ``<prefix>/<key>/experiment.json`` and an optional
``<prefix>/<key>/serving.toml``. ``add`` uploads the modeldir (resumable uploads, in chunks,
for files over 8 MiB) and writes ``experiment.json`` last, so a half-uploaded experiment is
never listed. ``fetch`` downloads into a verified local cache (see
:mod:`studioserve.store.cache`); the SDK checks each download's CRC32C and the cache its size
and MD5.

Credentials come only from google-cloud-storage's standard chain (Application Default
Credentials: ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``,
or the VM's service account). The endpoint is the SDK's too: ``STORAGE_EMULATOR_HOST`` points
it at an emulator (then without credentials). This is the only module besides
``cloud/gce.py`` that imports the Google Cloud SDK.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import google.api_core.exceptions as gexc
import google.auth.exceptions
import requests.exceptions
import urllib3.exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage  # type: ignore[attr-defined]
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

from ..errors import ChecksumMismatch, ConfigError, StoreError
from ._transfer import DEFAULT_WORKERS, RetryPolicy, Sink
from .cache import DEFAULT_LOCK_TIMEOUT, RemoteObject
from .remote import MissingObject, ObjectInfo, RemoteStore

logger = logging.getLogger(__name__)

#: Resumable uploads (files over 8 MiB, the SDK's limit for one-request uploads) send chunks
#: of this size; a multiple of 256 KiB.
DEFAULT_CHUNK_SIZE = 32 * 1024 * 1024
DEFAULT_TIMEOUT = (10.0, 60.0)
DEFAULT_ENDPOINT = "https://storage.googleapis.com"

_TRANSIENT_API_ERRORS: tuple[type[Exception], ...] = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    gexc.RetryError,
)
_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,  # a broken stream while reading a raw download
    google.auth.exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)
_CREDENTIAL_ERRORS: tuple[type[Exception], ...] = (
    google.auth.exceptions.DefaultCredentialsError,
    google.auth.exceptions.RefreshError,
)

CREDENTIAL_CHAIN = (
    "Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS (a service account key "
    "file), 'gcloud auth application-default login', or the VM's service account"
)


def make_client(endpoint: str | None = None, *, anonymous: bool | None = None) -> storage.Client:
    """The one place GCS clients are made.

    :param endpoint: an explicit API endpoint (tests); None keeps the SDK's choice, which
        honours ``STORAGE_EMULATOR_HOST``.
    :param anonymous: no credentials (an emulator); default: only with an explicit endpoint.
    :returns: a client using the SDK's credential chain (or anonymous), with no project
        (none is needed to read and write objects).
    :raises StoreError: when no credentials can be found.
    """
    if anonymous is None:
        anonymous = endpoint is not None
    options = {"api_endpoint": endpoint} if endpoint else None
    credentials = AnonymousCredentials() if anonymous else None  # type: ignore[no-untyped-call]
    try:
        return storage.Client(project=None, credentials=credentials, client_options=options)
    except _CREDENTIAL_ERRORS as e:
        raise StoreError(
            f"no Google Cloud credentials found ({e}); set them up through {CREDENTIAL_CHAIN}"
        ) from e


def is_transient(exc: BaseException) -> bool:
    """True for GCS errors worth retrying: network failures, 429, 5xx, bad checksums."""
    if isinstance(exc, InvalidResponse):
        status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
        return status == 429 or status >= 500
    return isinstance(
        exc, _TRANSIENT_API_ERRORS + _NETWORK_ERRORS + (DataCorruption, ChecksumMismatch)
    )


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``gs://bucket/prefix`` (the prefix without outer slashes).

    :raises ConfigError: when the URL is not ``gs://`` or has no bucket.
    """
    parsed = urlparse(url)
    if parsed.scheme.lower() != "gs" or not parsed.netloc:
        raise ConfigError(f"bad GCS store URL {url!r}: use gs://BUCKET or gs://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


def _b64_to_hex(value: str | None) -> str:
    if not value:
        return ""
    try:
        return base64.b64decode(value).hex()
    except (binascii.Error, ValueError):
        return ""


class _NoBucket(Exception):
    """A listing answered 404: the bucket does not exist."""


def _bucket_missing(exc: BaseException) -> bool:
    """A 404 about the bucket (not about an object)."""
    if isinstance(exc, _NoBucket):
        return True
    if not isinstance(exc, gexc.NotFound):
        return False
    message = str(exc).lower()  # phrases with spaces: never part of a URL-encoded name
    return "the specified bucket does not exist" in message or "no such bucket" in message


class _Reader(io.RawIOBase):
    """A read-only file that reports how many bytes the SDK has read (upload progress)."""

    def __init__(self, raw: io.BufferedReader, progress: Callable[[int], None]) -> None:
        super().__init__()
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        before = self._raw.tell()
        after = self._raw.seek(offset, whence)
        if after < before:
            self._progress(after - before)  # a resumed upload re-sends from here
        return after


class GCSStore(RemoteStore):
    """Experiments under ``gs://bucket/prefix``.

    :param url: ``gs://bucket`` or ``gs://bucket/prefix``.
    :param endpoint: an explicit API endpoint (tests, emulators); default: the SDK's, which
        honours ``STORAGE_EMULATOR_HOST``.
    :param anonymous: use no credentials; default: only with an explicit ``endpoint``.
    :param client: a ready ``google.cloud.storage.Client`` (then ``endpoint`` is ignored).
    :param cache_root: the local cache root; default :func:`studioserve.config.cache_dir`.
    :param workers: parallel transfers.
    :param retry: retries of transient errors (default :class:`RetryPolicy`: 5 attempts).
    :param chunk_size: the chunk size of resumable uploads (a multiple of 256 KiB).
    :param timeout: ``(connect, read)`` seconds per request.
    :param lock_timeout: seconds to wait for another process fetching the same key.
    :raises ConfigError: for a URL without a bucket.
    :raises StoreError: when no credentials can be found.

    Example::

        with GCSStore("gs://team-bucket/experiments") as store:
            modeldir = store.fetch("mnist-7")
    """

    scheme = "gs"
    delete_batch_size = 1

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        anonymous: bool | None = None,
        client: storage.Client | None = None,
        cache_root: Path | None = None,
        workers: int = DEFAULT_WORKERS,
        retry: RetryPolicy | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        bucket, prefix = parse_url(url)
        if chunk_size <= 0 or chunk_size % (256 * 1024):
            raise ValueError("chunk_size must be a positive multiple of 256 KiB")
        self._client = client or make_client(endpoint, anonymous=anonymous)
        api = str(getattr(self._client._connection, "API_BASE_URL", "") or DEFAULT_ENDPOINT)
        custom = None if urlparse(api).hostname == "storage.googleapis.com" else api
        self._setup(
            bucket,
            prefix,
            endpoint=api,
            custom_endpoint=custom,
            cache_root=cache_root,
            workers=workers,
            retry=retry,
            lock_timeout=lock_timeout,
        )
        self._bucket = self._client.bucket(bucket)
        self.chunk_size = chunk_size
        self.timeout = timeout

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    # -- primitives --------------------------------------------------------------------------

    def _list_page(
        self, prefix: str, delimiter: str | None, token: str | None
    ) -> tuple[list[ObjectInfo], list[str], str | None]:
        iterator = self._client.list_blobs(
            self.bucket,
            prefix=prefix,
            delimiter=delimiter,
            page_token=token,
            page_size=1000,
            retry=None,
            timeout=self.timeout,
        )
        try:
            page = next(iterator.pages, None)
        except gexc.NotFound as e:
            raise _NoBucket(str(e)) from e
        if page is None:
            return [], [], None
        objects = [
            ObjectInfo(
                name=blob.name,
                size=int(blob.size or 0),
                etag=str(blob.etag or ""),
                md5=_b64_to_hex(blob.md5_hash),
                crc32c=str(blob.crc32c or ""),
                version=str(blob.generation or ""),
                modified=blob.updated.timestamp() if blob.updated is not None else 0.0,
            )
            for blob in page
        ]
        prefixes = [str(p) for p in getattr(page, "prefixes", ())]
        return objects, prefixes, iterator.next_page_token or None

    def _exists_object(self, name: str) -> bool:
        try:
            self._bucket.blob(name).reload(retry=None, timeout=self.timeout, projection="noAcl")
        except gexc.NotFound as e:
            if _bucket_missing(e):
                raise
            return False
        return True

    def _read_object(self, name: str) -> bytes:
        try:
            data: bytes = self._bucket.blob(name).download_as_bytes(
                retry=None, timeout=self.timeout
            )
        except gexc.NotFound as e:
            if _bucket_missing(e):
                raise
            raise MissingObject(name) from None
        return data

    def _write_object(self, name: str, data: bytes, content_type: str) -> None:
        self._bucket.blob(name).upload_from_string(
            data, content_type=content_type, retry=None, timeout=self.timeout
        )

    def _upload_file(self, path: Path, name: str, progress: Callable[[int], None]) -> None:
        size = path.stat().st_size
        blob = self._bucket.blob(name, chunk_size=self.chunk_size)
        with path.open("rb") as raw:
            reader = io.BufferedReader(_Reader(raw, progress))
            blob.upload_from_file(
                reader,
                size=size,
                content_type="application/octet-stream",
                retry=None,
                timeout=self.timeout,
            )

    def _delete_objects(self, names: list[str]) -> None:
        for name in names:
            try:
                self._bucket.blob(name).delete(retry=None, timeout=self.timeout)
            except gexc.NotFound as e:
                if _bucket_missing(e):
                    raise

    def _download_object(self, obj: RemoteObject, sink: Sink) -> str | None:
        generation = int(obj.version) if obj.version.isdigit() else None
        blob = self._bucket.blob(obj.name, generation=generation)
        # raw_download: the bytes as stored (no gunzip), which the listing's size describes.
        blob.download_to_file(sink, raw_download=True, retry=None, timeout=self.timeout)
        return obj.md5 or None

    # -- errors ------------------------------------------------------------------------------

    def _is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def _explain(self, exc: BaseException, what: str) -> StoreError:
        if _bucket_missing(exc):
            return StoreError(
                f"bucket {self.bucket!r} does not exist (store {self.url}, endpoint "
                f"{self.endpoint}); check the bucket name in --store / STUDIO_STORE, or create "
                f"it: gcloud storage buckets create gs://{self.bucket}"
            )
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return StoreError(
                f"permission denied on {self.url} ({what}: {exc.code} {exc.message}); check "
                f"that the credentials found through {CREDENTIAL_CHAIN} have "
                "roles/storage.objectViewer (roles/storage.objectAdmin for add and rm) on "
                "that bucket"
            )
        if isinstance(exc, (gexc.NotFound, gexc.PreconditionFailed)):
            return StoreError(
                f"{what}: an object changed or vanished while it was read ({exc.code}); someone "
                "is writing this experiment: wait for them and run the command again"
            )
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return StoreError(
                f"no usable Google Cloud credentials for {self.url} ({exc}); set them up "
                f"through {CREDENTIAL_CHAIN}"
            )
        if isinstance(exc, _TRANSIENT_API_ERRORS):
            return StoreError(
                f"{what} failed after {self.retry.attempts} attempts ({exc}) at "
                f"{self.endpoint}; the service is busy or failing: try again later"
            )
        if isinstance(exc, DataCorruption):
            return StoreError(
                f"{what}: the download failed its checksum {self.retry.attempts} times; the "
                "object changed while it was fetched or is damaged in the store: run again, "
                "and re-add the experiment if it persists"
            )
        if isinstance(exc, _NETWORK_ERRORS):
            return StoreError(
                f"cannot reach the GCS endpoint {self.endpoint} for {self.url} after "
                f"{self.retry.attempts} attempts ({what}: {type(exc).__name__}: {exc}); check "
                "the network and proxy settings (HTTPS_PROXY, NO_PROXY), or "
                "STORAGE_EMULATOR_HOST if you meant an emulator"
            )
        if isinstance(exc, gexc.GoogleAPICallError):
            return StoreError(
                f"{what} failed ({exc.code} {exc.message}) at {self.endpoint}; check the store "
                f"URL {self.url}"
            )
        if isinstance(exc, OSError):
            return StoreError(f"{what} failed: {exc}; check the local files and the cache folder")
        return StoreError(f"{what} failed: {type(exc).__name__}: {exc}")
