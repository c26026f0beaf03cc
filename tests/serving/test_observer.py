"""Observers: a lock-free record per request, delivered in bulk; old-style observers still heard."""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections import Counter
from typing import Any

import pytest

from studioserve.models import IdentityModel
from studioserve.pipelines import BatchEvent
from studioserve.serving.observer import Observers, RequestDigest
from studioserve.serving.repository import ServedVersion


class Tally:
    """A bulk observer that keeps every request it was given, one flush after another."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.counts: Counter[tuple[str, int, Any]] = Counter()
        self.flushes = 0
        self.singles: list[tuple[str, int, float]] = []

    def on_request(self, route: str, status: int, seconds: float, model: Any = None) -> None:
        self.singles.append((route, status, seconds))  # never called: it hears in bulk

    def on_requests(self, digest: RequestDigest) -> None:
        self.flushes += 1
        for g in digest.groups:
            self.seconds.extend(g.seconds)
            self.counts[(g.route, g.status, g.model)] += g.count

    def on_batch(self, event: BatchEvent) -> None:
        pass


class OldStyle:
    """An observer written before servers had several models: three arguments, per request."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, int, float]] = []

    def on_request(self, route: str, status: int, seconds: float) -> None:
        self.heard.append((route, status, seconds))

    def on_batch(self, event: BatchEvent) -> None:
        pass


class WithModel(OldStyle):
    def __init__(self) -> None:
        super().__init__()
        self.models: list[Any] = []

    def on_request(  # type: ignore[override]
        self, route: str, status: int, seconds: float, model: Any = None
    ) -> None:
        super().on_request(route, status, seconds)
        self.models.append(model)


class Broken:
    def on_request(self, route: str, status: int, seconds: float, model: Any = None) -> None:
        raise RuntimeError("observer bug")

    def on_requests(self, digest: RequestDigest) -> None:
        raise RuntimeError("bulk observer bug")

    def on_batch(self, event: BatchEvent) -> None:
        pass


class BrokenOld:
    def on_request(self, route: str, status: int, seconds: float) -> None:
        raise RuntimeError("old observer bug")

    def on_batch(self, event: BatchEvent) -> None:
        pass


def _version(name: str = "m", version: int = 1) -> ServedVersion:
    return ServedVersion(name, version, IdentityModel(source="test"))


def test_a_request_is_only_recorded_until_a_flush_delivers_it_grouped() -> None:
    observers = Observers(None)
    tally = Tally()
    observers.attach(tally)
    a, b = _version("a"), _version("b")
    observers.on_request("/", 200, 0.001, a)
    observers.on_request("/", 200, 0.002, a)
    observers.on_request("/", 422, 0.003, a)
    observers.on_request("/v2/models/infer", 200, 0.004, b)
    observers.on_request("/", 503, 0.005, None)
    assert (tally.flushes, observers.pending) == (0, 5)
    assert observers.flush() == 5
    assert observers.pending == 0
    assert tally.counts == {
        ("/", 200, a): 2,
        ("/", 422, a): 1,
        ("/v2/models/infer", 200, b): 1,
        ("/", 503, None): 1,
    }
    assert tally.seconds == [0.001, 0.002, 0.003, 0.004, 0.005]
    assert tally.singles == []
    assert (observers.flush(), tally.flushes) == (0, 1)  # nothing new: no delivery


def test_a_digest_groups_by_route_status_model_and_second() -> None:
    a = _version("a")
    records = [
        ("/", 200, 0.001, a, 100.2),
        ("/", 200, 0.002, a, 100.9),
        ("/", 200, 0.003, a, 101.1),
        ("/", 200, 0.004, None, 101.2),
        ("/", 200, 0.005, a, 100.5),
    ]
    digest = RequestDigest.of(records)
    assert digest.count == 5
    groups = {(g.route, g.status, g.model, g.second): g for g in digest.groups}
    assert set(groups) == {("/", 200, a, 100), ("/", 200, a, 101), ("/", 200, None, 101)}
    first = groups[("/", 200, a, 100)]
    assert first.seconds == [0.001, 0.002, 0.005]
    assert first.last_at == 100.9
    assert first.total() == pytest.approx(0.008)
    assert first.total_ns() == sum(int(s * 1e9) for s in (0.001, 0.002, 0.005))
    bounds = (0.0015, 0.0025, 0.004)
    values = [0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.5]
    hist = RequestDigest.of([("/", 200, v, None, 1.0) for v in values]).groups[0]
    # the first bound >= the value, as prometheus-client's observe; len(bounds) above all
    assert hist.histogram(bounds) == Counter(bisect_left(bounds, v) for v in values)
    assert hist.histogram(bounds) == {0: 2, 1: 2, 2: 2, 3: 1}
    assert set(digest.by_model()) == {a, None}
    assert digest.by_model()[a].count == 4


