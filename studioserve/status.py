"""``GET /``: a small status page for people, a JSON summary for programs."""

from __future__ import annotations

import html
import json
import time
from typing import TYPE_CHECKING, Any

from flask import Response

if TYPE_CHECKING:
    from werkzeug.datastructures import MIMEAccept

    from .server import AppState


def status_info(state: AppState) -> dict[str, Any]:
    service = state.service
    model = service.model
    shutdown_at = state.shutdown_at()
    info: dict[str, Any] = {
        "model": {
            "kind": model.kind,
            "source": model.source,
            "inputs": [s.__dict__ | {"shape": list(s.shape)} for s in model.inputs],
            "outputs": [s.__dict__ | {"shape": list(s.shape)} for s in model.outputs],
            "load_seconds": round(model.load_seconds, 3),
        },
        "ready": service.ready,
        "uptime_seconds": round(time.time() - state.started, 1),
        "in_flight": service.activity.in_flight,
        "requests_accepted": service.activity.accepted,
        "shutdown_in_seconds": (
            None if shutdown_at is None else max(0.0, round(shutdown_at - time.monotonic(), 1))
        ),
    }
    info.update(state.info)
    return info


def render_status(state: AppState, accept: MIMEAccept) -> Response:
    info = status_info(state)
    if accept.best_match(["application/json", "text/html"]) != "text/html":
        return Response(json.dumps(info, default=str), mimetype="application/json")
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
        for k, v in info.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>studioserve</title></head>"
        f"<body><h1>studioserve</h1><table>{rows}</table></body></html>"
    )
    return Response(page, mimetype="text/html")
