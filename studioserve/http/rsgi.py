"""The asynchronous front door: granian's RSGI interface, inference as coroutines on one loop.

:class:`RsgiApp` is what granian serves (``interface="rsgi"``, :mod:`.servers`). Its loop runs
in granian's worker thread and answers the inference routes as coroutines:

- ``POST /``, ``POST /models/<key>[/versions/<v>]`` (the pickle protocol) and
  ``POST /v2/models/<name>[/versions/<v>]/infer`` (the Open Inference Protocol), with a valid
  token and a Content-Length: the body is awaited, the request runs through
  :meth:`RequestHandler.handle_async
  <studioserve.serving.inference.RequestHandler.handle_async>` (the one request path), and the
  model's items are awaited on the loop: the pipe's worker completes a whole batch's futures
  with one hand-off (:mod:`studioserve.pipelines.completion`). No thread is held per request,
  so 64 connections are 64 coroutines, not 64 threads woken one by one.

Everything else goes to the WSGI app (Flask, behind :class:`~.pickle_routes.FastPredict`) in
a pool of ``--threads`` threads, through :meth:`RsgiApp._wsgi`: the status page, probes,
metrics, the management routes, a request without the token (401, the sign-in page), a body
without a Content-Length (chunked) and every request while debug logging is on (Flask logs
each). The pool is also the loop's default executor, where a model without a pipe (a callable,
an ensemble) runs its one call per request.

Bodies are bounded as on the WSGI path (:mod:`.responses`): a declared length over
``--max-body`` is refused before a byte is read; a body refused unread is read to its end and
dropped if it ends within :func:`~.responses.drop_limit` bytes, else its connection is closed
(granian does that for a body left unread); a chunked body is read in chunks and never more
than ``--max-body + 1`` bytes of it are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import WireError
from ..serving.inference import InferenceRequest, Reply, RequestHandler
from .app import drain_of
from .pickle_routes import Drain
from .responses import drop_limit
from .servers import ServedApp
from .state import AppState, state_of

logger = logging.getLogger(__name__)

__all__ = ["RsgiApp", "served_app"]

_now = time.monotonic
_CLOSE = ("connection", "close")


def _no_sync_read() -> bytes:  # pragma: no cover - handle_async reads through aread
    raise RuntimeError("this request's body is read on the event loop")


def _route(path: str) -> tuple[bool, str | None, str | None] | None:
    """``(oip, model, version)`` for an inference route, None for any other path."""
    if path == "/":
        return False, None, None
    if path.startswith("/models/"):
        oip, rest = False, path[8:]
    elif path.startswith("/v2/models/") and path.endswith("/infer"):
        oip, rest = True, path[11:-6]
    else:
        return None
    model, _, tail = rest.partition("/")
    version = None
    if tail:
        tag, _, version = tail.partition("/")
        if tag != "versions" or not version or "/" in version:
            return None
    if not model:
        return None
    return oip, model, version


class RsgiApp:
    """The RSGI application of one server: inference on the loop, the rest in Flask.

    :param wsgi: the WSGI app (Flask's, behind FastPredict) for every other request.
    :param state: the app's state (the token, the two request handlers, the body limit).
    :param drain: the app's drain (``Connection: close`` on every response once it starts).
    :param threads: the threads of the WSGI pool and the loop's default executor.
    """

    def __init__(self, wsgi: Any, state: AppState, drain: Drain, *, threads: int) -> None:
        self.wsgi = wsgi
        self.state = state
        self.drain = drain
        self.threads = max(1, threads)
        self.max_body = state.max_body
        self._executor: ThreadPoolExecutor | None = None
        self._handlers: tuple[RequestHandler, RequestHandler] = (state.pickle, state.oip)

    # -- granian's hooks -----------------------------------------------------------------------

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._executor = _thread_pool(self.threads, "studioserve-http")
        loop.set_default_executor(self._executor)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close()

    def close(self) -> None:
        """Join the pool's threads (the HTTP server calls it once it has stopped)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":  # a websocket: nothing here speaks it
            with contextlib.suppress(Exception):
                proto.close(1003)
            return
        drain = self.drain
        drain.last_request = _now()
        headers = scope.headers
        route = _route(scope.path) if scope.method == "POST" else None
        if (
            route is None
            or not self.state.authorized(headers.get("authorization"))
            or logger.isEnabledFor(logging.DEBUG)
        ):
            await self._wsgi(scope, proto)
            return
        declared = headers.get("content-length")
        try:
            length = int(declared) if declared is not None else -1
        except ValueError:
            length = -1
        if length < 0:  # chunked: Flask's route reads it in bounded chunks
            await self._wsgi(scope, proto)
            return
        oip, model, version = route
        body = _Body(proto, length)
        reply = await self._handlers[oip].handle_async(
            InferenceRequest(length, _no_sync_read, headers.get, model, version, aread=body.read)
        )
        if not body.consumed and length:
            await body.drop(self.max_body)
        self._respond(proto, reply)

    # -- replies -------------------------------------------------------------------------------

    def _respond(self, proto: Any, reply: Reply) -> None:
        headers = reply.headers
        if self.drain.draining:  # checked as the response starts: requests in flight too
            headers = [h for h in headers if h[0].lower() != "connection"]
            headers.append(_CLOSE)
        proto.response_bytes(reply.status, headers, reply.body)

    async def _wsgi(self, scope: Any, proto: Any) -> None:
        """Answer through the WSGI app, in the pool (the body read here first, bounded)."""
        headers = scope.headers
        declared = headers.get("content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            length = None
        limit = self.max_body
        if length is not None and length > limit:
            body, complete = b"", False  # Flask refuses it from the length: 413
        elif length == 0 or (length is None and scope.method in ("GET", "HEAD")):
            body, complete = b"", True
        else:
            body, complete = await _read_bounded(proto, limit + 1, limit + drop_limit(limit))
        environ = _environ(scope, body, chunked=length is None)
        loop = asyncio.get_running_loop()
        status, out_headers, payload = await loop.run_in_executor(
            self._executor, _call_wsgi, self.wsgi, environ
        )
        if length is not None and length > limit:
            await _Body(proto, length).drop(limit)
        self._respond(proto, Reply(status, out_headers, payload))


def _thread_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool with all of its threads started (up before the first request, like the model's
    workers; a pool that grew under load would start threads then)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    barrier = threading.Barrier(threads)
    # each task waits for all the others, so every submit finds no idle thread and starts one
    for f in [pool.submit(barrier.wait, 10.0) for _ in range(threads)]:
        f.result()
    return pool


class _Body:
    """One request's body on the loop: read whole once, or dropped unread (bounded)."""

    __slots__ = ("consumed", "length", "proto")

    def __init__(self, proto: Any, length: int) -> None:
        self.proto = proto
        self.length = length
        self.consumed = False

    async def read(self) -> bytes:
        """The whole body (its length was checked against the limit before).

        :raises WireError: when the client goes away before it is all sent.
        """
        self.consumed = True
        try:
            data: bytes = await self.proto()
        except Exception as e:  # the connection closed mid-body
            raise WireError(f"the request body ended early: {type(e).__name__}: {e}") from None
        return data

    async def drop(self, max_body: int) -> None:
        """Read and forget the body if it ends within the drop limit; else leave it (granian
        closes the connection of a body left unread)."""
        if self.consumed:
            return
        self.consumed = True
        limit = max_body + drop_limit(max_body)
        if self.length <= limit:
            await _read_bounded(self.proto, 0, limit)


async def _read_bounded(proto: Any, keep: int, most: int) -> tuple[bytes, bool]:
    """The body's first ``keep`` bytes, the rest read and dropped up to ``most`` bytes in all:
    ``(bytes kept, whether the body ended within`` ``most``)."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in proto:
            if size < keep:
                parts.append(chunk[: keep - size])
            size += len(chunk)
            if size > most:
                return b"".join(parts), False
    except Exception:  # the client went away mid-body: what arrived is all there is
        pass
    return b"".join(parts), True


def _environ(scope: Any, body: bytes, *, chunked: bool) -> dict[str, Any]:
    """The PEP 3333 environ of an RSGI request (its body already read)."""
    host, _, port = scope.server.rpartition(":")
    client = scope.client.rpartition(":")[0] or scope.client
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": scope.path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.query_string,
        "SERVER_NAME": host,
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
        "REMOTE_ADDR": client,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in scope.headers.items():
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if chunked:  # the stream ends where the body ends (read_unsized reads it in chunks)
        environ["wsgi.input_terminated"] = True
    return environ


def _call_wsgi(
    app: Callable[..., Any], environ: dict[str, Any]
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Run the WSGI app on this (pool) thread: ``(status, headers, body)``."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None

    result = app(environ, start_response)
    try:
        payload = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return int(status.split(" ", 1)[0]), list(headers), payload


def served_app(app: Any, threads: int) -> ServedApp:
    """The Flask ``app`` in both interfaces: itself for WSGI, an :class:`RsgiApp` over it."""
    return ServedApp(app, RsgiApp(app, state_of(app), drain_of(app), threads=threads))
