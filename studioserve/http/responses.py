"""Between Flask and the request path: Flask's request as an
:class:`~studioserve.serving.inference.InferenceRequest`, a
:class:`~studioserve.serving.inference.Reply` as a Flask response, and the two error bodies.

**Bodies and --max-body.** A body with a Content-Length is read whole (the request path refuses
one over the limit before reading a byte). A body without one (``Transfer-Encoding: chunked``)
is read here in chunks of at most :data:`READ_CHUNK` bytes until the end of the stream, and
:class:`~studioserve.errors.TooLarge` is raised at the first byte over the limit; the part
read is never decoded (werkzeug's own limit on such a stream returns the first ``max_body``
bytes as if they were the body, which the decoders then reported as truncated: 400, not 413).

**Dropping the rest.** A client that sends its whole body before it reads (http.client,
requests, most others) sees a reset connection instead of the answer if the server closes it
with the body unread (granian does, for a body larger than it buffered). So a body refused
before or while being read (413, 503, 404) is read to its end and dropped (never kept, never
decoded) if it ends within :func:`drop_limit` bytes past ``--max-body``; a larger one has its
connection closed unread.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import wire
from ..errors import TooLarge, WireError
from ..serving.inference import InferenceRequest, Reply, RequestHandler

__all__ = [
    "READ_CHUNK",
    "answer",
    "drop_limit",
    "drop_unread",
    "error_response",
    "oip_error_response",
    "read_unsized",
    "reply_response",
]

#: the most bytes one read of a body asks for
READ_CHUNK = 64 * 1024


def drop_limit(max_body: int) -> int:
    """How many bytes past ``max_body`` a refused body may have and still be read to its end
    and dropped (``max_body``, at least 1 MiB); past that its connection is closed unread."""
    return max(max_body, 1024 * 1024)


def _drop(stream: Any, limit: int) -> None:
    """Read and forget up to ``limit`` bytes of ``stream`` (stops early at its end)."""
    left = limit
    try:
        while left > 0:
            chunk = stream.read(min(READ_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
    except (OSError, ValueError):  # the client went away: nothing left to answer
        return


def drop_unread(stream: Any, length: int, max_body: int) -> None:
    """Drop the unread body of a declared ``length`` unless it is too large (:func:`drop_limit`),
    so that the client gets to read the answer to a request refused before its body was read."""
    if 0 < length <= max_body + drop_limit(max_body):
        _drop(stream, length)


def read_unsized(stream: Any, max_body: int) -> bytes:
    """Read a body without a declared length: ``stream`` to its end, in bounded chunks.

    :raises TooLarge: once more than ``max_body`` bytes arrived (never more than
        ``max_body + 1`` of them are kept; up to :func:`drop_limit` more are read and dropped).
    :raises WireError: when the stream fails mid-body (the client went away).
    """
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = stream.read(min(READ_CHUNK, max_body + 1 - size))
        except (OSError, ValueError) as e:
            raise WireError(f"the request body ended early: {type(e).__name__}: {e}") from None
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > max_body:
            parts.clear()
            _drop(stream, drop_limit(max_body))
            raise TooLarge(max_body)
        parts.append(chunk)


def answer(
    handler: RequestHandler, max_body: int, model: str | None = None, version: str | None = None
) -> Response:
    """Answer Flask's current request through ``handler`` (the request path of one protocol).

    :param max_body: the body limit (``--max-body``).
    :param model: the model the URL names (OIP).
    :param version: the model version the URL names (OIP).
    """
    environ = request.environ
    length = request.content_length
    read_called = False

    def read() -> bytes:
        nonlocal read_called
        read_called = True
        if length is None and environ.get("wsgi.input_terminated"):
            # chunked: the server ends the stream; werkzeug would cut it at the limit
            return read_unsized(environ["wsgi.input"], max_body)
        try:
            return request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise TooLarge(max_body) from None

    reply = handler.handle(InferenceRequest(length, read, request.headers.get, model, version))
    if not read_called and length:  # refused before reading (over the limit, not ready, 404)
        drop_unread(environ["wsgi.input"], length, max_body)
    return reply_response(reply)


def error_response(
    status: int,
    error_type: str,
    message: str,
    keys: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """studioserve's JSON error body, ``{"error": {"type", "message", "keys"}}``."""
    resp = Response(
        wire.error_body(error_type, message, keys), status=status, mimetype="application/json"
    )
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def oip_error_response(message: str, status: int) -> Response:
    """The Open Inference Protocol's error body, ``{"error": "message"}``."""
    return Response(
        json.dumps({"error": message}, separators=(",", ":")),
        status=status,
        mimetype="application/json",
    )


def reply_response(reply: Reply) -> Response:
    return Response(reply.body, status=reply.status, headers=reply.headers)
