"""``studio bench URL``: throughput and latency of a prediction endpoint, per load level.

The library behind the command (``studioserve.cli`` only parses options)::

    from studioserve.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(url="http://127.0.0.1:5000", concurrency=(1, 8, 64)))
    print(result.table())
    result.write_csv("bench.csv"); result.plot("bench.png")

How it measures:

- The request body is built once: synthesised from the server's signature (``GET /`` of a
  studioserve server for the pickle protocol, ``GET /v2/models/{name}`` for the Open Inference
  Protocol, so any OIP server works with ``--model``), or read from a file. One probe request
  must succeed before any load is sent.
- Load comes from worker *processes* (so the GIL is not the limit), each running an asyncio
  event loop of raw keep-alive HTTP/1.1 connections that send the prepared request bytes.
  Closed loop (``--concurrency``): each connection sends its next request as soon as the
  previous answer arrives. Open loop (``--request-rate``): requests start on a fixed schedule
  and latency counts from the scheduled start, so a slow server cannot hide its queueing
  ("coordinated omission").
- Each level runs a warm-up (discarded), then ``--duration`` seconds or ``--requests``
  requests. Latency percentiles are over successful requests; anything but a 2xx is an error.
- The generator checks itself: each worker process reports its CPU time. A process busy more
  than :data:`BUSY_LIMIT` of the wall time could not have sent faster, so the level's figures
  may describe the generator rather than the server; the table marks such levels and says so.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import http.client
import itertools
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlsplit

import numpy as np

from .errors import ClientError, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "BUSY_LIMIT",
    "BenchConfig",
    "BenchResult",
    "LevelResult",
    "Target",
    "prepare_target",
    "run_bench",
]

#: A generator process busy more than this share of the wall time is the bottleneck.
BUSY_LIMIT: Final = 0.85
PROTOCOLS: Final = ("pickle", "oip")
_MAX_OPEN_LOOP_CONNECTIONS: Final = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure and how.

    :param url: the server's base URL (``http://host:port``); for the pickle protocol a path,
        if given, is the endpoint (default ``/``).
    :param concurrency: closed-loop levels: connections each sending back to back.
    :param request_rates: open-loop levels in requests per second (replaces ``concurrency``).
    :param duration: seconds per level (ignored when ``requests`` is given).
    :param requests: requests per level.
    :param protocol: ``"pickle"`` (``POST /``) or ``"oip"`` (``POST /v2/models/{name}/infer``).
    :param body_file: send this file's bytes as the body instead of a synthesised one.
    :param content_type: the body file's Content-Type (default: from its suffix).
    :param headers: extra request headers.
    :param batch: examples per synthesised request.
    :param binary: OIP only: send tensors with the binary data extension (else JSON).
    :param model: OIP only: the model name (default: the studioserve server's experiment).
    :param token: bearer token.
    :param warmup: seconds of discarded load before each level.
    :param processes: generator processes (default: CPU count, at most 4, at most the level).
    :param timeout: seconds a request may take before it counts as an error.
    :param seed: seed of the synthesised data.
    """

    url: str
    concurrency: tuple[int, ...] = (1, 8, 64)
    request_rates: tuple[float, ...] = ()
    duration: float = 10.0
    requests: int | None = None
    protocol: str = "pickle"
    body_file: Path | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    batch: int = 1
    binary: bool = True
    model: str | None = None
    token: str | None = None
    warmup: float = 1.0
    processes: int | None = None
    timeout: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; use pickle or oip")
        if not self.request_rates and not self.concurrency:
            raise ConfigError("give at least one concurrency level or request rate")
        if any(c < 1 for c in self.concurrency):
            raise ConfigError(f"concurrency levels must be >= 1, not {list(self.concurrency)}")
        if any(not r > 0 for r in self.request_rates):
            raise ConfigError(f"request rates must be > 0, not {list(self.request_rates)}")
        if self.requests is None and not self.duration > 0:
            raise ConfigError("--duration must be > 0 seconds (or pass --requests)")
        if self.requests is not None and self.requests < 1:
            raise ConfigError("--requests must be >= 1")
        if self.batch < 1:
            raise ConfigError("--batch must be >= 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must be >= 0 seconds")
        if self.processes is not None and self.processes < 1:
            raise ConfigError("--processes must be >= 1")

    @property
    def mode(self) -> str:
        """``"rate"`` (open loop) or ``"concurrency"`` (closed loop)."""
        return "rate" if self.request_rates else "concurrency"

    @property
    def levels(self) -> tuple[float, ...]:
        return self.request_rates if self.request_rates else tuple(map(float, self.concurrency))


