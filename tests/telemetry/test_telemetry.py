"""The server's three observers in bulk: exact on every read, bounded, as if fed one by one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import prometheus_client as pc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import studioserve.telemetry as telemetry_module
from studioserve.models import IdentityModel, PipeModel
from studioserve.pipelines import BatchEvent, ModelPipe
from studioserve.serving.observer import DEFAULT_BOUND, RequestDigest
from studioserve.serving.repository import ServedVersion
from studioserve.serving.service import ModelService
from studioserve.telemetry import LiveSeries, ModelStatistics, Telemetry
from studioserve.telemetry.prometheus import LATENCY_BUCKETS, PrometheusMetrics, _BulkHistogram

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: bytes | str, *prefixes: str) -> Samples:
    body = text.decode() if isinstance(text, bytes) else text
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name.endswith("_created") or not s.name.startswith(prefixes or ("",)):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def service() -> Iterator[ModelService]:
    service = ModelService(IdentityModel(source="test"), name="m")
    service.ready = True
    yield service
    service.close()


def _telemetry(service: ModelService) -> Telemetry:
    return Telemetry(service, experiment="m", started=time.time(), shutdown_at=lambda: None)


def _served(service: ModelService) -> ServedVersion:
    served = service.repository.get("m").latest
    assert served is not None
    return served


def _scrape(telemetry: Telemetry) -> Samples:
    assert telemetry.prometheus is not None
    return _samples(telemetry.prometheus.exposition()[0])


def test_every_reader_counts_every_request_answered_before_it(service: ModelService) -> None:
    telemetry = _telemetry(service)
    served = _served(service)
    observers = telemetry.observers
    for round_ in range(1, 4):
        for i in range(10):
            observers.on_request("/", 200 if i < 8 else 422, 0.001, served)
        observers.on_request("/v2/models/infer", 200, 0.002, served)
        observers.on_request("/", 503, 0.0001, None)  # refused before a model: no version's
        assert observers.pending == 12  # nothing delivered until a read
        # the status page's series
        assert telemetry.live.snapshot()["totals"]["requests"] == 14 * round_ - 2
        assert observers.pending == 0
        assert telemetry.live.snapshot()["totals"]["errors"] == 3 * round_
        # Triton's statistics
        observers.on_request("/", 200, 0.001, served)
        stats = telemetry.statistics(served).json("m")["inference_stats"]
        assert stats["success"]["count"] == 11 * round_ - 1
        assert stats["fail"]["count"] == 2 * round_
        assert stats["success"]["ns"] == (12 * round_ - 1) * 1_000_000  # 1 and 2 ms
        # a scrape
        observers.on_request("/", 200, 0.001, served)
        samples = _scrape(telemetry)
        assert _value(samples, "studioserve_requests_total", route="/", status="200") == 10 * round_
        assert _value(samples, "studioserve_requests_total", route="/", status="422") == 2 * round_
        assert _value(samples, "studioserve_requests_total", route="/", status="503") == round_
        assert _value(samples, "studioserve_request_duration_seconds_count", route="/") == (
            13 * round_
        )
        assert (
            _value(
                samples, "studioserve_model_requests_total", model="m", version="1", status="200"
            )
            == 11 * round_
        )
        assert telemetry.live.requests == 14 * round_  # the scrape delivered to all three


def _reference() -> tuple[Any, Any, Any, Any]:
    """prometheus-client's own instruments, fed one observation at a time (the old way)."""
    reg = pc.CollectorRegistry()
    requests = pc.Counter("studioserve_requests", "x", ["route", "status"], registry=reg)
    latency = pc.Histogram(
        "studioserve_request_duration_seconds",
        "x",
        ["route"],
        buckets=LATENCY_BUCKETS,
        registry=reg,
    )
    waits = pc.Histogram(
        "studioserve_queue_wait_seconds", "x", ["stage"], buckets=LATENCY_BUCKETS, registry=reg
    )
    return reg, requests, latency, waits


def test_bulk_figures_equal_one_request_at_a_time(service: ModelService) -> None:
    served = _served(service)
    rng = np.random.default_rng(0)
    # latencies across every bucket, bounds themselves included
    seconds = [float(s) for s in 10 ** rng.uniform(-5, 2, 500)] + list(LATENCY_BUCKETS)
    now = time.time()
    records = [
        ("/" if i % 3 else "/v2/models/infer", (200, 200, 422, 500, 404)[i % 5], s, served, now)
        for i, s in enumerate(seconds)
    ]
    # Prometheus: the bulk path against prometheus-client's observe, one by one
    metrics = PrometheusMetrics(
        service, experiment="m", started=time.time(), shutdown_at=lambda: None
    )
    reg, requests, latency, waits = _reference()
    for route, status, s, _, _ in records:
        requests.labels(route, str(status)).inc()
        latency.labels(route).observe(s)
    half = len(records) // 2
    metrics.on_requests(RequestDigest.of(records[:half]))
    metrics.on_requests(RequestDigest.of(records[half:]))
    event = BatchEvent("model", 4, 4, tuple(seconds[:4]) + (0.0,), 0.01, 4, 0)
    metrics.on_batch(event, "m")
    for w in event.queue_waits:
        waits.labels("model").observe(w)
    got = _samples(metrics.exposition()[0], "studioserve_request", "studioserve_queue_wait")
    want = _samples(pc.generate_latest(reg))
    assert set(got) == set(want)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-12), key  # sums: the same up to rounding
    assert {k: v for k, v in got.items() if not k[0].endswith("_sum")} == {
        k: v for k, v in want.items() if not k[0].endswith("_sum")
    }  # counts and buckets: exactly
    # the live series and Triton's statistics: one digest against one record per digest
    clock = lambda: now + 2  # noqa: E731 (both read the same seconds)
    bulk, single = LiveSeries(None, clock=clock), LiveSeries(None, clock=clock)
    bulk_stats, single_stats = ModelStatistics(None), ModelStatistics(None)
    digest = RequestDigest.of(records)
    bulk.on_requests(digest)
    bulk_stats.on_requests(digest)
    for record in records:
        one = RequestDigest.of([record])
        single.on_requests(one)
        single_stats.on_requests(one)
    assert bulk.snapshot() == single.snapshot()
    assert bulk_stats.json("m") == single_stats.json("m")
    failed = sum(1 for r in records if r[1] in (422, 500))  # a 404 is not this model's
    assert bulk_stats.json("m")["inference_stats"]["fail"]["count"] == failed


