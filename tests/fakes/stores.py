"""Fixtures for the remote stores: moto's S3 server and a fake GCS, both on 127.0.0.1:0.

Use them from a test module with ``from tests.fakes.stores import *  # noqa: F403`` (a star
import, so that ruff does not take fixture arguments for redefinitions), or from the root
conftest with ``pytest_plugins = ["tests.fakes.stores"]``.

- ``moto_s3``: a :class:`MotoS3` (moto's S3 WSGI app behind a fault-injecting layer);
  ``moto_s3.endpoint`` is its URL, ``moto_s3.plan`` its :class:`~tests.fakes.gcs_fake.FaultPlan`.
- ``s3_bucket``: a fresh bucket name on it; ``s3_store``: an ``S3Store`` on
  ``s3://<bucket>/experiments`` with fast retries.
- ``gcs_fake``: a :class:`~tests.fakes.gcs_fake.FakeGCS` with bucket ``studio-test``;
  ``gcs_store``: a ``GCSStore`` on ``gs://studio-test/experiments``.
- ``make_modeldir``: writes ``{relative path: bytes}`` into a fresh folder.

For a subprocess (``studio serve --store s3://...``) point the SDKs at the fakes by
environment alone: ``AWS_ENDPOINT_URL=moto_s3.endpoint`` (the autouse ``clean_environ``
fixture already sets fake AWS credentials) or ``STORAGE_EMULATOR_HOST=gcs_fake.endpoint``.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.fakes.gcs_fake import Call, FakeGCS, FaultPlan, body_with_fault

__all__ = [
    "GCS_BUCKET",
    "MotoS3",
    "fast_retry",
    "gcs_fake",
    "gcs_store",
    "make_modeldir",
    "moto_s3",
    "read_tree",
    "released",
    "s3_bucket",
    "s3_store",
]

#: Retries for tests: as many attempts as the default, but no real waiting.
FAST_RETRY_KW = {"attempts": 3, "backoff": 0.01, "max_backoff": 0.05}

GCS_BUCKET = "studio-test"


class MotoS3:
    """moto's S3 server (``moto.server``'s WSGI app) on ``127.0.0.1`` port 0, with faults.

    Every request is recorded in :attr:`plan` as a :class:`~tests.fakes.gcs_fake.Call` (ops:
    ``list``, ``get``, ``head``, ``put``, ``upload``, ``delete``, ``bucket``) and may be
    failed, truncated, corrupted, held or denied by it.
    """

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.plan = plan or FaultPlan()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> MotoS3:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):  # type: ignore[misc]
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", 0, self, threaded=True, request_handler=QuietHandler
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="studioserve-test-moto",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self.plan.reset()  # releases held requests
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self) -> Any:
        """A plain boto3 client on this server, for test set-up and inspection."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    # -- the WSGI layer ------------------------------------------------------------------

    @staticmethod
    def classify(environ: dict[str, Any]) -> Call:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        bucket, _, name = path.lstrip("/").partition("/")
        if not name:
            if method == "GET" and ("list-type" in query or not query):
                return Call("list", bucket, query.get("prefix", [""])[0])
            if method == "POST" and "delete" in query:
                return Call("delete", bucket, "")
            return Call("bucket", bucket, "")
        if method == "GET":
            return Call("get", bucket, name)
        if method == "HEAD":
            return Call("head", bucket, name)
        if method == "DELETE":
            return Call("delete", bucket, name)
        if "uploadId" in query or "uploads" in query:
            return Call("upload", bucket, name)
        return Call("put", bucket, name)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        call = self.classify(environ)
        rule = self.plan.take(call)
        if rule is not None and rule.action in ("deny", "fail"):
            return self._error(start_response, rule.status, rule.code, call, environ)
        if rule is not None and rule.action == "hold" and rule.after_bytes == 0:
            assert rule.gate is not None
            rule.gate.wait()
            rule = None
        if rule is None:
            return self._app(environ, start_response)  # type: ignore[no-any-return]
        # A body fault: let moto answer, then misbehave while sending its body.
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        result = self._app(environ, capture)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        start_response(captured["status"], captured["headers"])
        return body_with_fault(rule, body)

    @staticmethod
    def _error(
        start_response: Callable[..., Any],
        status: int,
        code: str,
        call: Call,
        environ: dict[str, Any],
    ) -> list[bytes]:
        reason = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}.get(
            status, "Service Unavailable"
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>fault injection: {code}</Message>"
            f"<BucketName>{call.bucket}</BucketName><RequestId>fake</RequestId></Error>"
        ).encode()
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        start_response(
            f"{status} {reason}",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def fast_retry() -> Any:
    from studioserve.store._transfer import RetryPolicy

    return RetryPolicy(**FAST_RETRY_KW)


@pytest.fixture
def moto_s3() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    name = f"studio-{uuid.uuid4().hex[:12]}"
    client = moto_s3.client()
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()
    moto_s3.plan.reset()
    return name


@pytest.fixture
def s3_store(moto_s3: MotoS3, s3_bucket: str) -> Iterator[Any]:
    from studioserve.store.s3 import S3Store

    store = S3Store(
        f"s3://{s3_bucket}/experiments", endpoint_url=moto_s3.endpoint, retry=fast_retry()
    )
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def gcs_fake() -> Iterator[FakeGCS]:
    with FakeGCS() as fake:
        fake.create_bucket(GCS_BUCKET)
        yield fake


@pytest.fixture
def gcs_store(gcs_fake: FakeGCS) -> Iterator[Any]:
    from studioserve.store.gcs import GCSStore

    store = GCSStore(
        f"gs://{GCS_BUCKET}/experiments", endpoint=gcs_fake.endpoint, retry=fast_retry()
    )
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_modeldir(tmp_path: Path) -> Callable[..., Path]:
    """``make_modeldir({"a.bin": b"...", "sub/b.txt": b"..."}, name="src") -> Path``."""
    counter = iter(range(1_000_000))

    def make(files: dict[str, bytes], name: str | None = None) -> Path:
        root = tmp_path / (name or f"modeldir-{next(counter)}")
        root.mkdir(parents=True)
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root

    return make


def read_tree(root: Path) -> dict[str, bytes]:
    """``{relative path: content}`` of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def released(gate: Any) -> Iterator[Any]:
    """Release ``gate`` on exit, whatever happens in the block."""
    try:
        yield gate
    finally:
        gate.release()
