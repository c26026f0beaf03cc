"""A small in-process fake of the Google Cloud Storage JSON API, plus fault injection.

It speaks the wire protocol google-cloud-storage uses (JSON API v1: object listing with
prefix/delimiter/paging, object metadata, ``alt=media`` downloads with ``x-goog-hash``,
multipart and resumable uploads, deletes, generation preconditions) on ``127.0.0.1``, port 0.
Point a client at it with ``STORAGE_EMULATOR_HOST=fake.endpoint`` or
``client_options={"api_endpoint": fake.endpoint}``.

Unlike an emulator it lets a test store any object name (``../x``), count requests and
inject faults through a :class:`FaultPlan`, which the moto-based S3 fake shares.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import google_crc32c

# --------------------------------------------------------------------------------------------
# Fault injection shared by both fakes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One request as a fake saw it: an operation, a bucket and an object name or prefix."""

    op: str  # list, get, head, meta, put, upload, delete, bucket, ...
    bucket: str
    name: str


class Gate:
    """Holds matching requests until :meth:`release` (or a 30 s safety timeout).

    ``arrived`` is set when the first matching request reaches the gate.
    """

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def wait(self) -> None:
        self.arrived.set()
        self.released.wait(30)


@dataclasses.dataclass
class _Rule:
    op: str
    name: str | None  # substring of the object name, or None for any
    action: str  # fail | truncate | corrupt | hold | deny
    times: int  # remaining uses; -1 = forever
    status: int = 500
    code: str = "InternalError"
    gate: Gate | None = None
    after_bytes: int = 0
    bucket: str | None = None

    def matches(self, call: Call) -> bool:
        if self.times == 0:
            return False
        if self.bucket is not None and call.bucket != self.bucket:
            return False
        if self.op != "*" and call.op != self.op:
            return False
        return self.name is None or self.name in call.name


