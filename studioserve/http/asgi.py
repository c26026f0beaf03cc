"""The same front door as :mod:`.rsgi`, over ASGI: what Ray Serve's HTTP proxy (and any ASGI
server) calls.

:class:`AsgiApp` answers exactly as :class:`~.rsgi.RsgiApp` does: ``POST /``, ``POST
/models/<key>[/versions/<v>]`` and ``POST /v2/models/<name>[/versions/<v>]/infer`` with a valid
token and a Content-Length run through :meth:`RequestHandler.handle_async
<studioserve.serving.inference.RequestHandler.handle_async>` as coroutines on the server's
loop; everything else (the status page, probes, metrics, management routes, 401s, chunked
bodies, every request while debug logging is on) goes to the Flask WSGI app in a pool of
threads (:mod:`.bridge`). Bodies are bounded the same way: a declared length over
``--max-body`` is refused before a byte is read, a refused body is read and dropped only up to
:func:`~.responses.drop_limit`, and no more than ``--max-body + 1`` bytes of a chunked body
are kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import WireError
from ..serving.inference import InferenceRequest, Reply, RequestHandler
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
from .state import AppState

logger = logging.getLogger(__name__)

__all__ = ["AsgiApp"]

_now = time.monotonic

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class AsgiApp:
    """The ASGI 3 application of one app: inference on the loop, the rest in Flask.

    :param wsgi: the WSGI app (Flask's, behind FastPredict) for every other request.
    :param state: the app's state (the token, the two request handlers, the body limit).
    :param drain: the app's drain (``Connection: close`` on every response once it starts).
    :param threads: the threads of the WSGI pool (started with the first request or the
        lifespan's startup).
    """

    def __init__(self, wsgi: Any, state: AppState, drain: Drain, *, threads: int) -> None:
        self.wsgi = wsgi
        self.state = state
        self.drain = drain
        self.threads = max(1, threads)
        self.max_body = state.max_body
        self._executor: ThreadPoolExecutor | None = None
        self._handlers: tuple[RequestHandler, RequestHandler] = (state.pickle, state.oip)

    def close(self) -> None:
        """Join the pool's threads (once the server has stopped)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = thread_pool(self.threads, "studioserve-asgi")
        return self._executor

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":  # a websocket: nothing here speaks it
            await send({"type": "websocket.close", "code": 1003})
            return
        self.drain.last_request = _now()
        headers = _headers(scope)
        route = inference_route(scope["path"]) if scope["method"] == "POST" else None
        if (
            route is None
            or not self.state.authorized(headers.get("authorization"))
            or logger.isEnabledFor(logging.DEBUG)
        ):
            await self._wsgi(scope, headers, receive, send)
            return
        declared = headers.get("content-length")
        try:
            length = int(declared) if declared is not None else -1
        except ValueError:
            length = -1
        if length < 0:  # chunked: Flask's route reads it in bounded chunks
            await self._wsgi(scope, headers, receive, send)
            return
        oip, model, version = route
        body = _Body(receive, length)
        reply = await self._handlers[oip].handle_async(
            InferenceRequest(
                length,
                no_sync_read,
                lambda name: headers.get(name.lower()),
                model,
                version,
                aread=body.read,
            )
        )
        if not body.consumed and length:
            await body.drop(self.max_body)
        await self._respond(send, reply)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.get_running_loop().run_in_executor(None, self._pool)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _respond(self, send: Send, reply: Reply) -> None:
        headers = reply.headers
        if self.drain.draining:  # checked as the response starts: requests in flight too
            headers = with_close(headers)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})

    async def _wsgi(
        self, scope: dict[str, Any], headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        """Answer through the WSGI app, in the pool (the body read here first, bounded)."""
        method = scope["method"]
        declared = headers.get("content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            length = None
        limit = self.max_body
        if length is not None and length > limit:
            body, complete = b"", False  # Flask refuses it from the length: 413
        elif length == 0 or (length is None and method in ("GET", "HEAD")):
            body, complete = b"", True
        else:
            most = limit + drop_limit(limit)
            body, complete = await read_bounded(_chunks(receive), limit + 1, most)
        server = scope.get("server") or ("127.0.0.1", 80)
        client = scope.get("client") or ("", 0)
        environ = wsgi_environ(
            method=method,
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=_pairs(scope),
            server=(str(server[0]), str(server[1])),
            client=str(client[0]),
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
            body=body,
            chunked=length is None,
        )
        loop = asyncio.get_running_loop()
        status, out_headers, payload = await loop.run_in_executor(
            self._pool(), call_wsgi, self.wsgi, environ
        )
        if length is not None and length > limit:
            await _Body(receive, length).drop(limit)
        await self._respond(send, Reply(status, out_headers, payload))


def _pairs(scope: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers by lower-case name (a repeated header's values joined by ``,``)."""
    out: dict[str, str] = {}
    for name, value in _pairs(scope):
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


class _Body:
    """One request's body from ``receive``: read whole once, or dropped unread (bounded)."""

    __slots__ = ("consumed", "length", "receive")

    def __init__(self, receive: Receive, length: int) -> None:
        self.receive = receive
        self.length = length
        self.consumed = False

    async def read(self) -> bytes:
        """The whole body (its declared length was checked against the limit before).

        :raises WireError: when the client goes away before it is all sent, or sends more
            than it declared.
        """
        self.consumed = True
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise WireError("the request body ended early: the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.length:
                raise WireError(f"the request body is longer than its Content-Length {self.length}")
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        if size < self.length:
            raise WireError(f"the request body ended early: {size} of {self.length} bytes")
        return b"".join(parts)

    async def drop(self, max_body: int) -> None:
        """Read and forget the body if it ends within the drop limit."""
        if self.consumed:
            return
        self.consumed = True
        limit = max_body + drop_limit(max_body)
        if self.length <= limit:
            await read_bounded(_chunks(self.receive), 0, limit)


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The body's chunks as ``receive`` hands them over, to its end or the client's going."""
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away mid-body
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
