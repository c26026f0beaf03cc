"""The Flask app factory: routes, auth, body limits and error mapping.

Routes (DESIGN.md section 5): ``POST /`` (inference), ``GET /healthz``, ``GET /readyz``,
``GET /`` (a status page for people, JSON for programs). Errors are always JSON:
``{"error": {"type": ..., "message": ..., "keys": {...}}}``.
"""

from __future__ import annotations

import hmac
import importlib
import logging
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import wire
from .errors import RequestFailed, StudioServeError
from .service import ModelService

logger = logging.getLogger(__name__)

#: Routes that never need the token (probes must work without secrets).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


def error_response(
    status: int,
    error_type: str,
    message: str,
    keys: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    resp = Response(
        wire.error_body(error_type, message, keys),
        status=status,
        mimetype="application/json",
    )
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


class AppState:
    """What every route needs; stored in ``app.extensions["studioserve"]``.

    :param service: the model service.
    :param token: the bearer token, or None when auth is off.
    :param info: extra facts for the status page (URL, batching settings, ...).
    """

    def __init__(
        self, service: ModelService, token: str | None, info: dict[str, Any] | None = None
    ) -> None:
        self.service = service
        self.token = token
        self.info = dict(info or {})
        self.started = time.time()
        #: called with (route, status, seconds) after each inference request
        self.observers: list[Callable[[str, int, float], None]] = []
        self.shutdown_at: Callable[[], float | None] = lambda: None

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    def observe(self, route: str, status: int, seconds: float) -> None:
        for fn in self.observers:
            try:
                fn(route, status, seconds)
            except Exception:  # an observer must never break a request
                logger.exception("request observer failed")


def state_of(app: Flask) -> AppState:
    state: AppState = app.extensions["studioserve"]
    return state


def create_app(
    service: ModelService,
    *,
    token: str | None = None,
    max_body: int = 64 * 1024 * 1024,
    info: dict[str, Any] | None = None,
) -> Flask:
    """Build the Flask app serving ``service``.

    :param service: the model service (its ``ready`` flag drives ``/readyz``).
    :param token: the bearer token required on every route but the probes; None: no auth.
    :param max_body: the largest request body in bytes; larger bodies get 413.
    :param info: extra facts shown on the status page.
    """
    app = Flask("studioserve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    state = AppState(service, token, info)
    app.extensions["studioserve"] = state

    @app.before_request
    def _auth() -> Response | None:
        if request.path in PUBLIC_PATHS or state.authorized(request.headers.get("Authorization")):
            return None
        if request.path == "/" and request.method in ("GET", "HEAD"):
            from .status import render_sign_in, wants_html

            if wants_html(request.accept_mimetypes):
                # a browser cannot send the bearer header on navigation: give it a sign-in
                # page (no facts about the model) whose script does, still with status 401
                return render_sign_in()
        return error_response(
            401,
            "unauthorized",
            "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
            "(the token was printed when the server started)",
            headers={"WWW-Authenticate": 'Bearer realm="studioserve"'},
        )

    @app.after_request
    def _log(resp: Response) -> Response:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s %d %s", request.method, request.path, resp.status_code, request.remote_addr
            )
        return resp

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status": "alive"}', mimetype="application/json")

    @app.get("/readyz")
    def readyz() -> Response:
        if service.ready:
            return Response('{"status": "ready"}', mimetype="application/json")
        return error_response(
            503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"}
        )

    @app.post("/")
    def predict() -> Response:
        start = time.perf_counter()
        resp = _predict(state, max_body)
        state.observe("/", resp.status_code, time.perf_counter() - start)
        return resp

    @app.get("/")
    def status() -> Response:
        from .status import render_status

        return render_status(state, request.accept_mimetypes)

    for register in _extensions():
        register(app, state)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        if status == 413:
            return error_response(
                413,
                "too_large",
                f"request body is larger than the limit of {max_body} bytes; send fewer "
                "examples per request or start the server with a larger --max-body",
            )
        return error_response(status, e.name.lower().replace(" ", "_"), e.description or e.name)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal", f"internal server error: {type(e).__name__}")

    app.wsgi_app = _FastPredict(app.wsgi_app, state, max_body)  # type: ignore[method-assign]
    return app


def _extensions() -> list[Callable[[Flask, AppState], None]]:
    """Optional route groups (Open Inference Protocol, Prometheus metrics), when installed."""
    found: list[Callable[[Flask, AppState], None]] = []
    for module in ("studioserve.oip", "studioserve.metrics"):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name and not e.name.startswith("studioserve"):
                logger.debug("%s is off: %s", module, e)
                continue
            if e.name == module:
                continue
            raise
        found.append(mod.register)
    return found


def _predict(state: AppState, max_body: int) -> Response:
    service = state.service
    if not service.ready:
        return error_response(
            503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"}
        )
    length = request.content_length
    if length is not None and length > max_body:
        return error_response(
            413,
            "too_large",
            f"request body of {length} bytes is larger than the limit of {max_body} bytes; "
            "send fewer examples per request or start the server with a larger --max-body",
        )
    body = request.get_data(cache=False)
    status, headers, payload = _answer(
        service, body, request.headers.get("Content-Type"), request.headers.get("Accept")
    )
    return Response(payload, status=status, headers=headers)


def _answer(
    service: ModelService, body: bytes, content_type: str | None, accept: str | None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Decode, predict, encode: ``(status, headers, body)`` of the answer to ``POST /``."""

    def error(
        e: StudioServeError, keys: dict[str, str] | None = None, retry_after: float = 0.0
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [("Content-Type", "application/json")]
        if retry_after:
            headers.append(("Retry-After", f"{max(1, round(retry_after))}"))
        return e.http_status, headers, wire.error_body(e.error_type, str(e), keys)

    try:
        data, fmt = wire.decode_request(body, content_type)
    except StudioServeError as e:
        return error(e)
    service.activity.begin()
    try:
        result = service.predict(data)
        payload, out_type = wire.encode_response(result, wire.response_format(accept, fmt))
    except RequestFailed as e:
        return error(e, e.keys, e.retry_after or 0.0)
    except StudioServeError as e:
        return error(e)
    finally:
        service.activity.end()
    return 200, [("Content-Type", out_type)], payload


_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


class _FastPredict:
    """WSGI entry that answers ``POST /`` without Flask's per-request machinery.

    Everything else, and every ``POST /`` this does not answer itself (no or wrong token, model
    not ready, no Content-Length, a body over the limit, debug logging on), goes to Flask,
    which gives the same answers as before. Measured with bench/bench_server.py and
    bench/bench_wsgi.py on 2 cores: about half the server CPU per request, 1.8-2x the
    requests/s at 64 connections and 0.3 ms less p50 at 1 connection for a small model.

    :param flask_wsgi: the Flask app's own ``wsgi_app``.
    """

    def __init__(self, flask_wsgi: Any, state: AppState, max_body: int) -> None:
        self.flask_wsgi = flask_wsgi
        self.state = state
        self.max_body = max_body

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        state = self.state
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or environ.get("PATH_INFO") != "/"
            or not state.service.ready
            or not state.authorized(environ.get("HTTP_AUTHORIZATION"))
            or logger.isEnabledFor(logging.DEBUG)
        ):
            return self.flask_wsgi(environ, start_response)  # type: ignore[no-any-return]
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length < 0 or length > self.max_body:
            return self.flask_wsgi(environ, start_response)  # type: ignore[no-any-return]
        start = time.perf_counter()
        try:
            body = environ["wsgi.input"].read(length) if length else b""
            status, headers, payload = _answer(
                state.service, body, environ.get("CONTENT_TYPE"), environ.get("HTTP_ACCEPT")
            )
        except Exception as e:
            logger.exception("unexpected error on POST /")
            status, headers = 500, [("Content-Type", "application/json")]
            payload = wire.error_body("internal", f"internal server error: {type(e).__name__}")
        headers.append(("Content-Length", str(len(payload))))
        start_response(_STATUS_LINES.get(status, f"{status} Error"), headers)
        state.observe("/", status, time.perf_counter() - start)
        return [payload]
