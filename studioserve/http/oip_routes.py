"""The Open Inference Protocol (KServe v2) REST routes: a Flask blueprint of module-level views.

Routes (``{name}`` is a served experiment key, ``{v}`` one of its served versions; without a
version, the newest served version answers)::

    GET  /v2                                        server metadata
    GET  /v2/health/live                            200 while the process serves HTTP
    GET  /v2/health/ready                           200 once the model is loaded and warm, else 503
    GET  /v2/models/{name}[/versions/{v}]             model metadata (names, datatypes, shapes)
    GET  /v2/models/{name}[/versions/{v}]/ready       200 / 503
    POST /v2/models/{name}[/versions/{v}]/infer       inference, JSON or binary tensors
    GET  /v2/models/{name}[/versions/{v}]/config      Triton's model configuration extension
    GET  /v2/models[/{name}[/versions/{v}]]/stats     Triton's statistics extension
    POST /v2/repository/index                       Triton's model repository extension:
    POST /v2/repository/models/{name}/load          every model and its state; load (or
    POST /v2/repository/models/{name}/unload        reload) and unload one from the store

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

from flask import Blueprint, Response, request

from ..errors import ModelNotFound, NotReady, StudioServeError
from ..serving.repository import ServedModel, ServedVersion
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


def _resolved(name: str, version: str | None) -> tuple[ServedModel, ServedVersion] | Response:
    """The entry and version a model route names, or the OIP error response for them."""
    repository = current_state().service.repository
    try:
        return repository.get(name), repository.resolve(name, version)
    except ModelNotFound as e:
        return _error(e)


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
    found = _resolved(name, version)
    if isinstance(found, Response):
        return found
    return _reply(oip_documents.model_metadata(*found))


@_route("/models/<name>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    state = current_state()
    found = _resolved(name, version)
    if isinstance(found, Response):
        return found
    if not state.service.ready:
        return _error(state.service.not_ready())
    entry, served = found
    return _reply({"name": entry.name, "version": str(served.version), "ready": True})


@_route("/models/<name>/config")
def model_config(name: str, version: str | None = None) -> Response:
    found = _resolved(name, version)
    if isinstance(found, Response):
        return found
    return _reply(oip_documents.model_config(*found))


@_route("/models/<name>/stats")
def model_stats(name: str | None = None, version: str | None = None) -> Response:
    state = current_state()
    telemetry = state.telemetry
    if name is None:
        versions = [v for m in state.service.repository.models() for v in m.versions.values()]
    else:
        found = _resolved(name, version)
        if isinstance(found, Response):
            return found
        entry, served = found
        versions = [served] if version is not None else list(entry.versions.values())
    return _reply({"model_stats": [telemetry.statistics(v).json(v.name) for v in versions]})


@_route("/models/<name>/infer", "POST")
def infer(name: str, version: str | None = None) -> Response:
    state = current_state()
    return answer(state.oip, state.max_body, name, version)


# -- the model repository extension (Triton's explicit model control) ---------------------


@blueprint.post("/repository/index")
def repository_index() -> Response:
    only_ready = bool((request.get_json(silent=True) or {}).get("ready"))
    index = current_state().service.repository.index()
    if only_ready:
        index = [m for m in index if m.get("state") == "READY"]
    return _reply(index)


@blueprint.post("/repository/models/<name>/load")
def repository_load(name: str) -> Response:
    return _control(name, load=True)


@blueprint.post("/repository/models/<name>/unload")
def repository_unload(name: str) -> Response:
    return _control(name, load=False)


def _control(name: str, *, load: bool) -> Response:
    repository = current_state().service.repository
    try:
        if load:
            repository.request_load(name)
        else:
            repository.request_unload(name)
    except StudioServeError as e:
        status = e.http_status if e.http_status in (400, 404, 409, 503) else 400
        return oip_error_response(str(e), status)
    return _reply({})


def not_found(path: str) -> Response:
    """The OIP body for an unknown /v2 route (tritonclient expects its own error format)."""
    return oip_error_response(f"no such route {path!r} in the Open Inference Protocol", 404)
