"""Flask responses for the two error bodies, and a :class:`~studioserve.serving.inference.Reply`
as a Flask response."""

from __future__ import annotations

import json

from flask import Response

from .. import wire
from ..serving.inference import Reply

__all__ = ["error_response", "oip_error_response", "reply_response"]


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
