"""The generator processes' side: sending the load and counting what comes back.

Load comes from worker *processes* (so the GIL is not the limit; :mod:`.pool` starts them),
each sending the prepared request bytes on raw keep-alive HTTP/1.1 connections:

- Closed loop (``--concurrency``): each connection sends its next request as soon as the
  previous answer arrives, one thread per connection on a blocking socket.
- Open loop (``--request-rate``): requests start on a fixed schedule on an asyncio event loop,
  and latency counts from the *scheduled* start, so a slow server cannot hide its queueing
  ("coordinated omission"). A request without a free connection opens one (up to
  :data:`MAX_OPEN_LOOP_CONNECTIONS`), else waits for one, its wait counted in its latency.

Latencies are kept for successful (2xx) requests only; other statuses and connection errors
are counted by kind. The generator checks itself: each phase reports the process's CPU time
beside the wall time, so the parent can tell when a process was too busy to have sent faster.

The process's main loop is :func:`studioserve.loadgen.process.worker_process` (which runs a
gRPC target's phases with :mod:`.grpc_load`'s worker instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
import ssl
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable, Mapping
from multiprocessing.connection import Connection
from typing import Any, Final, TypeVar

from .http11 import AsyncConnection, parse_response
from .target import Target

#: The most connections one process's open loop opens.
MAX_OPEN_LOOP_CONNECTIONS: Final = 1024

_K = TypeVar("_K")


@dataclasses.dataclass
class Spec:
    """What one worker process runs for one phase (a level's warm-up or measurement)."""

    mode: str
    connections: int
    rate: float
    start: float  # time.monotonic() (system-wide) when sending starts
    end: float | None  # time.monotonic() to stop at (duration mode)
    requests: int | None  # requests for this worker (requests mode)
    record: bool


@dataclasses.dataclass
class Outcome:
    """What one worker process counted in one phase; ``latencies`` is an ``array("d")``'s
    bytes (seconds), ``cpu`` and ``wall`` the process's CPU and wall time for the phase."""

    latencies: bytes
    statuses: dict[int, int]
    errors: dict[str, int]
    cpu: float
    wall: float


def merge_counts(counts: Iterable[Mapping[_K, int]]) -> dict[_K, int]:
    """The sum of several ``key -> count`` dicts."""
    out: dict[_K, int] = {}
    for c in counts:
        for k, n in c.items():
            out[k] = out.get(k, 0) + n
    return out


class Tally:
    """One connection's (or event loop's) counts; nothing is kept while ``record`` is off."""

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
    def merge(tallies: list[Tally], cpu: float, wall: float) -> Outcome:
        latencies = array("d")
        for t in tallies:
            latencies.extend(t.latencies)
        statuses = merge_counts(t.statuses for t in tallies)
        errors = merge_counts(t.errors for t in tallies)
        return Outcome(latencies.tobytes(), statuses, errors, cpu, wall)


def _expire(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _SharedConnections:
    """The open loop's connections: idle ones, and the requests waiting for one."""

    def __init__(self) -> None:
        self.idle: list[AsyncConnection] = []
        self.freed: asyncio.Queue[AsyncConnection | None] = asyncio.Queue()
        self.opened = 0
        self.waiters = 0

    async def acquire(self) -> AsyncConnection | None:
        """An idle connection, or None to open a new one in; waits while all are busy."""
        if self.idle:
            return self.idle.pop()
        if self.opened < MAX_OPEN_LOOP_CONNECTIONS:
            self.opened += 1  # the request connects it
            return None
        self.waiters += 1
        return await self.freed.get()  # None: a slot to open a new connection in

    def release(self, conn: AsyncConnection | None) -> None:
        """Hand ``conn`` (None: it was closed) to a waiting request, or keep it idle."""
        if self.waiters:
            self.waiters -= 1
            self.freed.put_nowait(conn)
        elif conn is None:
            self.opened -= 1
        else:
            self.idle.append(conn)

    def close(self) -> None:
        while not self.freed.empty():
            c = self.freed.get_nowait()
            if c is not None:
                self.idle.append(c)
        for c in self.idle:
            c.close()


class Worker:
    """Runs phases against one target; reports progress on ``report``."""

    def __init__(self, target: Target, timeout: float, report: Connection) -> None:
        self.target = target
        self.request = target.request_bytes()
        self.timeout = timeout
        self.report = report
        self.ssl = ssl.create_default_context() if target.scheme == "https" else None

    def run(self, spec: Spec) -> Outcome:
        """Run one phase; closed loop on threads, open loop on an event loop."""
        tallies = [Tally(spec.record) for _ in range(max(1, spec.connections))]
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
        return Tally.merge(tallies, cpu, wall)

    def _report(self, tallies: list[Tally], stop: threading.Event) -> None:
        """Tell the parent how many requests finished, ten times a second (progress bar)."""
        while not stop.wait(0.1):
            self.report.send(("progress", sum(t.n for t in tallies)))

    # -- closed loop ------------------------------------------------------------------------

    def _closed_loop(self, spec: Spec, tallies: list[Tally]) -> None:
        """One thread per connection, each sending its next request when the answer is in.

        Blocking sockets cost the generator the least CPU per request (a fraction of what an
        event loop costs), so at low concurrency its own overhead hardly adds to latencies.
        """
        run_per_connection(spec, tallies, self._back_to_back, "studioserve-bench")

    def _back_to_back(self, spec: Spec, tally: Tally, taken: itertools.count[int]) -> None:
        """One closed-loop connection, until the phase ends (or, in requests mode, the
        requests shared through ``taken`` run out)."""
        sock: socket.socket | None = None
        buf = bytearray()
        try:
            while spec.end is None or time.monotonic() < spec.end:
                if spec.requests is not None and next(taken) >= spec.requests:
                    break
                t0 = time.perf_counter()
                try:
                    if sock is None:
                        sock = self._socket()
                    status, used, keep_alive = self._round_trip(sock, buf)
                except OSError as e:  # timeouts and connection errors
                    tally.error("timeout" if isinstance(e, TimeoutError) else type(e).__name__)
                    if sock is not None:
                        sock.close()
                    sock = None
                    buf.clear()
                    if not isinstance(e, TimeoutError):
                        time.sleep(0.01)
                    continue
                del buf[:used]
                tally.done(status, time.perf_counter() - t0)
                if not keep_alive:
                    sock.close()
                    sock = None
        finally:
            if sock is not None:
                sock.close()

    def _socket(self) -> socket.socket:
        sock = socket.create_connection((self.target.host, self.target.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl is not None:
            return self.ssl.wrap_socket(sock, server_hostname=self.target.host)
        return sock

    def _round_trip(self, sock: socket.socket, buf: bytearray) -> tuple[int, int, bool]:
        """Send the request on ``sock`` and read into ``buf`` until a response is complete.

        :raises OSError: for timeouts, connection errors and responses that are not HTTP.
        """
        sock.sendall(self.request)
        parsed = parse_response(buf)
        while parsed is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
            parsed = parse_response(buf)
        return parsed

    # -- open loop --------------------------------------------------------------------------

    async def _open_loop(self, spec: Spec, out: Tally) -> None:
        """Start requests on a fixed schedule; a request without a free connection opens one
        (up to a bound), else waits for one, its wait counted in its latency."""
        loop = asyncio.get_running_loop()
        conns = _SharedConnections()

        async def fire(intended: float) -> None:
            conn = await conns.acquire()
            conns.release(await self._one(loop, conn, out, intended))

        await run_on_schedule(spec, fire)
        conns.close()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
        _, proto = await loop.create_connection(
            lambda: AsyncConnection(loop), self.target.host, self.target.port, ssl=self.ssl
        )
        return proto

    async def _one(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: AsyncConnection | None,
        out: Tally,
        started: float,
    ) -> AsyncConnection | None:
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
            if conn is not None:
                conn.close()
            return None
        except (ConnectionError, OSError) as e:
            out.error(type(e).__name__)
            if conn is not None:
                conn.close()
            await asyncio.sleep(0.01)
            return None
        out.done(status, time.perf_counter() - started)
        if not conn.keep_alive:
            conn.close()
            return None
        return conn


def run_per_connection(
    spec: Spec,
    tallies: list[Tally],
    back_to_back: Callable[[Spec, Tally, itertools.count[int]], None],
    name: str,
) -> None:
    """Run ``back_to_back(spec, tally, taken)`` on one thread per connection of the phase
    (``taken`` shares the requests of requests mode) and wait for them all (the closed loop
    of every protocol)."""
    taken = itertools.count()
    threads = [
        threading.Thread(
            target=back_to_back, args=(spec, t, taken), name=f"{name}-{i}", daemon=True
        )
        for i, t in enumerate(tallies[: spec.connections])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def run_on_schedule(spec: Spec, fire: Callable[[float], Coroutine[Any, Any, None]]) -> None:
    """Start ``fire(intended start)`` at ``spec.rate`` per second until ``spec.requests`` or
    ``spec.end``, then wait for every call started (the open loop of every protocol)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
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
