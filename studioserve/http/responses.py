"""Between Flask and the request path: Flask's request as an
:class:`~studioserve.serving.inference.InferenceRequest`, a
:class:`~studioserve.serving.inference.Reply` as a Flask response, and the two error bodies."""

from __future__ import annotations

import json

from flask import Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import wire
from ..errors import TooLarge
from ..serving.inference import InferenceRequest, Reply

__all__ = ["error_response", "inference_request", "oip_error_response", "reply_response"]


def inference_request(
    max_body: int, model: str | None = None, version: str | None = None
) -> InferenceRequest:
    """Flask's current request for the request path (its body read once, within ``max_body``)."""

    def read() -> bytes:
        try:
            return request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise TooLarge(max_body) from None

    return InferenceRequest(request.content_length, read, request.headers.get, model, version)


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
