"""What the asynchronous front doors share: which paths are inference, and the WSGI bridge.

:class:`~.rsgi.RsgiApp` (granian's RSGI) and :class:`~.asgi.AsgiApp` (ASGI: Ray Serve's
HTTP proxy, any ASGI server) answer the inference routes as coroutines and hand every other
request to the Flask WSGI app in a pool of threads. This module is the part of that which
does not depend on the interface: :func:`inference_route` (the routes that run on the loop),
:func:`thread_pool` (the pool, all of its threads started), :func:`wsgi_environ` (the PEP 3333
environ of a request whose body was read) and :func:`call_wsgi` (one WSGI call on a pool
thread).
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import AsyncIterable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "call_wsgi",
    "inference_route",
    "no_sync_read",
    "read_bounded",
    "thread_pool",
    "with_close",
    "wsgi_environ",
]


def no_sync_read() -> bytes:  # pragma: no cover - handle_async reads through aread
    raise RuntimeError("this request's body is read on the event loop")


def inference_route(path: str) -> tuple[bool, str | None, str | None] | None:
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


def thread_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool with all of its threads started (up before the first request, like the model's
    workers; a pool that grew under load would start threads then)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    barrier = threading.Barrier(threads)
    # each task waits for all the others, so every submit finds no idle thread and starts one
    for f in [pool.submit(barrier.wait, 10.0) for _ in range(threads)]:
        f.result()
    return pool


def wsgi_environ(
    *,
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    server: tuple[str, str],
    client: str,
    scheme: str,
    http_version: str,
    body: bytes,
    chunked: bool,
) -> dict[str, Any]:
    """The PEP 3333 environ of a request whose body was read already.

    :param headers: ``(lower-case name, value)`` pairs; repeated names are joined with ``,``.
    :param server: ``(host, port)`` the request came in on.
    :param chunked: the body had no Content-Length (the stream ends where the body ends).
    """
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": server[0],
        "SERVER_PORT": server[1],
        "SERVER_PROTOCOL": f"HTTP/{http_version}",
        "REMOTE_ADDR": client,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers:
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if chunked:  # read_unsized reads it in chunks to its end
        environ["wsgi.input_terminated"] = True
    return environ


def call_wsgi(
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


def with_close(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with ``Connection: close`` instead of any Connection header (a drain)."""
    out = [h for h in headers if h[0].lower() != "connection"]
    out.append(("connection", "close"))
    return out


async def read_bounded(chunks: AsyncIterable[bytes], keep: int, most: int) -> tuple[bytes, bool]:
    """A body's first ``keep`` bytes, the rest read and dropped up to ``most`` bytes in all:
    ``(bytes kept, whether the body ended within`` ``most``). A client that goes away mid-body
    ends it: what arrived is all there is."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            if size < keep:
                parts.append(chunk[: keep - size])
            size += len(chunk)
            if size > most:
                return b"".join(parts), False
    except Exception:
        pass
    return b"".join(parts), True
