"""The Open Inference Protocol (KServe v2) REST routes: a Flask blueprint of module-level views.

Routes (``{name}`` is the experiment key; the only version is ``"1"``)::

    GET  /v2                                        server metadata
    GET  /v2/health/live                            200 while the process serves HTTP
    GET  /v2/health/ready                           200 once the model is loaded and warm, else 503
    GET  /v2/models/{name}[/versions/1]             model metadata (names, datatypes, shapes)
    GET  /v2/models/{name}[/versions/1]/ready       200 / 503
    POST /v2/models/{name}[/versions/1]/infer       inference, JSON or binary tensors
    GET  /v2/models/{name}[/versions/1]/config      Triton's model configuration extension
    GET  /v2/models[/{name}[/versions/1]]/stats     Triton's statistics extension

Views do HTTP things and delegate: inference goes through the one request path
(:class:`~studioserve.serving.protocols.OipProtocol`, so OIP requests batch together with
pickle requests); the documents come from :mod:`studioserve.http.oip_documents`. Shapes in
metadata carry the batch dimension first (``-1``), as Triton's do for models with
``max_batch_size > 0``. Errors are ``{"error": "message"}`` on every /v2 route.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response

from ..errors import ModelNotFound, NotReady
from . import oip_documents
from .responses import answer, oip_error_response, reply_response
from .state import current_state

__all__ = ["blueprint"]

blueprint = Blueprint("oip", __name__, url_prefix="/v2")


def _reply(doc: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(doc, separators=(",", ":")), status=status, mimetype="application/json"
    )


def _error(e: ModelNotFound | NotReady) -> Response:
    return reply_response(current_state().oip_protocol.error(e))


_View = TypeVar("_View", bound=Callable[..., Response])


def _route(rule: str, method: str = "GET") -> Callable[[_View], _View]:
    """Register a view at ``rule`` and, for model routes, at its ``/versions/<version>`` form."""

    def register(view: _View) -> _View:
        blueprint.add_url_rule(rule, view.__name__, view, methods=[method])
        if "<name>" in rule:
            versioned = rule.replace("<name>", "<name>/versions/<version>", 1)
            blueprint.add_url_rule(versioned, f"{view.__name__}_v", view, methods=[method])
        return view

    return register


def _checked(name: str, version: str | None) -> Response | None:
    try:
        current_state().oip_protocol.check_model(name, version)
    except ModelNotFound as e:
        return _error(e)
    return None


@_route("")
def server_metadata() -> Response:
    return _reply(oip_documents.server_metadata())


@_route("/health/live")
def live() -> Response:
    return _reply({"live": True})


@_route("/health/ready")
def ready() -> Response:
    if not current_state().service.ready:
        return _error(current_state().service.not_ready())
    return _reply({"ready": True})


@_route("/models/stats")
def all_stats() -> Response:
    return model_stats()


@_route("/models/<name>")
def model_metadata(name: str, version: str | None = None) -> Response:
    return _checked(name, version) or _reply(oip_documents.model_metadata(current_state()))


@_route("/models/<name>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    state = current_state()
    bad = _checked(name, version)
    if bad is not None:
        return bad
    if not state.service.ready:
        return _error(current_state().service.not_ready())
    return _reply({"name": state.info.experiment, "ready": True})


@_route("/models/<name>/config")
def model_config(name: str, version: str | None = None) -> Response:
    return _checked(name, version) or _reply(oip_documents.model_config(current_state()))


@_route("/models/<name>/stats")
def model_stats(name: str | None = None, version: str | None = None) -> Response:
    state = current_state()
    if name is not None:
        bad = _checked(name, version)
        if bad is not None:
            return bad
    return _reply({"model_stats": [state.telemetry.triton.json(state.info.experiment)]})


@_route("/models/<name>/infer", "POST")
def infer(name: str, version: str | None = None) -> Response:
    state = current_state()
    return answer(state.oip, state.max_body, name, version)


def not_found(path: str) -> Response:
    """The OIP body for an unknown /v2 route (tritonclient expects its own error format)."""
    return oip_error_response(f"no such route {path!r} in the Open Inference Protocol", 404)
