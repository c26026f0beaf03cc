"""Prometheus metrics and the live series: values move as expected after known traffic."""

from __future__ import annotations

import logging
import pickle
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from studioserve.http.app import create_app
from studioserve.http.state import ServerInfo
from studioserve.models import IdentityModel, PipeModel
from studioserve.pipelines import BatchEvent, ModelPipe
from studioserve.serving.service import ModelService
from studioserve.telemetry import LiveSeries
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import encode_infer_request
from tests.helpers import raw_post, running_server

W = np.eye(16, 4, dtype=np.float32)


class Gate:
    """A model function whose calls wait for the test to open the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        self.entered.set()
        assert self.open.wait(30)
        return batch @ W


def _model(fn: Any = None, load_seconds: float = 1.25) -> PipeModel:
    pipe = ModelPipe(name="m")
    pipe.add(fn or (lambda x: x @ W), max_batch_size=16, name="matmul")
    return PipeModel(
        pipe,
        source="metrics-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
        load_seconds=load_seconds,
    )


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from ``GET /metrics``."""
    status, headers, body = raw_post(url, None, method="GET", path="/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def gated() -> Iterator[tuple[Any, Gate]]:
    gate = Gate()
    with running_server("gated", model=_model(gate), killafter=600) as server:
        try:
            yield server, gate
        finally:
            gate.open.set()


def _pickle(n: int | None = None) -> bytes:
    x = np.ones((16,) if n is None else (n, 16), np.float32)
    return pickle.dumps({"k": x})


def test_counts_and_histograms_follow_known_traffic() -> None:
    with running_server("m", model=_model()) as server:
        url = server.url
        before = scrape(url)
        assert value(before, "studioserve_requests_total", route="/", status="200") == 0
        for n in (None, 2, 3):
            assert raw_post(url, _pickle(n))[0] == 200
        assert raw_post(url, pickle.dumps({"k": np.ones(5, np.float32)}))[0] == 422
        body, headers = encode_infer_request({"x": np.ones((4, 16), np.float32)})
        for _ in range(2):
            assert raw_post(url, body, headers, path="/v2/models/m/infer")[0] == 200
        # probes, metrics and the status page are not inference requests
        raw_post(url, None, method="GET", path="/healthz")
        raw_post(url, None, method="GET", path="/")
        after = scrape(url)
        stage = server.service.model.pipe.stats().stages["matmul"]

    assert value(after, "studioserve_requests_total", route="/", status="200") == 3
    assert value(after, "studioserve_requests_total", route="/", status="422") == 1
    assert value(after, "studioserve_requests_total", route="/v2/models/infer", status="200") == 2
    assert value(after, "studioserve_request_duration_seconds_count", route="/") == 4
    assert value(after, "studioserve_request_duration_seconds_count", route="/v2/models/infer") == 2
    assert value(after, "studioserve_request_duration_seconds_sum", route="/") > 0
    assert value(after, "studioserve_accepted_requests_total") == 6
    # one histogram observation per batch (compute, size) and per item (queue wait)
    assert value(after, "studioserve_batch_size_count", stage="matmul") == stage.batches
    assert value(after, "studioserve_batch_size_sum", stage="matmul") == 1 + 2 + 3 + 4 + 4
    assert value(after, "studioserve_compute_seconds_count", stage="matmul") == stage.batches
    assert value(after, "studioserve_queue_wait_seconds_count", stage="matmul") == 5
    assert value(after, "studioserve_queue_wait_seconds_bucket", stage="matmul", le="+Inf") == 5
    assert value(after, "studioserve_in_flight_requests") == 0
    assert value(after, "studioserve_queue_depth", stage="matmul") == 0
    assert value(after, "studioserve_model_load_seconds") == 1.25
    assert value(after, "studioserve_model_ready") == 1
    assert ("studioserve_shutdown_in_seconds", ()) not in after  # killafter 0: no timer
    info = value(
        after,
        "studioserve_model_info",
        experiment="m",
        kind="pipe",
        source="metrics-test",
        model_stage="matmul",
    )
    assert info == 1


def test_queue_depth_and_in_flight_while_the_model_is_busy(gated: tuple[Any, Gate]) -> None:
    server, gate = gated
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(raw_post, server.url, _pickle())
        assert gate.entered.wait(30)
        rest = [pool.submit(raw_post, server.url, _pickle()) for _ in range(3)]
        pipe = server.service.model.pipe
        while pipe.stats().stages["matmul"].queue_depth < 3:
            threading.Event().wait(0.005)
        busy = scrape(server.url)
        gate.open.set()
        assert all(f.result(30)[0] == 200 for f in [first, *rest])
    idle = scrape(server.url)
    assert value(busy, "studioserve_queue_depth", stage="matmul") == 3
    assert value(busy, "studioserve_in_flight_requests") == 4
    assert value(busy, "studioserve_pipe_in_flight_items") == 4
    # while requests are in flight the inactivity timer does not run down
    assert value(busy, "studioserve_shutdown_in_seconds") == pytest.approx(600, abs=1)
    assert value(idle, "studioserve_queue_depth", stage="matmul") == 0
    assert value(idle, "studioserve_in_flight_requests") == 0
    assert 0 < value(idle, "studioserve_shutdown_in_seconds") <= 600
    assert gate.calls == [1, 3]
    assert value(idle, "studioserve_batch_size_bucket", stage="matmul", le="2.0") == 1
    assert value(idle, "studioserve_batch_size_bucket", stage="matmul", le="4.0") == 2


def test_each_server_has_its_own_registry() -> None:
    with running_server("a", model=_model()) as a, running_server("b", model=_model()) as b:
        for _ in range(3):
            raw_post(a.url, _pickle())
        raw_post(b.url, _pickle())
        sa, sb = scrape(a.url), scrape(b.url)
    assert value(sa, "studioserve_requests_total", route="/", status="200") == 3
    assert value(sb, "studioserve_requests_total", route="/", status="200") == 1


def test_without_prometheus_client_there_is_no_metrics_route(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now raises
    model = IdentityModel(source="none")
    service = ModelService(model)
    service.ready = True
    with caplog.at_level(logging.DEBUG, logger="studioserve.telemetry"):
        app = create_app(service, info=ServerInfo(experiment="plain"))
    assert any("prometheus-client is not installed" in r.message for r in caplog.records)
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert client.post("/", data=_pickle()).status_code == 200
    info = client.get("/", headers={"Accept": "application/json"}).get_json()
    assert info["live"]["totals"]["requests"] == 1
    assert info["endpoints"]["metrics"] is False


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_live_series_per_second() -> None:
    clock = FakeClock(1000.2)
    series = LiveSeries("model", window=30, clock=clock)
    for ms in (1, 2, 3, 4, 100):
        series.on_request("/", 200, ms / 1000)
    series.on_request("/", 500, 0.5)
    series.on_batch(BatchEvent("model", 2, 6, (0.001, 0.001), 0.01, 2, 0))
    series.on_batch(BatchEvent("pre", 2, 6, (0.001, 0.001), 0.01, 2, 0))  # not the model stage
    clock.t = 1001.5
    series.on_request("/", 200, 0.002)  # the current second is left out of the series
    clock.t = 1002.1
    snap = series.snapshot(seconds=5)
    s = snap["series"]
    assert s["t"] == [997, 998, 999, 1000, 1001]
    assert s["requests"] == [0, 0, 0, 6, 1]
    assert s["errors"] == [0, 0, 0, 1, 0]
    assert s["batch_mean"] == [None, None, None, 6.0, None]
    assert s["rows"] == [0, 0, 0, 6, 0]
    assert s["p50_ms"][3] == pytest.approx(3, rel=0.1)
    assert s["p99_ms"][3] == pytest.approx(100, rel=0.1)
    assert s["p50_ms"][0] is None
    assert snap["totals"] == {
        "requests": 7,
        "errors": 1,
        "rows": 6,
        "batches": 1,
        "p50_ms": pytest.approx(2, rel=0.1),
        "p99_ms": pytest.approx(100, rel=0.1),
    }
    recent = snap["recent"]
    assert recent["requests"] == 7
    assert recent["rps"] == 0.7
    assert recent["batch_mean"] == 6.0
    # old seconds fall out of the window
    clock.t = 1100.0
    series.on_request("/", 200, 0.001)
    assert sum(series.snapshot(seconds=30)["series"]["requests"]) == 0
    assert len(series._seconds) <= 32


def test_every_read_counts_the_requests_answered_just_before_it() -> None:
    # requests are recorded without a lock and delivered in bulk: each read delivers first
    service = ModelService(IdentityModel(source="reads"), name="reads")
    service.ready = True
    client = create_app(service, info=ServerInfo(experiment="reads")).test_client()
    for n in range(1, 4):
        assert client.post("/", data=_pickle()).status_code == 200
        body = client.get("/metrics").get_data(as_text=True)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert value(samples, "studioserve_requests_total", route="/", status="200") == 3 * n - 2
        assert value(samples, "studioserve_request_duration_seconds_count", route="/") == 3 * n - 2
        assert client.post("/", data=_pickle()).status_code == 200
        info = client.get("/", headers={"Accept": "application/json"}).get_json()
        assert info["live"]["totals"]["requests"] == 3 * n - 1
        assert client.post("/", data=_pickle()).status_code == 200
        stats = client.get("/v2/models/reads/stats").get_json()["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 3 * n
