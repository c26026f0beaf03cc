"""``GET /``: a status page for people, a JSON summary for programs.

Browsers (whose ``Accept`` prefers ``text/html``) get an HTML page: the model and its
signature, the batching settings and pipe stages, live charts of throughput, latency and batch
size, and the inactivity-shutdown countdown. Everything else gets the same facts as JSON, which
is also what the page polls once a second (``fetch("./", {headers: {Accept:
"application/json"}})``). The page's script and style are bundled in ``studioserve/static/``
and inlined into the page; nothing is loaded from anywhere else.

With token auth on, a browser's ``GET /`` without the header gets a sign-in page instead (still
status 401, and nothing about the model in it): the token typed there, or given as the URL
fragment ``#token=...`` (browsers never send fragments to the server), is kept in the tab's
``sessionStorage``; the page then fetches the status page and every poll with
``Authorization: Bearer``.

The JSON has ``model`` (kind, source, inputs, outputs, load_seconds), ``ready``,
``uptime_seconds``, ``in_flight``, ``requests_accepted``, ``shutdown_in_seconds``,
``endpoints`` (``metrics``, ``oip``, and ``grpc``: the gRPC address with ``--grpc-port``), the
server's facts (:class:`~studioserve.http.state.ServerInfo`: ``experiment``, ``batching``,
...), ``pipe`` (per-stage counters, when the model has a pipe) and ``live`` (per-second series
of the last minute, see :meth:`studioserve.telemetry.LiveSeries.snapshot`).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import time
from importlib import resources
from typing import Any

from flask import Response, current_app, has_app_context
from werkzeug.datastructures import MIMEAccept

from ..models import Model
from ..pipelines import ModelPipe
from .state import AppState

logger = logging.getLogger(__name__)

__all__ = ["render_sign_in", "render_status", "status_info", "wants_html"]


def _pipe_info(pipe: ModelPipe | None) -> dict[str, Any] | None:
    if pipe is None:
        return None
    try:
        stats = pipe.stats()
    except Exception:
        logger.debug("pipe stats failed", exc_info=True)
        return None
    return {
        "model_stage": pipe.model_stage,
        "max_batch_size": pipe.max_batch_size,
        "in_flight": stats.in_flight,
        "accepted": stats.accepted,
        "stages": [
            {
                "name": s.name,
                "workers": s.workers,
                "batching": s.batching,
                "max_batch_size": s.max_batch_size,
                "batch_limit": s.batch_limit,
                "items": s.items,
                "batches": s.batches,
                "failures": s.failures,
                "queue_depth": s.queue_depth,
                "compute_seconds": round(s.compute_seconds, 6),
                "queue_wait_seconds": round(s.queue_wait_seconds, 6),
                "batch_sizes": {str(k): v for k, v in s.batch_sizes.items()},
            }
            for s in stats.stages.values()
        ],
    }


def _model_json(model: Model) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": model.kind,
        "source": model.source,
        "inputs": [s.to_json() for s in model.inputs],
        "outputs": [s.to_json() for s in model.outputs],
        "load_seconds": round(model.load_seconds, 3),
    }
    instances = int(getattr(model, "instances", 1) or 1)
    if instances > 1:
        out["instances"] = instances
        out["devices"] = list(getattr(model, "devices", ()) or ())
    out.update(model.report())
    return out


def _models_json(state: AppState) -> list[dict[str, Any]]:
    """Every model of the repository: its state, versions, settings and routes."""
    out = []
    for entry in state.service.repository.models():
        out.append(
            {
                "name": entry.name,
                "state": entry.state,
                "reason": entry.reason,
                "load_failures": entry.failures,
                "versions": [
                    {"version": number, "in_flight": v.in_flight, **_model_json(v.model)}
                    for number, v in sorted(entry.versions.items())
                ],
                "available_versions": list(entry.available),
                "settings": dict(entry.settings),
                "ensemble_steps": [dict(step) for step in entry.steps],
                "url": f"/models/{entry.name}",
                "oip_url": f"/v2/models/{entry.name}/infer",
            }
        )
    return out


def status_info(state: AppState) -> dict[str, Any]:
    """The status facts as a JSON-able dict (see the module docstring)."""
    service = state.service
    entries = service.repository.models()
    shown = next((m.latest for m in entries if m.latest is not None), None)
    model = shown.model if shown is not None else None
    shutdown_at = state.shutdown_at()
    info: dict[str, Any] = {
        "model": (
            _model_json(model)
            if model is not None
            else {"kind": "none", "source": "", "inputs": [], "outputs": [], "load_seconds": 0}
        ),
        "models": _models_json(state),
        "ready": service.ready,
        "uptime_seconds": round(time.time() - state.started, 1),
        "in_flight": service.activity.in_flight,
        "requests_accepted": service.activity.accepted,
        "shutdown_in_seconds": (
            None if shutdown_at is None else max(0.0, round(shutdown_at - time.monotonic(), 1))
        ),
    }
    info.update(state.info.to_json())
    pipe = _pipe_info(model.pipe) if model is not None and len(entries) == 1 else None
    if pipe is not None:
        info["pipe"] = pipe
    info["live"] = state.telemetry.live.snapshot()
    if has_app_context():
        info["endpoints"] = {
            "metrics": "/metrics" in {r.rule for r in current_app.url_map.iter_rules()},
            "oip": "oip" in current_app.blueprints,
        }
    if state.grpc_address is not None:
        info.setdefault("endpoints", {})["grpc"] = state.grpc_address
    return info


def wants_html(accept: MIMEAccept) -> bool:
    """Whether a request's ``Accept`` prefers HTML to JSON (a browser navigating)."""
    return accept.best_match(["application/json", "text/html"]) == "text/html"