class FaultPlan:
    """Records every request and decides which ones misbehave. Thread-safe.

    Faults: :meth:`fail` (an error status), :meth:`truncate` (half the body, then the
    connection drops), :meth:`corrupt` (one byte flipped), :meth:`hold` (wait on a
    :class:`Gate`, optionally after part of the body), :meth:`deny` (403 for a bucket).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls: list[Call] = []
        self._rules: list[_Rule] = []

    def reset(self) -> None:
        with self._cond:
            for rule in self._rules:
                if rule.gate is not None:
                    rule.gate.release()
            self.calls.clear()
            self._rules.clear()

    # -- recording -----------------------------------------------------------------------

    def record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def count(self, op: str, name: str | None = None) -> int:
        with self._cond:
            return sum(1 for c in self.calls if c.op == op and (name is None or name in c.name))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Wait (on request notifications, not sleeps) until ``predicate()`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- faults --------------------------------------------------------------------------

    def fail(
        self,
        op: str,
        *,
        status: int = 503,
        code: str = "SlowDown",
        name: str | None = None,
        times: int = 1,
    ) -> None:
        self._add(_Rule(op, name, "fail", times, status=status, code=code))

    def truncate(self, name: str, *, times: int = 1) -> None:
        self._add(_Rule("get", name, "truncate", times))

    def corrupt(self, name: str, *, times: int = 1) -> None:
        self._add(_Rule("get", name, "corrupt", times))

    def hold(self, op: str, *, name: str | None = None, after_bytes: int = 0) -> Gate:
        gate = Gate()
        self._add(_Rule(op, name, "hold", -1, gate=gate, after_bytes=after_bytes))
        return gate

    def deny(self, bucket: str) -> None:
        self._add(_Rule("*", None, "deny", -1, status=403, code="AccessDenied", bucket=bucket))

    def _add(self, rule: _Rule) -> None:
        with self._cond:
            self._rules.append(rule)

    def take(self, call: Call) -> _Rule | None:
        """Record ``call`` and return the first rule it triggers (using one of its uses)."""
        self.record(call)
        with self._cond:
            for rule in self._rules:
                if rule.matches(call):
                    if rule.times > 0:
                        rule.times -= 1
                    return rule
        return None


def body_with_fault(rule: _Rule | None, body: bytes) -> Iterator[bytes]:
    """The response body as chunks, misbehaving the way ``rule`` says."""
    if rule is None or rule.action not in ("truncate", "corrupt", "hold"):
        yield body
        return
    if rule.action == "corrupt" and body:
        mid = len(body) // 2
        yield body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
        return
    if rule.action == "truncate":
        yield body[: len(body) // 2]
        raise ConnectionAbortedError("fault injection: connection dropped mid-body")
    assert rule.gate is not None
    cut = min(rule.after_bytes, len(body))
    if cut:
        yield body[:cut]
    rule.gate.wait()
    yield body[cut:]


# --------------------------------------------------------------------------------------------
# The fake GCS server
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Object:
    name: str
    data: bytes
    generation: int
    content_type: str = "application/octet-stream"
    metageneration: int = 1
    updated: str = ""

    def md5(self) -> str:
        return base64.b64encode(hashlib.md5(self.data).digest()).decode()

    def crc32c(self) -> str:
        return base64.b64encode(google_crc32c.Checksum(self.data).digest()).decode()

    def resource(self, bucket: str, endpoint: str) -> dict[str, Any]:
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{self.name}/{self.generation}",
            "name": self.name,
            "bucket": bucket,
            "generation": str(self.generation),
            "metageneration": str(self.metageneration),
            "contentType": self.content_type,
            "size": str(len(self.data)),
            "md5Hash": self.md5(),
            "crc32c": self.crc32c(),
            "etag": base64.b64encode(f"{self.generation}".encode()).decode(),
            "timeCreated": self.updated,
            "updated": self.updated,
            "storageClass": "STANDARD",
            "mediaLink": f"{endpoint}/download/storage/v1/b/{bucket}/o/"
            f"{quote(self.name, safe='')}?generation={self.generation}&alt=media",
            "selfLink": f"{endpoint}/storage/v1/b/{bucket}/o/{quote(self.name, safe='')}",
        }


class _GCSError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or {
            400: "invalid",
            403: "forbidden",
            404: "notFound",
            412: "conditionNotMet",
        }.get(status, "backendError")


class FakeGCS:
    """A fake GCS JSON API on ``127.0.0.1`` (port 0), for google-cloud-storage clients.

    :param plan: the fault plan to consult (a fresh one by default).

    Example::

        with FakeGCS() as fake:
            fake.create_bucket("bkt")
            client = storage.Client(client_options={"api_endpoint": fake.endpoint},
                                    credentials=AnonymousCredentials(), project="test")
    """

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.plan = plan or FaultPlan()
        self._lock = threading.Lock()
        self._buckets: dict[str, dict[str, _Object]] = {}
        self._uploads: dict[str, dict[str, Any]] = {}
        self._generation = int(time.time() * 1_000_000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeGCS:
        fake = self

        class Handler(_Handler):
            owner = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="studioserve-test-gcs-fake",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self.plan.reset()  # releases any held request
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeGCS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- direct access for tests ---------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        with self._lock:
            self._buckets.setdefault(name, {})

    def put(self, bucket: str, name: str, data: bytes) -> None:
        """Store an object directly (any name, even ``../x``)."""
        with self._lock:
            self._store(bucket, name, data, "application/octet-stream")

    def get(self, bucket: str, name: str) -> bytes:
        with self._lock:
            return self._buckets[bucket][name].data

    def names(self, bucket: str) -> list[str]:
        with self._lock:
            return sorted(self._buckets.get(bucket, {}))

    # -- storage -------------------------------------------------------------------------

    def _store(self, bucket: str, name: str, data: bytes, content_type: str) -> _Object:
        objects = self._objects(bucket)
        self._generation += 1
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        obj = _Object(name, data, self._generation, content_type or "", updated=now)
        objects[name] = obj
        return obj

    def _objects(self, bucket: str) -> dict[str, _Object]:
        try:
            return self._buckets[bucket]
        except KeyError:
            raise _GCSError(404, "The specified bucket does not exist.") from None

    def _find(self, bucket: str, name: str, query: dict[str, str]) -> _Object:
        obj = self._objects(bucket).get(name)
        if obj is None or ("generation" in query and str(obj.generation) != query["generation"]):
            raise _GCSError(404, f"No such object: {bucket}/{name}")
        if "ifGenerationMatch" in query and str(obj.generation) != query["ifGenerationMatch"]:
            raise _GCSError(412, "At least one of the pre-conditions you specified did not hold.")
        return obj

    def _check_create(self, bucket: str, name: str, query: dict[str, str]) -> None:
        want = query.get("ifGenerationMatch")
        if want is None:
            return
        obj = self._objects(bucket).get(name)
        current = str(obj.generation) if obj else "0"
        if current != want:
            raise _GCSError(412, "At least one of the pre-conditions you specified did not hold.")


class _Handler(BaseHTTPRequestHandler):
    owner: FakeGCS
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass

    # -- plumbing ------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        rule: _Rule | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            for chunk in body_with_fault(rule, body):
                self.wfile.write(chunk)
                self.wfile.flush()
        except (ConnectionAbortedError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, status: int, message: str, reason: str = "") -> None:
        err = _GCSError(status, message, reason)
        self._json(
            status,
            {
                "error": {
                    "code": status,
                    "message": message,
                    "errors": [{"message": message, "domain": "global", "reason": err.reason}],
                }
            },
        )

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        try:
            self._route(path, query)
        except _GCSError as e:
            self._error(e.status, e.message, e.reason)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch  # noqa: N815

    # -- routing -------------------------------------------------------------------------

    def _route(self, path: str, query: dict[str, str]) -> None:
        fake = self.owner
        segs = path.split("/")
        # /upload/storage/v1/b/{bucket}/o
        if path.startswith("/upload/storage/v1/b/") and len(segs) == 7 and segs[6] == "o":
            bucket = unquote(segs[5])
            if self.command == "POST":
                return self._upload_start(bucket, query)
            if self.command == "PUT":
                return self._upload_chunk(bucket, query)
        # /download/storage/v1/b/{bucket}/o/{name}
        if path.startswith("/download/storage/v1/b/") and len(segs) >= 8 and segs[6] == "o":
            bucket, name = unquote(segs[5]), unquote("/".join(segs[7:]))
            return self._media(bucket, name, query)
        if path.startswith("/storage/v1/b"):
            rest = segs[4:]  # after /storage/v1/b
            if not rest or rest == [""]:
                if self.command == "POST":
                    data = json.loads(self._body() or b"{}")
                    if self._rule(Call("bucket", data.get("name", ""), "")):
                        return
                    fake.create_bucket(data["name"])
                    return self._json(200, {"kind": "storage#bucket", "name": data["name"]})
                raise _GCSError(400, "listing buckets is not supported by this fake")
            bucket = unquote(rest[0])
            if len(rest) == 1:
                if self._rule(Call("bucket", bucket, "")):
                    return
                with fake._lock:
                    fake._objects(bucket)
                return self._json(
                    200,
                    {
                        "kind": "storage#bucket",
                        "id": bucket,
                        "name": bucket,
                        "location": "US",
                        "locationType": "multi-region",
                        "storageClass": "STANDARD",
                        "projectNumber": "123456789",
                        "metageneration": "1",
                    },
                )
            if rest[1] == "o" and len(rest) == 2:
                return self._list(bucket, query)
            if rest[1] == "o" and len(rest) >= 3:
                name = unquote("/".join(rest[2:]))
                if self.command == "DELETE":
                    return self._delete(bucket, name, query)
                if query.get("alt") == "media":
                    return self._media(bucket, name, query)
                return self._meta(bucket, name, query)
        raise _GCSError(404, f"this fake does not serve {self.command} {path}")

    def _rule(self, call: Call) -> _Rule | None:
        """Record the call; answer it here (and return the rule) if a fault says so."""
        rule = self.owner.plan.take(call)
        if rule is None:
            return None
        if rule.action == "deny":
            self._error(403, f"anonymous caller does not have access to {call.bucket}")
            return rule
        if rule.action == "fail":
            self._error(rule.status, f"fault injection: {rule.code}")
            return rule
        if rule.action == "hold" and rule.after_bytes == 0:
            assert rule.gate is not None
            rule.gate.wait()
            return None
        return rule if rule.action in ("truncate", "corrupt", "hold") else None

    # -- handlers ------------------------------------------------------------------------

    def _list(self, bucket: str, query: dict[str, str]) -> None:
        prefix = query.get("prefix", "")
        if self._rule(Call("list", bucket, prefix)):
            return
        delimiter = query.get("delimiter", "")
        page_size = int(query.get("maxResults") or 1000)
        token = query.get("pageToken", "")
        fake = self.owner
        with fake._lock:
            objects = fake._objects(bucket)
            names = sorted(n for n in objects if n.startswith(prefix))
            entries: list[tuple[str, _Object | None]] = []
            seen_prefixes: set[str] = set()
            for n in names:
                if delimiter:
                    cut = n.find(delimiter, len(prefix))
                    if cut >= 0:
                        p = n[: cut + len(delimiter)]
                        if p not in seen_prefixes:
                            seen_prefixes.add(p)
                            entries.append((p, None))
                        continue
                entries.append((n, objects[n]))
            entries = [e for e in entries if e[0] > token] if token else entries
            page, more = entries[:page_size], len(entries) > page_size
            items = [o.resource(bucket, fake.endpoint) for _, o in page if o is not None]
        out: dict[str, Any] = {"kind": "storage#objects"}
        if items:
            out["items"] = items
        prefixes = [n for n, o in page if o is None]
        if prefixes:
            out["prefixes"] = prefixes
        if more:
            out["nextPageToken"] = page[-1][0]
        self._json(200, out)

    def _meta(self, bucket: str, name: str, query: dict[str, str]) -> None:
        if self._rule(Call("meta", bucket, name)):
            return
        fake = self.owner
        with fake._lock:
            obj = fake._find(bucket, name, query)
            resource = obj.resource(bucket, fake.endpoint)
        self._json(200, resource)

    def _media(self, bucket: str, name: str, query: dict[str, str]) -> None:
        rule = self._rule(Call("get", bucket, name))
        if rule is not None and rule.action in ("deny", "fail"):
            return
        fake = self.owner
        with fake._lock:
            obj = fake._find(bucket, name, query)
            data, md5, crc, gen = obj.data, obj.md5(), obj.crc32c(), obj.generation
        headers = {
            "x-goog-hash": f"crc32c={crc},md5={md5}",
            "x-goog-generation": str(gen),
            "x-goog-metageneration": "1",
            "x-goog-stored-content-length": str(len(data)),
            "x-goog-stored-content-encoding": "identity",
        }
        status = 200
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = int(last) if last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        self._send(status, data, "application/octet-stream", headers, rule=rule)

    def _delete(self, bucket: str, name: str, query: dict[str, str]) -> None:
        if self._rule(Call("delete", bucket, name)):
            return
        fake = self.owner
        with fake._lock:
            fake._find(bucket, name, query)
            del fake._objects(bucket)[name]
        self._send(204)

    def _upload_start(self, bucket: str, query: dict[str, str]) -> None:
        kind = query.get("uploadType", "")
        body = self._body()
        fake = self.owner
        if kind == "multipart":
            meta, data = _split_multipart(self.headers.get("Content-Type", ""), body)
            name = meta.get("name") or query.get("name", "")
            if self._rule(Call("put", bucket, name)):
                return
            _check_checksums(meta, data)
            with fake._lock:
                fake._check_create(bucket, name, query)
                obj = fake._store(bucket, name, data, meta.get("contentType", ""))
                resource = obj.resource(bucket, fake.endpoint)
            return self._json(200, resource)
        if kind == "media":
            name = query.get("name", "")
            if self._rule(Call("put", bucket, name)):
                return
            with fake._lock:
                fake._check_create(bucket, name, query)
                obj = fake._store(bucket, name, body, self.headers.get("Content-Type", ""))
                resource = obj.resource(bucket, fake.endpoint)
            return self._json(200, resource)
        if kind == "resumable":
            meta = json.loads(body or b"{}")
            name = meta.get("name") or query.get("name", "")
            if self._rule(Call("upload", bucket, name)):
                return
            with fake._lock:
                fake._objects(bucket)
                fake._check_create(bucket, name, query)
                upload_id = secrets.token_hex(8)
                fake._uploads[upload_id] = {
                    "bucket": bucket,
                    "name": name,
                    "meta": meta,
                    "data": bytearray(),
                    "content_type": self.headers.get("X-Upload-Content-Type", ""),
                }
            location = (
                f"{fake.endpoint}/upload/storage/v1/b/{quote(bucket)}/o?uploadType=resumable"
                f"&upload_id={upload_id}"
            )
            return self._send(200, b"", headers={"Location": location})
        raise _GCSError(400, f"unsupported uploadType {kind!r}")

    def _upload_chunk(self, bucket: str, query: dict[str, str]) -> None:
        fake = self.owner
        upload_id = query.get("upload_id", "")
        body = self._body()
        with fake._lock:
            upload = fake._uploads.get(upload_id)
        if upload is None:
            raise _GCSError(404, "No such upload session")
        if self._rule(Call("put", bucket, upload["name"])):
            return
        # Content-Range: bytes 0-262143/*  |  bytes 262144-300000/300001  |  bytes */300001
        crange = self.headers.get("Content-Range", "")
        spec = crange.removeprefix("bytes ").strip()
        span, _, total = spec.partition("/")
        data: bytearray = upload["data"]
        if span != "*":
            start = int(span.split("-")[0])
            if start != len(data):
                data[start:] = b""
            data.extend(body)
        if total != "*" and int(total) == len(data):
            meta = upload["meta"]
            with fake._lock:
                fake._uploads.pop(upload_id, None)
                ctype = meta.get("contentType") or upload["content_type"]
                obj = fake._store(bucket, upload["name"], bytes(data), ctype)
                resource = obj.resource(bucket, fake.endpoint)
            return self._json(200, resource)
        headers = {"Range": f"bytes=0-{len(data) - 1}"} if data else {}
        self._send(HTTPStatus.PERMANENT_REDIRECT, b"", "text/plain", headers)


def _split_multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON metadata and the data of a ``multipart/related`` upload body."""
    boundary = ""
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise _GCSError(400, "multipart upload without a boundary")
    sep = b"--" + boundary.encode()
    pieces = body.split(sep)
    # ['', meta part, data part, '--\r\n']
    if len(pieces) < 4:
        raise _GCSError(400, "malformed multipart upload")

    def payload(piece: bytes) -> bytes:
        head, _, rest = piece.partition(b"\r\n\r\n")
        return rest[:-2] if rest.endswith(b"\r\n") else rest

    meta = json.loads(payload(pieces[1]) or b"{}")
    return meta, payload(pieces[2])


def _check_checksums(meta: dict[str, Any], data: bytes) -> None:
    """Refuse an upload whose declared md5Hash/crc32c do not match its data, as GCS does."""
    if "md5Hash" in meta:
        got = base64.b64encode(hashlib.md5(data).digest()).decode()
        if got != meta["md5Hash"]:
            raise _GCSError(400, "Provided MD5 hash does not match calculated MD5 hash.")
    if "crc32c" in meta:
        got = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
        if got != meta["crc32c"]:
            raise _GCSError(400, "Provided CRC32C does not match calculated CRC32C.")