def test_records_from_many_threads_and_concurrent_flushes_are_each_counted_once() -> None:
    observers = Observers(None, bound=64)  # bound flushes race with the readers' flushes
    tally = Tally()
    observers.attach(tally)
    model = _version()
    threads, per_thread = 8, 5000
    start = threading.Barrier(threads + 2)
    done = threading.Event()

    def requests(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            observers.on_request("/", 200 if i % 7 else 500, t * per_thread + i, model)

    def reader() -> None:
        start.wait()
        while not done.is_set():
            observers.flush()

    workers = [threading.Thread(target=requests, args=(t,)) for t in range(threads)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for th in workers + readers:
        th.start()
    for th in workers:
        th.join(60)
    done.set()
    for th in readers:
        th.join(60)
    observers.flush()
    total = threads * per_thread
    assert observers.pending == 0
    assert sorted(tally.seconds) == list(range(total))  # every record, none twice
    assert tally.counts[("/", 500, model)] == threads * len(range(0, per_thread, 7))
    assert sum(tally.counts.values()) == total
    assert tally.flushes > 1


def test_a_burst_with_no_reader_stays_bounded_and_loses_nothing() -> None:
    observers = Observers(None, bound=100)
    tally = Tally()
    observers.attach(tally)
    most = 0
    for i in range(1050):
        observers.on_request("/", 200, float(i), None)
        most = max(most, observers.pending)
    assert most < 100  # the request reaching the bound flushes
    assert (len(tally.seconds), observers.pending) == (1000, 50)
    observers.flush()
    assert tally.seconds == [float(i) for i in range(1050)]


def test_an_observer_that_raises_is_logged_and_breaks_no_request_nor_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    observers = Observers(None, bound=10)
    observers.attach(Broken())
    observers.attach(BrokenOld())
    tally, old = Tally(), OldStyle()
    observers.attach(tally)
    observers.attach(old)
    with caplog.at_level(logging.ERROR, logger="studioserve.serving.observer"):
        for i in range(25):  # two bound flushes on the way
            observers.on_request("/", 200, float(i), None)
        assert observers.flush() == 5
    assert tally.seconds == [float(i) for i in range(25)]  # the others heard everything
    assert len(old.heard) == 25
    messages = [r.getMessage() for r in caplog.records]
    assert sum("request observer" in m and "Broken " in m for m in messages) == 3
    assert sum("request observer" in m and "BrokenOld" in m for m in messages) == 25
    assert all(r.exc_info for r in caplog.records)


def test_an_old_style_observer_still_hears_every_request_at_once() -> None:
    observers = Observers(None)
    old, with_model, tally = OldStyle(), WithModel(), Tally()
    for observer in (old, with_model, tally):
        observers.attach(observer)
    model = _version()
    for i in range(5):
        observers.on_request("/", 200 if i else 503, i / 1000, model if i else None)
        # heard before any flush, with the arguments it takes
        assert old.heard[-1] == ("/", 200 if i else 503, i / 1000)
        assert len(with_model.heard) == i + 1
    assert with_model.models == [None, model, model, model, model]
    assert tally.flushes == 0
    observers.flush()
    assert len(tally.seconds) == 5
    assert list(observers) == [old, with_model, tally]


def test_without_a_bulk_observer_nothing_is_buffered() -> None:
    observers = Observers(None)
    old = OldStyle()
    observers.attach(old)
    for _ in range(10):
        observers.on_request("/", 200, 0.001, None)
    assert (observers.pending, len(old.heard)) == (0, 10)