def test_many_threads_with_readers_count_every_request_once(service: ModelService) -> None:
    telemetry = _telemetry(service)
    served = _served(service)
    observers = telemetry.observers
    threads, per_thread = 6, 3000
    start = threading.Barrier(threads + 1)
    done = threading.Event()
    reads = [0]

    def requests() -> None:
        start.wait()
        for i in range(per_thread):
            observers.on_request("/", 200 if i % 10 else 500, 0.0005, served)

    def reader() -> None:
        start.wait()
        while not done.is_set():
            _scrape(telemetry)
            telemetry.live.snapshot()
            telemetry.statistics(served).json("m")
            reads[0] += 1

    workers = [threading.Thread(target=requests) for _ in range(threads)]
    scraper = threading.Thread(target=reader)
    for th in [*workers, scraper]:
        th.start()
    for th in workers:
        th.join(60)
    done.set()
    scraper.join(60)
    total = threads * per_thread
    errors = threads * (per_thread // 10)
    samples = _scrape(telemetry)
    assert _value(samples, "studioserve_requests_total", route="/", status="200") == total - errors
    assert _value(samples, "studioserve_requests_total", route="/", status="500") == errors
    assert _value(samples, "studioserve_request_duration_seconds_count", route="/") == total
    assert telemetry.live.snapshot()["totals"] == pytest.approx(
        {
            "requests": total,
            "errors": errors,
            "rows": 0,
            "batches": 0,
            "p50_ms": 0.5,
            "p99_ms": 0.5,
        },
        rel=0.05,
    )
    stats = telemetry.statistics(served).json("m")["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (total - errors, errors)
    assert reads[0] > 0


def test_a_burst_with_no_reader_stays_bounded_and_loses_nothing(service: ModelService) -> None:
    telemetry = _telemetry(service)
    served = _served(service)
    observers = telemetry.observers
    total = 3 * DEFAULT_BOUND + 7
    most = 0
    for _ in range(total):
        observers.on_request("/", 200, 0.001, served)
        most = max(most, observers.pending)
    assert most < DEFAULT_BOUND
    assert observers.pending == 7
    assert telemetry.live.requests == 3 * DEFAULT_BOUND  # delivered by the bound, unread
    assert telemetry.live.snapshot()["totals"]["requests"] == total
    assert telemetry.statistics(served).json("m")["inference_stats"]["success"]["count"] == total
    samples = _scrape(telemetry)
    assert _value(samples, "studioserve_requests_total", route="/", status="200") == total


def test_a_model_stage_batch_delivers_the_buffer_once_enough_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry_module, "FLUSH_AT", 3)
    pipe = ModelPipe(name="m")
    pipe.add(lambda x: x, max_batch_size=4, name="model")
    service = ModelService(PipeModel(pipe, source="test"), request_timeout=10, name="m")
    service.model.start()
    service.ready = True
    try:
        telemetry = _telemetry(service)
        served = _served(service)
        observers = telemetry.observers
        for _ in range(3):
            observers.on_request("/", 200, 0.001, served)
        assert observers.pending == 3
        pipe.submit(np.ones((1, 2), np.float32)).result(10)
        deadline = time.monotonic() + 10
        while observers.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        assert observers.pending == 0  # the pipe's worker delivered them, with nobody reading
        assert telemetry.live.requests == 3
        stats = telemetry.statistics(served).json("m")
        assert stats["inference_stats"]["success"]["count"] == 3
        assert stats["execution_count"] == 1
    finally:
        service.close()


def test_a_histogram_without_the_internals_falls_back_to_observe() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    child = Plain()
    bulk = _BulkHistogram(child)
    bulk.observe_many([0.1, 0.2, 0.3])
    assert child.seen == [0.1, 0.2, 0.3]
    h = pc.Histogram("h", "x", buckets=(1.0, 2.0), registry=pc.CollectorRegistry())
    bulk = _BulkHistogram(h)
    assert bulk._buckets is not None  # the internals of the prometheus-client installed
    bulk.observe_many([0.5, 1.0, 1.5, 3.0, 2.0])
    got = {s.name + s.labels.get("le", ""): s.value for s in h.collect()[0].samples}
    assert (got["h_bucket1.0"], got["h_bucket2.0"], got["h_bucket+Inf"]) == (2, 4, 5)
    assert (got["h_count"], got["h_sum"]) == (5, 8.0)


def test_late_records_count_in_the_totals_not_in_a_second_long_gone() -> None:
    clock = [1000.5]
    series = LiveSeries(None, window=30, clock=lambda: clock[0])
    series.on_request("/", 200, 0.001)
    clock[0] = 1100.5
    series.on_request("/", 200, 0.001)
    series.on_requests(RequestDigest.of([("/", 200, 0.001, None, 1000.2)]))  # flushed late
    snap = series.snapshot(seconds=30)
    assert snap["totals"]["requests"] == 3
    assert sum(snap["series"]["requests"]) == 0  # 1100 is still filling; 1000 is gone
    assert len(series._seconds) <= 32