def render_status(state: AppState, accept: MIMEAccept) -> Response:
    """The response to ``GET /``: HTML for browsers, JSON otherwise."""
    info = status_info(state)
    if not wants_html(accept):
        resp = Response(json.dumps(info, default=str), mimetype="application/json")
        resp.headers["Cache-Control"] = "no-store"
        return resp
    resp = Response(_page(info), mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def render_sign_in() -> Response:
    """The 401 answer to a browser's ``GET /`` without a valid token (see the module docstring)."""
    resp = Response(_sign_in_page(), status=401, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["WWW-Authenticate"] = 'Bearer realm="studioserve"'
    return resp


# -- HTML ------------------------------------------------------------------------------------


@functools.cache
def _asset(name: str) -> str:
    """A bundled file of ``studioserve/static/``, inlined into the page.

    Inlined rather than linked: the page is one self-contained response (no second request,
    nothing that could come from elsewhere), and it works behind any URL prefix.
    """
    text = resources.files("studioserve").joinpath("static", name).read_text("utf-8")
    return text.replace("</", "<\\/")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _shape(shape: list[Any]) -> str:
    dims = ["n", *("?" if d is None else str(d) for d in shape)]
    return "(" + ", ".join(dims) + ")"


def _signature_rows(specs: list[dict[str, Any]], role: str) -> str:
    if not specs:
        return (
            f"<tr><td>{role}</td><td colspan='3' class='muted'>any (the model has no declared "
            "signature)</td></tr>"
        )
    return "".join(
        f"<tr><td>{role}</td><td><code>{_e(s['name'])}</code></td><td>{_e(s['dtype'])}</td>"
        f"<td><code>{_e(_shape(s['shape']))}</code></td></tr>"
        for s in specs
    )


def _stage_rows(pipe: dict[str, Any] | None) -> str:
    if not pipe or not pipe.get("stages"):
        return (
            "<tr><td colspan='7' class='muted'>no pipe: the model is called per request</td></tr>"
        )
    rows = []
    for s in pipe["stages"]:
        mark = " class='model-stage'" if s["name"] == pipe.get("model_stage") else ""
        rows.append(
            f"<tr{mark} data-stage='{_e(s['name'])}'><td><code>{_e(s['name'])}</code></td>"
            f"<td>{_e(s['workers'])}</td><td>{_e(s['max_batch_size'])}</td>"
            f"<td class='limit'>{_e(s['batch_limit'])}</td><td class='items'>{_e(s['items'])}</td>"
            f"<td class='batches'>{_e(s['batches'])}</td>"
            f"<td class='depth'>{_e(s['queue_depth'])}</td></tr>"
        )
    return "".join(rows)


def _model_rows(models: list[dict[str, Any]]) -> str:
    rows = []
    for m in models:
        versions = m.get("versions") or []
        kinds = ", ".join(sorted({str(v.get("kind")) for v in versions})) or "–"
        if m.get("ensemble_steps"):
            kinds = "ensemble"
        rows.append(
            f"<tr data-model='{_e(m['name'])}'><td><code>{_e(m['name'])}</code></td>"
            f"<td>{_e(m['state'])}</td>"
            f"<td>{_e(', '.join(str(v['version']) for v in versions) or '–')}</td>"
            f"<td>{_e(', '.join(map(str, m.get('available_versions') or [])) or '–')}</td>"
            f"<td>{_e(kinds)}</td><td>{_e(m.get('load_failures', 0))}</td>"
            f"<td>{_e(m.get('reason') or '')}</td></tr>"
        )
    return "".join(rows)


def _page(info: dict[str, Any]) -> str:
    model = info["model"]
    batching = info.get("batching") or {}
    experiment = info.get("experiment") or "model"
    initial = json.dumps(info, default=str).replace("<", "\\u003c")
    ready = "ready" if info.get("ready") else "not ready"
    killafter = info.get("killafter_seconds")
    endpoints = info.get("endpoints") or {}
    models = info.get("models") or []
    several = len(models) > 1
    links = [] if several else ["<li><code>POST /</code> pickle, JSON or npz inference</li>"]
    if several:
        links.extend(
            f"<li><code>POST /models/{_e(m['name'])}</code> and <code>POST /v2/models/"
            f"{_e(m['name'])}/infer</code> ({_e(m['state'])})</li>"
            for m in models
        )
    elif endpoints.get("oip"):
        links.append(
            f"<li><code>POST /v2/models/{_e(experiment)}/infer</code> Open Inference Protocol "
            f"(<a href='v2/models/{_e(experiment)}'>metadata</a>, "
            f"<a href='v2/models/{_e(experiment)}/config'>config</a>, "
            f"<a href='v2/models/{_e(experiment)}/stats'>stats</a>)</li>"
        )
    if endpoints.get("grpc"):
        links.append(
            f"<li><code>{_e(endpoints['grpc'])}</code> gRPC (KServe v2): "
            "<code>inference.GRPCInferenceService/ModelInfer</code>, tritonclient.grpc</li>"
        )
    if endpoints.get("metrics"):
        links.append("<li><a href='metrics'><code>GET /metrics</code></a> Prometheus</li>")
    links.append("<li><code>GET /healthz</code>, <code>GET /readyz</code> probes</li>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>studioserve · {_e(experiment)}</title>
<style>{_asset("status.css")}</style>
</head><body>
<header><h1>studioserve <span class="exp">{_e(experiment)}</span></h1>
<span id="ready" class="pill {"ok" if info.get("ready") else "bad"}">{ready}</span>
<span id="conn" class="conn"></span></header>
<main>
<section class="cards">
 <div class="card"><div class="label">requests</div>
  <div class="value" id="total-requests">{_e(info.get("requests_accepted", 0))}</div></div>
 <div class="card"><div class="label">throughput (10 s)</div>
  <div class="value"><span id="rps">–</span> <small>req/s</small></div></div>
 <div class="card"><div class="label">latency p50 / p99 (10 s)</div>
  <div class="value"><span id="p50">–</span> / <span id="p99">–</span> <small>ms</small></div></div>
 <div class="card"><div class="label">mean batch (10 s)</div>
  <div class="value" id="batch-mean">–</div></div>
 <div class="card"><div class="label">in flight</div>
  <div class="value" id="in-flight">{_e(info.get("in_flight", 0))}</div></div>
 <div class="card"><div class="label">errors</div>
  <div class="value" id="errors">0</div></div>
 <div class="card"><div class="label">shutdown if idle, in</div>
  <div class="value" id="countdown" data-killafter="{_e(killafter)}">{
        "off" if info.get("shutdown_in_seconds") is None else "…"
    }</div></div>
</section>
<section class="charts">
 <figure><figcaption>throughput <span class="legend"><i class="s0"></i>req/s
  <i class="s1"></i>rows/s</span></figcaption><svg id="chart-throughput" viewBox="0 0 480 180"
  preserveAspectRatio="none" role="img" aria-label="throughput"></svg></figure>
 <figure><figcaption>latency <span class="legend"><i class="s0"></i>p50 <i class="s1"></i>p99
  (ms)</span></figcaption><svg id="chart-latency" viewBox="0 0 480 180"
  preserveAspectRatio="none" role="img" aria-label="latency"></svg></figure>
 <figure><figcaption>mean batch size <span class="legend"><i class="s0"></i>rows per model
  call</span></figcaption><svg id="chart-batch" viewBox="0 0 480 180"
  preserveAspectRatio="none" role="img" aria-label="batch size"></svg></figure>
 <figure><figcaption>batch sizes since start <span class="legend"><i class="s0"></i>model
  calls</span></figcaption><svg id="chart-batch-hist" viewBox="0 0 480 180"
  preserveAspectRatio="none" role="img" aria-label="batch size histogram"></svg></figure>
</section>
<section class="facts">
 <div><h2>Model</h2><table>
  <tr><th>kind</th><td id="model-kind">{_e(model["kind"])}</td></tr>
  <tr><th>source</th><td><code>{_e(model["source"])}</code></td></tr>
  <tr><th>load + warm-up</th><td>{_e(model["load_seconds"])} s</td></tr>
  <tr><th>uptime</th><td id="uptime">{_e(info.get("uptime_seconds"))} s</td></tr>
 </table>
 <h2>Signature</h2><table id="signature"><tr><th></th><th>name</th><th>dtype</th>
  <th>shape</th></tr>{_signature_rows(model["inputs"], "input")}{
        _signature_rows(model["outputs"], "output")
    }</table></div>
 <div><h2>Batching</h2><table id="batching">
  <tr><th>max batch size</th><td>{_e(batching.get("max_batch_size", "–"))}</td></tr>
  <tr><th>max delay</th><td>{_e(batching.get("max_delay_ms", "–"))} ms</td></tr>
 </table>
 <h2>Pipe stages</h2><table id="stages"><tr><th>stage</th><th>workers</th><th>max batch</th>
  <th>limit</th><th>items</th><th>batches</th><th>queued</th></tr>{
        _stage_rows(info.get("pipe"))
    }</table>
 <h2>Endpoints</h2><ul>{"".join(links)}</ul></div>
</section>
<section class="models"><h2>Models</h2><table id="models"><tr><th>model</th><th>state</th>
 <th>versions served</th><th>versions in store</th><th>kind</th><th>load failures</th>
 <th>last reason</th></tr>{_model_rows(models)}</table></section>
</main>
<script id="initial" type="application/json">{initial}</script>
<script>{_asset("status.js")}</script>
</body></html>
"""


@functools.cache
def _sign_in_page() -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>studioserve · sign in</title>
<style>{_asset("status.css")}</style>
</head><body>
<header><h1>studioserve</h1><span class="pill bad">token required</span></header>
<main>
<form id="sign-in" class="card" autocomplete="off">
 <p>This server needs the bearer token printed when it started
 (<code>studio serve</code> prints it once, and writes it to <code>--token-file</code>).</p>
 <p><label>token <input id="token" type="password" size="48" required></label>
 <button type="submit">show status</button></p>
 <p id="sign-in-error" class="bad" role="alert"></p>
 <p class="muted">The token stays in this browser tab (<code>sessionStorage</code>) and is sent
 only to this server, as an <code>Authorization</code> header.</p>
</form>
</main>
<script>{_asset("sign_in.js")}</script>
</body></html>
"""