# -- the target: where to send what ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A prepared endpoint: the request bytes every connection sends, and what they carry."""

    scheme: str
    host: str
    port: int
    path: str
    body: bytes
    headers: dict[str, str]
    description: str
    rows: int

    def request_bytes(self) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines += [f"Content-Length: {len(self.body)}", "Connection: keep-alive", "", ""]
        return "\r\n".join(lines).encode("latin-1") + self.body


def _split_url(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"cannot benchmark {url!r}: give an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


def _get_json(
    scheme: str, host: str, port: int, path: str, headers: dict[str, str], timeout: float
) -> tuple[int, Any]:
    conn = _connection(scheme, host, port, timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json", **headers})
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise ClientError(f"cannot reach {scheme}://{host}:{port}: {e}; is the server up?") from e
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, None


def _connection(scheme: str, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=timeout)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _error_text(status: int, doc: Any) -> str:
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    hint = " (pass --token)" if status == 401 else ""
    return f"HTTP {status}{hint}" + (f": {err}" if err else "")


def _random(shape: Sequence[int], dtype: np.dtype[Any], rng: np.random.Generator) -> Any:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    arr = np.empty(shape, dtype=object)
    arr.fill(b"studioserve")
    return arr


def _pickle_target(cfg: BenchConfig, scheme: str, host: str, port: int, path: str) -> Target:
    from . import wire

    auth = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
    status, doc = _get_json(scheme, host, port, "/", auth, cfg.timeout)
    specs: list[dict[str, Any]] = []
    if status == 200 and isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        specs = list(doc["model"].get("inputs") or [])
    elif status == 401:
        raise ClientError(f"{cfg.url} answered {_error_text(status, doc)}", status=401)
    rng = np.random.default_rng(cfg.seed)

    def make(spec: dict[str, Any]) -> Any:
        shape = [1 if d is None else int(d) for d in spec.get("shape", [])]
        full = shape if cfg.batch == 1 else [cfg.batch, *shape]
        return _random(full, np.dtype(spec.get("dtype", "float32")), rng)

    if not specs:
        value: Any = _random([16] if cfg.batch == 1 else [cfg.batch, 16], np.dtype("f4"), rng)
        what = f"float32{list(np.shape(value))} (the server declares no signature)"
    elif len(specs) == 1:
        value = make(specs[0])
        what = f"{specs[0]['name']}: {value.dtype}{list(value.shape)}"
    else:
        value = {s["name"]: make(s) for s in specs}
        what = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in value.items())
    body, content_type = wire.encode_request({"x": value}, "pickle")
    return Target(
        scheme,
        host,
        port,
        path,
        body,
        {"Content-Type": content_type, **auth},
        f"pickle POST {path}, {{'x': {what}}}",
        cfg.batch,
    )


def _oip_target(cfg: BenchConfig, scheme: str, host: str, port: int) -> Target:
    from .oip import DATATYPES, encode_infer_request

    auth = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
    name = cfg.model
    if name is None:
        status, doc = _get_json(scheme, host, port, "/", auth, cfg.timeout)
        if status == 401:
            raise ClientError(f"{cfg.url} answered {_error_text(status, doc)}", status=401)
        name = str(doc.get("experiment") or "") if isinstance(doc, dict) else ""
        if not name:
            raise ConfigError(
                f"{cfg.url} did not say which model it serves; pass --model NAME (the OIP model "
                "name, for studioserve the experiment key)"
            )
    path = f"/v2/models/{name}/infer"
    if cfg.body_file is not None:
        return _file_target(cfg, scheme, host, port, path, auth)
    status, meta = _get_json(scheme, host, port, f"/v2/models/{name}", auth, cfg.timeout)
    if status != 200 or not isinstance(meta, dict):
        raise ClientError(
            f"GET /v2/models/{name} answered {_error_text(status, meta)}; check --model and "
            "that the server speaks the Open Inference Protocol",
            status=status,
        )
    rng = np.random.default_rng(cfg.seed)
    inputs: dict[str, Any] = {}
    for t in meta.get("inputs") or []:
        dims = [int(d) for d in t.get("shape", [])]
        shape = [cfg.batch if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(dims)]
        dt = DATATYPES.get(str(t.get("datatype")))
        if dt is None:
            raise ConfigError(
                f"input {t.get('name')!r} has datatype {t.get('datatype')!r}, which studio "
                "bench cannot synthesise; pass --body FILE"
            )
        inputs[str(t["name"])] = _random(shape, dt, rng)
    if not inputs:
        inputs["x"] = _random([cfg.batch, 16], np.dtype("f4"), rng)
    body, headers = encode_infer_request(inputs, binary=cfg.binary, binary_output=cfg.binary)
    what = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in inputs.items())
    kind = "binary" if cfg.binary else "JSON"
    return Target(
        scheme,
        host,
        port,
        path,
        body,
        {**headers, **auth},
        f"OIP POST {path}, {kind} tensors {what}",
        cfg.batch,
    )


