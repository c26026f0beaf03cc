"""The Flask app factory: auth, the probe/status/metrics routes, the blueprints, error mapping.

Routes (DESIGN.md section 5): ``POST /`` (inference, :mod:`.pickle_routes`), the Open Inference
Protocol under ``/v2`` (:mod:`.oip_routes`), ``GET /healthz``, ``GET /readyz``,
``GET /metrics`` (Prometheus, when installed) and ``GET /`` (a status page for people, JSON for
programs, :mod:`.status`). Errors are JSON: ``{"error": {"type", "message", "keys"}}``, and
``{"error": "message"}`` on every /v2 route.

During a drain (:func:`drain_of`, started by :meth:`studioserve.runtime.ModelServer.close`)
every response, on every route, carries ``Connection: close``.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..config import DEFAULT_MAX_BODY, DEFAULT_MAX_KEYS
from ..errors import TooLarge
from ..serving.service import ModelService
from . import oip_routes, pickle_routes
from .responses import error_response, oip_error_response, reply_response
from .state import AppState, ServerInfo, attach_state, current_state
from .status import render_sign_in, render_status, wants_html

logger = logging.getLogger(__name__)

__all__ = ["PUBLIC_PATHS", "create_app", "drain_of"]

_DRAIN = "studioserve.drain"

#: Routes that never need the token (probes must work without secrets).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})

_UNAUTHORIZED = (
    "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
    "(the token was printed when the server started)"
)


def create_app(
    service: ModelService,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    info: ServerInfo | None = None,
    max_queue_time: float | None = None,
    max_in_flight: int | None = None,
    max_keys: int = DEFAULT_MAX_KEYS,
) -> Flask:
    """Build the Flask app serving ``service``.

    :param service: the model service (its ``ready`` flag drives ``/readyz``).
    :param token: the bearer token required on every route but the probes; None: no auth.
    :param max_body: the largest request body in bytes; larger bodies get 413.
    :param info: facts shown on the status page and in OIP metadata.
    :param max_queue_time: seconds of queued work ahead of a request above which it is refused
        with 503 at once (None: a quarter of the request timeout, at most 1 s).
    :param max_in_flight: the most concurrent inference requests (None: no cap but the pipe's).
    :param max_keys: the most keys one request body may carry; more get 413.
    """
    app = Flask("studioserve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    state = AppState(
        service,
        token,
        info or ServerInfo(),
        max_body=max_body,
        max_queue_time=max_queue_time,
        max_in_flight=max_in_flight,
        max_keys=max_keys,
    )
    attach_state(app, state)
    app.before_request(_auth)
    app.after_request(_log)
    app.add_url_rule("/healthz", "healthz", _healthz, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", _readyz, methods=["GET"])
    app.add_url_rule("/", "status", _status, methods=["GET"])
    if state.telemetry.prometheus is not None:
        app.add_url_rule("/metrics", "metrics", _metrics, methods=["GET"])
    app.register_blueprint(pickle_routes.blueprint)
    app.register_blueprint(oip_routes.blueprint)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    drain = pickle_routes.Drain()
    app.extensions[_DRAIN] = drain
    app.wsgi_app = pickle_routes.FastPredict(app.wsgi_app, state, drain)  # type: ignore[method-assign]
    return app


def drain_of(app: Flask) -> pickle_routes.Drain:
    """The app's :class:`~studioserve.http.pickle_routes.Drain` (start it to drain)."""
    drain: pickle_routes.Drain = app.extensions[_DRAIN]
    return drain


def _auth() -> Response | None:
    state = current_state()
    if request.path in PUBLIC_PATHS or state.authorized(request.headers.get("Authorization")):
        return None
    if (
        request.path == "/"
        and request.method in ("GET", "HEAD")
        and wants_html(request.accept_mimetypes)
    ):
        # a browser cannot send the bearer header on navigation: give it a sign-in page (no
        # facts about the model) whose script does, still with status 401
        return render_sign_in()
    return error_response(
        401,
        "unauthorized",
        _UNAUTHORIZED,
        headers={"WWW-Authenticate": 'Bearer realm="studioserve"'},
    )


def _log(resp: Response) -> Response:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s %s %d %s", request.method, request.path, resp.status_code, request.remote_addr
        )
    return resp


def _healthz() -> Response:
    return Response('{"status": "alive"}', mimetype="application/json")


def _readyz() -> Response:
    state = current_state()
    if state.service.ready:
        return Response('{"status": "ready"}', mimetype="application/json")
    return reply_response(state.pickle.protocol.error(state.service.not_ready()))


def _status() -> Response:
    return render_status(current_state(), request.accept_mimetypes)


def _metrics() -> Response:
    prometheus = current_state().telemetry.prometheus
    assert prometheus is not None  # the route exists only with prometheus-client
    body, content_type = prometheus.exposition()
    return Response(body, status=200, content_type=content_type)


def _http_error(e: HTTPException) -> Response:
    status = e.code or 500
    if request.path.startswith("/v2"):
        if status == 404:
            return oip_routes.not_found(request.path)
        return oip_error_response(e.description or e.name, status)
    if status == 413:
        return reply_response(
            current_state().pickle.protocol.error(TooLarge(current_state().max_body))
        )
    return error_response(status, e.name.lower().replace(" ", "_"), e.description or e.name)


def _unexpected(e: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.path)
    message = f"internal server error: {type(e).__name__}"
    if request.path.startswith("/v2"):
        return oip_error_response(message, 500)
    return error_response(500, "internal", message)
