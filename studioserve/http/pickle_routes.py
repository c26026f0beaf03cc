"""``POST /`` and ``POST /models/<key>[/versions/<v>]``: two thin adapters over the one request
path (:mod:`studioserve.serving.inference`), and the WSGI front door every request passes.

- :class:`FastPredict`, a WSGI middleware in front of Flask, answers those without Flask's
  per-request machinery (about half the server CPU per request; see bench/bench_server.py and
  bench/bench_wsgi.py). It passes to Flask whatever needs Flask: another route, a request that
  is not authorized (401, the sign-in page), a body without Content-Length (chunked), and
  every request while debug logging is on (Flask logs one line per request). It wraps every
  path, so it is also where a drain (:class:`Drain`) shows on the wire.
- :func:`predict` and :func:`predict_model`, the Flask views of the ``pickle`` blueprint,
  answer the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Response

from ..serving.inference import InferenceRequest
from .responses import answer, drop_unread
from .state import AppState, current_state

logger = logging.getLogger(__name__)

__all__ = ["Drain", "FastPredict", "blueprint"]

blueprint = Blueprint("pickle", __name__)

_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
_ENVIRON_KEYS = {"Content-Type": "CONTENT_TYPE", "Accept": "HTTP_ACCEPT"}
_CLOSE = ("Connection", "close")
_now = time.monotonic


def _environ_key(header: str) -> str:
    return _ENVIRON_KEYS.get(header) or "HTTP_" + header.upper().replace("-", "_")


@blueprint.post("/")
def predict() -> Response:
    state = current_state()
    return answer(state.pickle, state.max_body)


@blueprint.post("/models/<name>")
@blueprint.post("/models/<name>/versions/<version>")
def predict_model(name: str, version: str | None = None) -> Response:
    state = current_state()
    return answer(state.pickle, state.max_body, name, version)


class Drain:
    """The drain as the HTTP layer sees it (:meth:`studioserve.runtime.ModelServer.close`).

    Once :meth:`start` is called, every response leaves with ``Connection: close`` (the
    servers then close the connection after it), so keep-alive clients stop reusing their
    connections before the listener goes. :meth:`quiet_seconds` tells how long no request has
    arrived (on any route), for the grace before the HTTP server stops.
    """

    __slots__ = ("draining", "last_request")

    def __init__(self) -> None:
        self.draining = False
        self.last_request = float("-inf")

    def start(self) -> None:
        self.draining = True

    def quiet_seconds(self) -> float:
        """Seconds since the last request arrived (infinite if none ever did)."""
        return _now() - self.last_request


def _closing(start_response: Any, drain: Drain) -> Callable[..., Any]:
    """``start_response`` that adds ``Connection: close`` when the response starts in a drain."""

    def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if drain.draining:
            headers = [h for h in headers if h[0].lower() != "connection"]
            headers.append(_CLOSE)
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    return respond


class FastPredict:
    """WSGI entry that answers ``POST /`` through the request path without Flask.

    :param flask_wsgi: the Flask app's own ``wsgi_app``.
    :param state: the app's state.
    :param drain: the app's drain; every response started during it carries
        ``Connection: close``.
    """

    def __init__(self, flask_wsgi: Any, state: AppState, drain: Drain | None = None) -> None:
        self.flask_wsgi = flask_wsgi
        self.state = state
        self.handle = state.pickle.handle
        self.drain = drain if drain is not None else Drain()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        drain = self.drain
        drain.last_request = _now()
        path = environ.get("PATH_INFO")
        model = version = None
        if path != "/" and path and path.startswith("/models/"):
            model, _, rest = path[8:].partition("/")
            if rest:
                tag, _, version = rest.partition("/")
                if tag != "versions" or not version or "/" in version:
                    path = None
            if not model:
                path = None
        elif path != "/":
            path = None
        if (
            path is None
            or environ.get("REQUEST_METHOD") != "POST"
            or not self.state.authorized(environ.get("HTTP_AUTHORIZATION"))
            or logger.isEnabledFor(logging.DEBUG)
        ):
            return self.flask_wsgi(environ, _closing(start_response, drain))  # type: ignore[no-any-return]
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length < 0:
            return self.flask_wsgi(environ, _closing(start_response, drain))  # type: ignore[no-any-return]
        stream = environ["wsgi.input"]
        reply = self.handle(
            InferenceRequest(
                length,
                lambda: stream.read(length) if length else b"",
                lambda name: environ.get(_environ_key(name)),
                model,
                version or None,
            )
        )
        if reply.status >= 400 and length:
            # refused before reading (over the limit, not ready)? drop the body, so that the
            # client reads the answer, not a reset; after a read this finds the stream at its end
            drop_unread(stream, length, self.state.max_body)
        headers = reply.headers
        headers.append(("Content-Length", str(len(reply.body))))
        if drain.draining:  # checked as the response starts: requests in flight at the start too
            headers.append(_CLOSE)
        start_response(_STATUS_LINES.get(reply.status, f"{reply.status} Error"), headers)
        return [reply.body]
