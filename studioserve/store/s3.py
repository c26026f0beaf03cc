"""Experiments in Amazon S3 or an S3-compatible store (MinIO, R2): ``s3://bucket/prefix``.

Layout: ``<prefix>/<key>/modeldir/**``, ``<prefix>/<key>/experiment.json`` and an optional
``<prefix>/<key>/serving.toml``. ``add`` uploads the modeldir (multipart for large files) and
writes ``experiment.json`` last, so a half-uploaded experiment is never listed. ``fetch``
downloads into a verified local cache (see :mod:`studioserve.store.cache`).

Credentials come only from boto3's standard chain (environment, ``AWS_PROFILE`` and
``~/.aws``, SSO, container or instance roles). So does the endpoint: set
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``, or ``endpoint_url`` in ``~/.aws/config``) to
use an S3-compatible store. This is the only module besides ``cloud/ec2.py`` that imports boto3.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import botocore.session
from boto3.s3.transfer import TransferConfig

from ..errors import ChecksumMismatch, ConfigError, StoreError
from ._transfer import CHUNK_SIZE, DEFAULT_WORKERS, RetryPolicy, Sink, md5_from_etag
from .cache import DEFAULT_LOCK_TIMEOUT, RemoteObject
from .remote import MissingObject, ObjectInfo, RemoteStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

#: Files of at least this many bytes are uploaded in parts.
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 16 * 1024 * 1024

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
        "XAmzContentSHA256Mismatch",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
    }
)
_CREDENTIAL_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.NoAuthTokenError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.SSOError,
    botocore.exceptions.ProfileNotFound,
)
_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.HTTPClientError,  # connection closed, read timeout, broken stream
    botocore.exceptions.ConnectionError,  # refused, DNS, connect timeout, proxy
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.FlexibleChecksumError,
    ConnectionError,
    TimeoutError,
)
_AWS_HOST = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$")

CREDENTIAL_CHAIN = (
    "boto3's standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), "
    "AWS_PROFILE with ~/.aws/credentials or ~/.aws/config (SSO: aws sso login), or a "
    "container/instance role; 'aws sts get-caller-identity' shows which identity is used"
)


def make_client(endpoint_url: str | None = None, *, max_pool_connections: int = 32) -> S3Client:
    """The one place S3 clients are made.

    :param endpoint_url: an explicit endpoint (tests, MinIO); None keeps boto3's own choice,
        which honours ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` and ``~/.aws/config``.
    :param max_pool_connections: the HTTP connection pool size (parallel transfers).
    :returns: a client using boto3's credential chain. botocore makes a single attempt per
        call: retries are :func:`studioserve.store._transfer.retry_call`'s job.
    """
    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
    )
    # A fresh session per client, so that environment changes (credentials, endpoints) are
    # seen, sharing one model loader: parsing the S3 service model is the slow part.
    core = botocore.session.get_session()
    core.register_component("data_loader", _shared_loader(core))
    session = boto3.session.Session(botocore_session=core)
    return session.client("s3", endpoint_url=endpoint_url, config=config)


_loader_lock = threading.Lock()
_loader: Any = None


def _shared_loader(core: botocore.session.Session) -> Any:
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        return _loader


def is_transient(exc: BaseException) -> bool:
    """True for S3 errors worth retrying: network failures, throttling, 5xx, bad checksums."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _code_status(exc)
        return code in _TRANSIENT_CODES or status == 429 or status >= 500
    return isinstance(exc, _NETWORK_ERRORS + (ChecksumMismatch,))


def _code_status(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code", ""))
    status = int(meta.get("HTTPStatusCode", 0) or 0)
    if not status and code.isdigit():
        status = int(code)
    return code, status


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (the prefix without outer slashes).

    :raises ConfigError: when the URL is not ``s3://`` or has no bucket.
    """
    parsed = urlparse(url)
    if parsed.scheme.lower() != "s3" or not parsed.netloc:
        raise ConfigError(f"bad S3 store URL {url!r}: use s3://BUCKET or s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


class S3Store(RemoteStore):
    """Experiments under ``s3://bucket/prefix``.

    :param url: ``s3://bucket`` or ``s3://bucket/prefix``.
    :param endpoint_url: an explicit endpoint; default: boto3's (see :func:`make_client`).
    :param client: a ready boto3 S3 client (then ``endpoint_url`` is ignored).
    :param cache_root: the local cache root; default :func:`studioserve.config.cache_dir`.
    :param workers: parallel transfers.
    :param retry: retries of transient errors (default :class:`RetryPolicy`: 5 attempts).
    :param multipart_threshold: files of at least this many bytes are uploaded in parts.
    :param multipart_chunksize: the part size (S3 wants at least 5 MiB).
    :param lock_timeout: seconds to wait for another process fetching the same key.
    :raises ConfigError: for a URL without a bucket.

    Example::

        with S3Store("s3://team-bucket/experiments") as store:
            store.add("mnist-7", Path("./checkpoints"))
            modeldir = store.fetch("mnist-7")  # verified local copy; again: no download
    """

    scheme = "s3"
    delete_batch_size = 1000

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        client: S3Client | None = None,
        cache_root: Path | None = None,
        workers: int = DEFAULT_WORKERS,
        retry: RetryPolicy | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        bucket, prefix = parse_url(url)
        self._client: S3Client = client or make_client(
            endpoint_url, max_pool_connections=max(10, workers * 4)
        )
        endpoint = str(self._client.meta.endpoint_url)
        custom = None if _AWS_HOST.search(urlparse(endpoint).hostname or "") else endpoint
        self._setup(
            bucket,
            prefix,
            endpoint=endpoint,
            custom_endpoint=custom,
            cache_root=cache_root,
            workers=workers,
            retry=retry,
            lock_timeout=lock_timeout,
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=4,
            use_threads=True,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    # -- primitives --------------------------------------------------------------------------

    def _list_page(
        self, prefix: str, delimiter: str | None, token: str | None
    ) -> tuple[list[ObjectInfo], list[str], str | None]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        page = self._client.list_objects_v2(**kwargs)
        objects = []
        for o in page.get("Contents", []):
            etag = str(o.get("ETag", "")).strip('"')
            modified = o.get("LastModified")
            objects.append(
                ObjectInfo(
                    name=str(o["Key"]),
                    size=int(o.get("Size", 0)),
                    etag=etag,
                    md5=md5_from_etag(etag),
                    modified=modified.timestamp() if modified is not None else 0.0,
                )
            )
        prefixes = [str(p["Prefix"]) for p in page.get("CommonPrefixes", [])]
        more = page.get("IsTruncated") and page.get("NextContinuationToken")
        return objects, prefixes, str(page["NextContinuationToken"]) if more else None

    def _exists_object(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as e:
            code, status = _code_status(e)
            if status == 404 and code != "NoSuchBucket":
                return False
            raise
        return True

    def _read_object(self, name: str) -> bytes:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as e:
            code, status = _code_status(e)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                raise MissingObject(name) from None
            raise
        with contextlib.closing(resp["Body"]) as body:
            return body.read()

    def _write_object(self, name: str, data: bytes, content_type: str) -> None:
        self._client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType=content_type)

    def _upload_file(self, path: Path, name: str, progress: Callable[[int], None]) -> None:
        try:
            self._client.upload_file(
                str(path),
                self.bucket,
                name,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Callback=progress,
                Config=self._transfer,
            )
        except boto3.exceptions.S3UploadFailedError as e:
            # boto3 wraps the ClientError (only as __context__); unwrap it to explain it.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, botocore.exceptions.ClientError):
                raise cause from None
            raise

    def _delete_objects(self, names: list[str]) -> None:
        if not names:
            return
        resp = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": n} for n in names], "Quiet": True},
        )
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise StoreError(
                f"could not delete {len(errors)} object(s) in {self.url}, e.g. "
                f"{self._object_url(str(first.get('Key')))} ({first.get('Code')}: "
                f"{first.get('Message')}); check s3:DeleteObject permission and try again"
            )

    def _download_object(self, obj: RemoteObject, sink: Sink) -> str | None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": obj.name}
        if obj.etag:
            kwargs["IfMatch"] = f'"{obj.etag}"'
        resp = self._client.get_object(**kwargs)
        with contextlib.closing(resp["Body"]) as body:
            for chunk in body.iter_chunks(CHUNK_SIZE):
                sink.write(chunk)
        encrypted = bool(resp.get("SSECustomerAlgorithm")) or str(
            resp.get("ServerSideEncryption", "")
        ).startswith("aws:kms")
        # An ETag is the MD5 of the content only for single-part objects without SSE-KMS or
        # SSE-C. botocore also checks the CRC/SHA checksum the object carries, if any.
        return None if encrypted else (obj.md5 or None)

    # -- errors ------------------------------------------------------------------------------

    def _is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def _explain(self, exc: BaseException, what: str) -> StoreError:
        if isinstance(exc, botocore.exceptions.ClientError):
            code, status = _code_status(exc)
            message = exc.response.get("Error", {}).get("Message", "") or str(exc)
            if code == "NoSuchBucket":
                return StoreError(
                    f"bucket {self.bucket!r} does not exist (store {self.url}, endpoint "
                    f"{self.endpoint}); check the bucket name in --store / STUDIO_STORE and the "
                    "endpoint (AWS_ENDPOINT_URL_S3 for S3-compatible stores), or create it: "
                    f"aws s3 mb s3://{self.bucket}"
                )
            if status in (401, 403) or code in _DENIED_CODES:
                return StoreError(
                    f"access denied to {self.url} ({what}: {code or status} {message}); check "
                    f"that the credentials found by {CREDENTIAL_CHAIN} allow s3:ListBucket and "
                    "s3:GetObject (and s3:PutObject, s3:DeleteObject for add and rm) on that "
                    "bucket and prefix"
                )
            if status in (404, 412) or code in ("PreconditionFailed", "NoSuchKey"):
                return StoreError(
                    f"{what}: an object changed or vanished while it was read ({code}); "
                    "someone is writing this experiment: wait for them and run the command again"
                )
            if is_transient(exc):
                return StoreError(
                    f"{what} failed after {self.retry.attempts} attempts ({code or status}: "
                    f"{message}) at {self.endpoint}; the service is busy or failing: try again "
                    "later"
                )
            return StoreError(
                f"{what} failed ({code or status}: {message}) at {self.endpoint}; check the "
                f"store URL {self.url}"
            )
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return StoreError(
                f"no usable AWS credentials for {self.url} ({exc}); configure them through "
                f"{CREDENTIAL_CHAIN}"
            )
        if isinstance(exc, _NETWORK_ERRORS):
            return StoreError(
                f"cannot reach the S3 endpoint {self.endpoint} for {self.url} after "
                f"{self.retry.attempts} attempts ({what}: {type(exc).__name__}: {exc}); check "
                "the network and proxy settings (HTTPS_PROXY, NO_PROXY), or, for an "
                "S3-compatible store, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL"
            )
        if isinstance(exc, OSError):
            return StoreError(f"{what} failed: {exc}; check the local files and the cache folder")
        return StoreError(f"{what} failed: {type(exc).__name__}: {exc}")
