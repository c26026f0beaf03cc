"""``POST /``: two thin adapters over the one request path (:mod:`studioserve.serving.inference`).

- :class:`FastPredict`, a WSGI middleware in front of Flask, answers ``POST /`` without Flask's
  per-request machinery (about half the server CPU per request; see bench/bench_server.py and
  bench/bench_wsgi.py). It passes to Flask whatever needs Flask: another route, a request that
  is not authorized (401, the sign-in page), a body without Content-Length (chunked), and
  every request while debug logging is on (Flask logs one line per request).
- :func:`predict`, the Flask view of the ``pickle`` blueprint, answers the rest of ``POST /``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import TooLarge
from ..serving.inference import InferenceRequest
from .responses import reply_response
from .state import AppState, current_state

logger = logging.getLogger(__name__)

__all__ = ["FastPredict", "blueprint"]

blueprint = Blueprint("pickle", __name__)

_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
_ENVIRON_KEYS = {"Content-Type": "CONTENT_TYPE", "Accept": "HTTP_ACCEPT"}


def _environ_key(header: str) -> str:
    return _ENVIRON_KEYS.get(header) or "HTTP_" + header.upper().replace("-", "_")


@blueprint.post("/")
def predict() -> Response:
    state = current_state()

    def read() -> bytes:
        try:
            return request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise TooLarge(state.max_body) from None

    return reply_response(
        state.pickle.handle(InferenceRequest(request.content_length, read, request.headers.get))
    )


class FastPredict:
    """WSGI entry that answers ``POST /`` through the request path without Flask.

    :param flask_wsgi: the Flask app's own ``wsgi_app``.
    :param state: the app's state.
    """

    def __init__(self, flask_wsgi: Any, state: AppState) -> None:
        self.flask_wsgi = flask_wsgi
        self.state = state
        self.handle = state.pickle.handle

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or environ.get("PATH_INFO") != "/"
            or not self.state.authorized(environ.get("HTTP_AUTHORIZATION"))
            or logger.isEnabledFor(logging.DEBUG)
        ):
            return self.flask_wsgi(environ, start_response)  # type: ignore[no-any-return]
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length < 0:
            return self.flask_wsgi(environ, start_response)  # type: ignore[no-any-return]
        stream = environ["wsgi.input"]
        reply = self.handle(
            InferenceRequest(
                length,
                lambda: stream.read(length) if length else b"",
                lambda name: environ.get(_environ_key(name)),
            )
        )
        headers = reply.headers
        headers.append(("Content-Length", str(len(reply.body))))
        start_response(_STATUS_LINES.get(reply.status, f"{reply.status} Error"), headers)
        return [reply.body]
