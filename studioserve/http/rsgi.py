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
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import WireError
from ..serving.inference import InferenceRequest, Reply, RequestHandler
from .app import drain_of
from .bridge import (
    call_wsgi,
    inference_route,
    no_sync_read,
    read_bounded,
    thread_pool,
    with_close,
    wsgi_environ,
)
from .pickle_routes import Drain
from .responses import drop_limit
from .servers import ServedApp
from .state import AppState, state_of

logger = logging.getLogger(__name__)

__all__ = ["RsgiApp", "served_app"]

_now = time.monotonic


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
        self._executor = thread_pool(self.threads, "studioserve-http")
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
        route = inference_route(scope.path) if scope.method == "POST" else None
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
            InferenceRequest(length, no_sync_read, headers.get, model, version, aread=body.read)
        )
        if not body.consumed and length:
            await body.drop(self.max_body)
        self._respond(proto, reply)

    # -- replies -------------------------------------------------------------------------------

    def _respond(self, proto: Any, reply: Reply) -> None:
        headers = reply.headers
        if self.drain.draining:  # checked as the response starts: requests in flight too
            headers = with_close(headers)
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
            body, complete = await read_bounded(proto, limit + 1, limit + drop_limit(limit))
        host, _, port = scope.server.rpartition(":")
        environ = wsgi_environ(
            method=scope.method,
            path=scope.path,
            query=scope.query_string,
            headers=scope.headers.items(),
            server=(host, port),
            client=scope.client.rpartition(":")[0] or scope.client,
            scheme=scope.scheme,
            http_version=scope.http_version,
            body=body,
            chunked=length is None,
        )
        loop = asyncio.get_running_loop()
        status, out_headers, payload = await loop.run_in_executor(
            self._executor, call_wsgi, self.wsgi, environ
        )
        if length is not None and length > limit:
            await _Body(proto, length).drop(limit)
        self._respond(proto, Reply(status, out_headers, payload))


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
            await read_bounded(self.proto, 0, limit)


def served_app(app: Any, threads: int) -> ServedApp:
    """The Flask ``app`` in both interfaces: itself for WSGI, an :class:`RsgiApp` over it."""
    return ServedApp(app, RsgiApp(app, state_of(app), drain_of(app), threads=threads))