def _file_target(
    cfg: BenchConfig, scheme: str, host: str, port: int, path: str, auth: dict[str, str]
) -> Target:
    assert cfg.body_file is not None
    try:
        body = cfg.body_file.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read --body {cfg.body_file}: {e}") from e
    suffix = cfg.body_file.suffix.lower()
    content_type = cfg.content_type or {
        ".json": "application/json",
        ".npz": "application/x-npz",
    }.get(suffix, "application/json" if cfg.protocol == "oip" else "application/x-pickle")
    return Target(
        scheme,
        host,
        port,
        path,
        body,
        {"Content-Type": content_type, **auth},
        f"{cfg.protocol} POST {path}, body from {cfg.body_file} ({len(body):,} bytes)",
        cfg.batch,
    )


def prepare_target(cfg: BenchConfig) -> Target:
    """Build the request every connection will send, and check one round trip works.

    :raises ClientError: when the server cannot be reached or the probe request fails.
    :raises ConfigError: for a bad URL, body file or missing model name.
    """
    scheme, host, port, path = _split_url(cfg.url)
    if cfg.protocol == "oip":
        target = _oip_target(cfg, scheme, host, port)
    elif cfg.body_file is not None:
        auth = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
        target = _file_target(cfg, scheme, host, port, path, auth)
    else:
        target = _pickle_target(cfg, scheme, host, port, path)
    extra = dict(cfg.headers)
    if extra:
        target = dataclasses.replace(target, headers={**target.headers, **extra})
    _probe(target, cfg.timeout)
    return target


def _probe(target: Target, timeout: float) -> None:
    conn = _connection(target.scheme, target.host, target.port, timeout)
    try:
        conn.request("POST", target.path, body=target.body, headers=target.headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise ClientError(
            f"cannot reach {target.scheme}://{target.host}:{target.port}: {e}; is the server up?"
        ) from e
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        raise ClientError(
            f"the probe request ({target.description}) answered "
            f"{_error_text(resp.status, doc)}; fix the request before measuring",
            status=resp.status,
        )


# -- the generator (runs in worker processes) ------------------------------------------------


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case, with its colon) in a lower-cased head."""
    i = head.find(b"\r\n" + name)
    if i < 0:
        return None
    j = head.find(b"\r\n", i + 2)
    return head[i + 2 + len(name) : j if j >= 0 else len(head)].strip()


def _parse_response(buf: bytearray) -> tuple[int, int, bool] | None:
    """``(status, bytes used, keep-alive)`` of the complete HTTP/1.1 response at the start of
    ``buf``, or None while it is incomplete (Content-Length or chunked bodies).

    :raises ConnectionError: for a response that is not HTTP.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1.") or len(head) < 12 or not head[9:12].isdigit():
        raise ConnectionError(f"not an HTTP response: {head[:80]!r}")
    status = int(head[9:12])
    connection = _header(head, b"connection:")
    keep_alive = connection is None or b"close" not in connection
    pos = end + 4
    encoding = _header(head, b"transfer-encoding:")
    if encoding is None or b"chunked" not in encoding:
        length = int(_header(head, b"content-length:") or 0)
        return (status, pos + length, keep_alive) if len(buf) >= pos + length else None
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
        if size == 0:
            trailer = buf.find(b"\r\n\r\n", nl)
            return None if trailer < 0 else (status, trailer + 4, keep_alive)
        pos = nl + 2 + size + 2
        if pos > len(buf):
            return None


class _Http(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection on an event loop (the open loop's connections)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        try:
            parsed = _parse_response(self.buf)
        except ConnectionError as e:
            w.set_exception(e)
            return
        if parsed is not None:
            status, used, self.keep_alive = parsed
            del self.buf[:used]
            w.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(str(exc) if exc else "connection closed"))

    def send(self, request: bytes) -> asyncio.Future[int]:
        self.waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self.waiter


@dataclasses.dataclass
class _Spec:
    """What one worker process runs for one level."""

    mode: str
    connections: int
    rate: float
    start: float  # time.monotonic() (system-wide) when sending starts
    end: float | None  # time.monotonic() to stop at (duration mode)
    requests: int | None  # requests for this worker (requests mode)
    record: bool


@dataclasses.dataclass
class _Outcome:
    latencies: bytes
    statuses: dict[int, int]
    errors: dict[str, int]
    cpu: float
    wall: float


class _Worker:
    def __init__(
        self,
        target: Target,
        timeout: float,
        report: Connection,
    ) -> None:
        self.target = target
        self.request = target.request_bytes()
        self.timeout = timeout
        self.report = report
        self.ssl = ssl.create_default_context() if target.scheme == "https" else None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Http:
        _, proto = await loop.create_connection(
            lambda: _Http(loop), self.target.host, self.target.port, ssl=self.ssl
        )
        return proto

    async def _one(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Http | None,
        out: _Tally,
        started: float,
    ) -> _Http | None:
        """One request on ``conn`` (a new one if None); returns the connection to reuse."""
        try:
            if conn is None or conn.closed:
                conn = await self._connect(loop)
            fut = conn.send(self.request)
            handle = loop.call_later(self.timeout, _expire, fut)
            try:
                status = await fut
            finally:
                handle.cancel()
        except TimeoutError:
            out.error("timeout")
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            return None
        except (ConnectionError, OSError) as e:
            out.error(type(e).__name__)
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            await asyncio.sleep(0.01)
            return None
        out.done(status, time.perf_counter() - started)
        if not conn.keep_alive:
            assert conn.transport is not None
            conn.transport.close()
            return None
        return conn

    def run(self, spec: _Spec) -> _Outcome:
        """Run one phase; closed loop on threads, open loop on an event loop."""
        tallies = [_Tally(spec.record) for _ in range(max(1, spec.connections))]
        delay = spec.start - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        stop = threading.Event()
        reporter = threading.Thread(
            target=self._report, args=(tallies, stop), name="studioserve-bench-report"
        )
        if spec.record:
            reporter.start()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            if spec.mode == "concurrency":
                self._closed_loop(spec, tallies)
            else:
                asyncio.run(self._open_loop(spec, tallies[0]))
        finally:
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            stop.set()
            if reporter.is_alive():
                reporter.join()
        return _Tally.merge(tallies, cpu, wall)

    def _report(self, tallies: list[_Tally], stop: threading.Event) -> None:
        """Tell the parent how many requests finished, ten times a second (progress bar)."""
        while not stop.wait(0.1):
            self.report.send(("progress", sum(t.n for t in tallies)))

    def _socket(self) -> socket.socket:
        sock = socket.create_connection((self.target.host, self.target.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl is not None:
            return self.ssl.wrap_socket(sock, server_hostname=self.target.host)
        return sock

    def _closed_loop(self, spec: _Spec, tallies: list[_Tally]) -> None:
        """One thread per connection, each sending its next request when the answer is in.

        Blocking sockets cost the generator the least CPU per request (a fraction of what an
        event loop costs), so at low concurrency its own overhead hardly adds to latencies.
        """
        taken = itertools.count()
        quota = spec.requests
        request = self.request

        def connection(tally: _Tally) -> None:
            sock: socket.socket | None = None
            buf = bytearray()
            try:
                while spec.end is None or time.monotonic() < spec.end:
                    if quota is not None and next(taken) >= quota:
                        break
                    t0 = time.perf_counter()
                    try:
                        if sock is None:
                            sock = self._socket()
                        sock.sendall(request)
                        parsed = _parse_response(buf)
                        while parsed is None:
                            chunk = sock.recv(65536)
                            if not chunk:
                                raise ConnectionError("the server closed the connection")
                            buf += chunk
                            parsed = _parse_response(buf)
                    except OSError as e:  # timeouts and connection errors
                        tally.error("timeout" if isinstance(e, TimeoutError) else type(e).__name__)
                        if sock is not None:
                            sock.close()
                        sock = None
                        buf.clear()
                        if not isinstance(e, TimeoutError):
                            time.sleep(0.01)
                        continue
                    status, used, keep_alive = parsed
                    del buf[:used]
                    tally.done(status, time.perf_counter() - t0)
                    if not keep_alive:
                        sock.close()
                        sock = None
            finally:
                if sock is not None:
                    sock.close()

        threads = [
            threading.Thread(
                target=connection, args=(t,), name=f"studioserve-bench-{i}", daemon=True
            )
            for i, t in enumerate(tallies[: spec.connections])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    async def _open_loop(self, spec: _Spec, out: _Tally) -> None:
        """Start requests on a fixed schedule; a request without a free connection opens one
        (up to a bound), else waits for one, its wait counted in its latency."""
        loop = asyncio.get_running_loop()
        idle: list[_Http] = []
        freed: asyncio.Queue[_Http | None] = asyncio.Queue()
        opened = 0
        waiters = 0
        tasks: set[asyncio.Task[None]] = set()

        async def fire(intended: float) -> None:
            nonlocal opened, waiters
            conn: _Http | None = None
            if idle:
                conn = idle.pop()
            elif opened < _MAX_OPEN_LOOP_CONNECTIONS:
                opened += 1  # _one connects it
            else:
                waiters += 1
                conn = await freed.get()  # None: a slot to open a new connection in
            back = await self._one(loop, conn, out, intended)
            if waiters:
                waiters -= 1
                freed.put_nowait(back)
            elif back is None:
                opened -= 1
            else:
                idle.append(back)

        interval = 1.0 / spec.rate
        t0 = time.perf_counter()
        k = 0
        while (spec.requests is None or k < spec.requests) and (
            spec.end is None or time.monotonic() < spec.end
        ):
            intended = t0 + k * interval
            now = time.perf_counter()
            if intended > now:
                await asyncio.sleep(intended - now)
            task = loop.create_task(fire(intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.gather(*tasks)
        while not freed.empty():
            c = freed.get_nowait()
            if c is not None:
                idle.append(c)
        for c in idle:
            if c.transport is not None:
                c.transport.close()


def _expire(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Tally:
    def __init__(self, record: bool) -> None:
        self.record = record
        self.latencies = array("d")
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.n = 0

    def done(self, status: int, seconds: float) -> None:
        if not self.record:
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.latencies.append(seconds)
        self._count()

    def error(self, kind: str) -> None:
        if not self.record:
            return
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self._count()

    def _count(self) -> None:
        self.n += 1

    @staticmethod
    def merge(tallies: list[_Tally], cpu: float, wall: float) -> _Outcome:
        latencies = array("d")
        statuses: dict[int, int] = {}
        errors: dict[str, int] = {}
        for t in tallies:
            latencies.extend(t.latencies)
            for k, n in t.statuses.items():
                statuses[k] = statuses.get(k, 0) + n
            for e, n in t.errors.items():
                errors[e] = errors.get(e, 0) + n
        return _Outcome(latencies.tobytes(), statuses, errors, cpu, wall)


def _worker_process(rfd: int, wfd: int) -> None:
    """A generator process's main loop (started by :class:`_Pool` as ``python -c``).

    Reads ``(target, timeout)``, then one :class:`_Spec` per phase, answering each with
    ``("progress", n)`` messages and a final ``("done", outcome)``; ``None`` ends it.
    """
    rconn = Connection(rfd, writable=False)
    wconn = Connection(wfd, readable=False)
    try:
        target, timeout = rconn.recv()
        worker = _Worker(target, timeout, wconn)
        while True:
            spec = rconn.recv()
            if spec is None:
                return
            wconn.send(("done", worker.run(spec)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return


class _Pool:
    """Generator processes: fresh interpreters (``python -c``), so neither the parent's
    threads nor its ``__main__`` module come along, whatever the parent is running."""

    def __init__(self, target: Target, timeout: float, processes: int) -> None:
        import subprocess

        import studioserve

        root = str(Path(studioserve.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.send_conns: list[Connection] = []
        self.recv_conns: list[Connection] = []
        self.progress: list[int] = []
        try:
            for _ in range(processes):
                to_child_r, to_child_w = os.pipe()
                from_child_r, from_child_w = os.pipe()
                code = (
                    "from studioserve.bench import _worker_process; "
                    f"_worker_process({to_child_r}, {from_child_w})"
                )
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", code],
                        pass_fds=(to_child_r, from_child_w),
                        stdin=subprocess.DEVNULL,
                        env=env,
                    )
                finally:
                    os.close(to_child_r)
                    os.close(from_child_w)
                self.procs.append(proc)
                self.send_conns.append(Connection(to_child_w, readable=False))
                self.recv_conns.append(Connection(from_child_r, writable=False))
                self.progress.append(0)
                self.send_conns[-1].send((target, timeout))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.send_conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(5)
            except Exception:
                p.kill()
                p.wait(5)
        for c in self.send_conns + self.recv_conns:
            c.close()
        self.procs, self.send_conns, self.recv_conns = [], [], []

    def _died(self, i: int) -> ClientError:
        code = self.procs[i].poll()
        return ClientError(
            f"load generator process {i} died (exit code {code}); see its error above"
        )

    def run(
        self, specs: list[_Spec], progress: _Progress | None, label: str, total: float
    ) -> list[_Outcome]:
        from multiprocessing.connection import wait

        n = len(specs)
        for i, s in enumerate(specs):
            self.progress[i] = 0
            try:
                self.send_conns[i].send(s)
            except OSError:
                raise self._died(i) from None
        results: dict[int, _Outcome] = {}
        index = {id(c): i for i, c in enumerate(self.recv_conns[:n])}
        start = specs[0].start
        while len(results) < n:
            pending = [c for i, c in enumerate(self.recv_conns[:n]) if i not in results]
            for c in wait(pending, timeout=0.1):
                i = index[id(c)]
                try:
                    kind, value = self.recv_conns[i].recv()
                except (EOFError, OSError):
                    raise self._died(i) from None
                if kind == "done":
                    results[i] = value
                else:
                    self.progress[i] = int(value)
            if progress is not None and specs[0].record:
                done = sum(self.progress[:n])
                if specs[0].requests is not None:
                    progress.show(label, min(1.0, done / max(total, 1)), done)
                else:
                    elapsed = time.monotonic() - start
                    progress.show(label, min(1.0, max(0.0, elapsed / total)), done)
        return [results[i] for i in range(n)]


class _Progress:
    """A one-line progress bar on a terminal stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def show(self, label: str, fraction: float, done: int) -> None:
        width = 30
        filled = int(round(fraction * width))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r  {label:<18} [{bar}] {fraction * 100:5.1f}%  {done:>9,} req")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r" + " " * 78 + "\r")
        self.stream.flush()


# -- results -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LevelResult:
    """One level's figures. Latencies in milliseconds over successful requests."""

    mode: str
    level: float
    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    throughput: float
    rows_per_second: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    processes: int
    generator_busy: float
    generator_cpu_per_request_us: float | None

    @property
    def generator_bound(self) -> bool:
        """Whether a generator process was too busy for the figures to describe the server."""
        return self.generator_busy > BUSY_LIMIT

    @property
    def label(self) -> str:
        if self.mode == "rate":
            return f"{self.level:g} req/s"
        return f"c={int(self.level)}"


def _summarise(
    mode: str, level: float, outcomes: list[_Outcome], rows: int, offered_seconds: float | None
) -> LevelResult:
    lat = np.concatenate(
        [np.frombuffer(o.latencies, dtype=np.float64) for o in outcomes] or [np.empty(0)]
    )
    statuses: dict[int, int] = {}
    kinds: dict[str, int] = {}
    for o in outcomes:
        for s, n in o.statuses.items():
            statuses[s] = statuses.get(s, 0) + n
        for k, n in o.errors.items():
            kinds[k] = kinds.get(k, 0) + n
    for s, n in statuses.items():
        if not 200 <= s < 300:
            kinds[f"HTTP {s}"] = kinds.get(f"HTTP {s}", 0) + n
    ok = int(lat.size)
    errors = sum(kinds.values())
    total = ok + errors
    seconds = max((o.wall for o in outcomes), default=0.0)
    if offered_seconds is not None:
        seconds = max(seconds, 1e-9)
    busy = max((o.cpu / o.wall for o in outcomes if o.wall > 0), default=0.0)
    cpu = sum(o.cpu for o in outcomes)
    pct: list[float | None] = [None, None, None]
    if ok:
        pct = [float(v) * 1000 for v in np.percentile(lat, [50, 90, 99])]
    return LevelResult(
        mode=mode,
        level=level,
        requests=total,
        ok=ok,
        errors=errors,
        error_kinds=kinds,
        seconds=seconds,
        throughput=ok / seconds if seconds > 0 else 0.0,
        rows_per_second=ok * rows / seconds if seconds > 0 else 0.0,
        p50_ms=pct[0],
        p90_ms=pct[1],
        p99_ms=pct[2],
        max_ms=float(lat.max()) * 1000 if ok else None,
        mean_ms=float(lat.mean()) * 1000 if ok else None,
        processes=len(outcomes),
        generator_busy=busy,
        generator_cpu_per_request_us=cpu / total * 1e6 if total else None,
    )


CSV_FIELDS: Final = (
    "protocol",
    "mode",
    "level",
    "requests",
    "ok",
    "errors",
    "seconds",
    "req_per_s",
    "rows_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "processes",
    "generator_busy",
    "generator_cpu_us_per_request",
    "generator_bound",
)


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@dataclasses.dataclass
class BenchResult:
    """What :func:`run_bench` measured."""

    config: BenchConfig
    target: Target
    levels: list[LevelResult]
    cpu_count: int

    def notes(self) -> list[str]:
        """Warnings about the measurement itself."""
        out = []
        bound = [r for r in self.levels if r.generator_bound]
        if bound:
            which = ", ".join(r.label for r in bound)
            worst = max(r.generator_busy for r in bound)
            out.append(
                f"the load generator was the bottleneck at {which}: a generator process was "
                f"busy {worst:.0%} of the time (limit {BUSY_LIMIT:.0%}), so these figures may "
                "describe the generator, not the server. Pass more --processes, or run the "
                "generator on another machine."
            )
        local = self.target.host in ("127.0.0.1", "localhost", "::1")
        if local and self.levels:
            used = max(r.generator_busy * r.processes for r in self.levels)
            if used > 0.5:
                out.append(
                    f"the generator ran on the server's machine and used up to {used:.1f} of "
                    f"its {self.cpu_count} CPU cores; the server had the rest."
                )
        for r in self.levels:
            if r.errors:
                kinds = ", ".join(f"{k} x{n}" for k, n in sorted(r.error_kinds.items()))
                out.append(f"{r.label}: {r.errors} error(s): {kinds}")
        return out

    def table(self) -> str:
        """The results as a text table with a header line and notes."""
        cfg = self.config
        per = f"{cfg.requests:,} requests" if cfg.requests else f"{cfg.duration:g} s"
        head = (
            f"studio bench {cfg.url}: {self.target.description}\n"
            f"{per} per level, {cfg.warmup:g} s warm-up"
        )
        level_name = "req/s offered" if cfg.mode == "rate" else "concurrency"
        cols = [
            level_name,
            "requests",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "errors",
            "gen busy",
        ]
        if cfg.batch > 1:
            cols.insert(3, "rows/s")
        rows = []
        for r in self.levels:
            row = [
                f"{r.level:g}",
                f"{r.requests:,}",
                _f(r.throughput, 1),
                _f(r.p50_ms),
                _f(r.p90_ms),
                _f(r.p99_ms),
                f"{r.errors:,}",
                f"{r.generator_busy:.0%}" + (" !" if r.generator_bound else ""),
            ]
            if cfg.batch > 1:
                row.insert(3, _f(r.rows_per_second, 1))
            rows.append(row)
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
        lines += [f"note: {n}" for n in self.notes()]
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per level, with the :data:`CSV_FIELDS` keys."""
        out = []
        for r in self.levels:
            out.append(
                {
                    "protocol": self.config.protocol,
                    "mode": r.mode,
                    "level": r.level,
                    "requests": r.requests,
                    "ok": r.ok,
                    "errors": r.errors,
                    "seconds": round(r.seconds, 4),
                    "req_per_s": round(r.throughput, 2),
                    "rows_per_s": round(r.rows_per_second, 2),
                    "p50_ms": None if r.p50_ms is None else round(r.p50_ms, 4),
                    "p90_ms": None if r.p90_ms is None else round(r.p90_ms, 4),
                    "p99_ms": None if r.p99_ms is None else round(r.p99_ms, 4),
                    "max_ms": None if r.max_ms is None else round(r.max_ms, 4),
                    "mean_ms": None if r.mean_ms is None else round(r.mean_ms, 4),
                    "processes": r.processes,
                    "generator_busy": round(r.generator_busy, 4),
                    "generator_cpu_us_per_request": (
                        None
                        if r.generator_cpu_per_request_us is None
                        else round(r.generator_cpu_per_request_us, 2)
                    ),
                    "generator_bound": r.generator_bound,
                }
            )
        return out

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`rows` as CSV."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
            w.writeheader()
            for row in self.rows():
                w.writerow({k: "" if v is None else v for k, v in row.items()})

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw throughput and latency percentiles per level into a PNG (matplotlib, Agg).

        :raises ConfigError: when matplotlib is not installed.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ConfigError("--plot needs matplotlib: pip install 'studioserve[bench]'") from e
        labels = [f"{r.level:g}" for r in self.levels]
        x = list(range(len(labels)))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
        try:
            ax1.bar(x, [r.throughput for r in self.levels], color="#2f6fde")
            ax1.set_ylabel("requests / s")
            ax1.set_title("throughput")
            for name, color in (
                ("p50_ms", "#2f6fde"),
                ("p90_ms", "#8a5bd6"),
                ("p99_ms", "#e0673a"),
            ):
                ys = [getattr(r, name) for r in self.levels]
                ax2.plot(
                    x,
                    [float("nan") if y is None else y for y in ys],
                    marker="o",
                    color=color,
                    label=name[:3],
                )
            ax2.set_ylabel("latency (ms)")
            ax2.set_title("latency")
            ax2.legend()
            xlabel = "offered req/s" if self.config.mode == "rate" else "concurrency"
            for ax in (ax1, ax2):
                ax.set_xticks(x, labels)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
            for i, r in enumerate(self.levels):
                if r.generator_bound:
                    ax1.annotate("generator-bound", (i, r.throughput), ha="center", fontsize=8)
            fig.suptitle(f"{self.config.url} · {self.target.description}"[:110], fontsize=9)
            fig.tight_layout()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)


# -- running -----------------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _specs(
    cfg: BenchConfig, level: float, processes: int, record: bool, seconds: float | None
) -> list[_Spec]:
    start = time.monotonic() + 0.05 * processes + 0.05
    end = None if seconds is None else start + seconds
    if cfg.mode == "concurrency":
        nproc = min(processes, int(level))
        conns = _split(int(level), nproc)
    else:
        nproc = processes
        conns = [0] * nproc
    quotas: list[int | None] = [None] * nproc
    if seconds is None and cfg.requests is not None:
        quotas = list(_split(cfg.requests, nproc))
    return [
        _Spec(
            mode=cfg.mode,
            connections=conns[i],
            rate=level / nproc,
            start=start,
            end=end,
            requests=quotas[i],
            record=record,
        )
        for i in range(nproc)
        if cfg.mode == "rate" or conns[i] > 0
    ]


def default_processes(cfg: BenchConfig) -> int:
    """Generator processes: ``cfg.processes``, else the CPU count (at most 4), never more than
    the largest concurrency level."""
    n = cfg.processes or min(4, os.cpu_count() or 1)
    if cfg.mode == "concurrency":
        n = min(n, max(cfg.concurrency))
    return max(1, n)


def run_bench(cfg: BenchConfig, *, progress: IO[str] | None = None) -> BenchResult:
    """Measure ``cfg.url`` at each level of ``cfg``.

    :param cfg: what to measure.
    :param progress: a terminal stream to draw a progress bar on (None: no bar).
    :raises ClientError: when the server cannot be reached or the probe request fails.
    :raises ConfigError: for bad settings.

    Example::

        result = run_bench(BenchConfig(url="http://127.0.0.1:5000", duration=5))
        print(result.table())
    """
    target = prepare_target(cfg)
    processes = default_processes(cfg)
    bar = _Progress(progress) if progress is not None else None
    results: list[LevelResult] = []
    pool = _Pool(target, cfg.timeout, processes)
    try:
        for level in cfg.levels:
            label = f"c={int(level)}" if cfg.mode == "concurrency" else f"{level:g} req/s"
            if cfg.warmup > 0:
                warm = _specs(cfg, level, processes, False, cfg.warmup)
                pool.run(warm, bar, label + " warm-up", cfg.warmup)
            seconds = None if cfg.requests is not None else cfg.duration
            specs = _specs(cfg, level, processes, True, seconds)
            total = float(cfg.requests) if cfg.requests is not None else cfg.duration
            outcomes = pool.run(specs, bar, label, total)
            if bar is not None:
                bar.clear()
            result = _summarise(cfg.mode, level, outcomes, target.rows, seconds)
            results.append(result)
            logger.debug(
                "%s: %.1f req/s, p50 %s ms, p99 %s ms, %d errors",
                result.label,
                result.throughput,
                _f(result.p50_ms),
                _f(result.p99_ms),
                result.errors,
            )
    finally:
        pool.close()
        if bar is not None:
            bar.clear()
    return BenchResult(cfg, target, results, os.cpu_count() or 1)


def parse_levels(text: str, kind: type[int] | type[float] = int) -> tuple[Any, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``.

    :raises ValueError: for anything that is not a comma-separated list of numbers.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("give at least one level, e.g. 1,8,64")
    return tuple(kind(p) for p in parts)


def is_tty(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a progress bar is drawn only there)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


if __name__ == "__main__":  # pragma: no cover - use `studio bench`
    sys.exit("use `studio bench URL` (see studio bench --help)")
