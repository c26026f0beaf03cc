"""The Ray backend under load on a real local Ray cluster: autoscaling from one replica to two
and back, a replica killed mid-load, the request timeout and a full queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from studioserve.rayserve.backend import RayBackend
from studioserve.rayserve.options import RayOptions
from tests.rayserve.conftest import (
    SLOW_WRAPPER,
    assert_nothing_left,
    ray,
    replica_actors,
    serve,
    wait_for,
)
from tests.rayserve.test_ray_backend import _config, _pickle

pytestmark = pytest.mark.allow_thread_leak  # Ray's driver keeps its own threads


@pytest.fixture
def slow_app(
    ray_cluster: int, onnx_store: tuple[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """Deploys the slow wrapper with the options given; closes and checks the cluster after."""
    store, _ = onnx_store
    made: list[RayBackend] = []

    def deploy(options: RayOptions, **changes: Any) -> RayBackend:
        config = _config(store, "slow", ray_cluster, wrapper=SLOW_WRAPPER, **changes)
        backend = RayBackend(config, options)
        made.append(backend)
        return backend.start()

    yield deploy
    for backend in made:
        backend.close()
    assert_nothing_left()


def _load(url: str, stop: threading.Event, statuses: list[int], value: float = 1.0) -> None:
    x = np.full(4, value, np.float32)
    while not stop.is_set():
        statuses.append(_pickle(url, {"a": x})[0])


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(
    slow_app: Any, ray_cluster: int
) -> None:
    backend = slow_app(RayOptions(autoscale=(1, 2), target_ongoing=2, scale_delays=(0.5, 2.0)))
    states = _replica_states(backend)
    assert states.get("RUNNING") == 1, states
    stop, statuses = threading.Event(), []
    threads = [
        threading.Thread(target=_load, args=(backend.url, stop, statuses)) for _ in range(12)
    ]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: _replica_states(backend).get("RUNNING") == 2, 60, "a second replica")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert statuses
    assert all(s == 200 for s in statuses), set(statuses)
    wait_for(lambda: _replica_states(backend).get("RUNNING") == 1, 60, "back to one replica")


def _replica_states(backend: RayBackend) -> dict[str, int]:
    app = serve.status().applications[backend.app_name]
    dep = app.deployments["model-slow"]
    return {str(getattr(s, "value", s)): n for s, n in dep.replica_states.items()}


def test_a_replica_killed_under_load_fails_no_request_silently_and_is_replaced(
    slow_app: Any,
) -> None:
    backend = slow_app(RayOptions(replicas=2), request_timeout=20.0)
    stop, statuses = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(backend.url, stop, statuses)) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(statuses) > 40, 30, "load")
        victim = next(n for n in replica_actors() if "model-slow" in n)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        seen = len(statuses)
        wait_for(lambda: len(statuses) > seen + 40, 30, "requests after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(30)  # no request hangs: every thread is back
    assert not any(t.is_alive() for t in threads)
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) > len(statuses) * 0.9
    wait_for(lambda: _replica_states(backend).get("RUNNING") == 2, 60, "the replacement")
    assert _pickle(backend.url, {"a": np.ones(4, np.float32)})[0] == 200


def test_the_request_timeout_is_504_and_a_full_queue_is_503(slow_app: Any) -> None:
    backend = slow_app(RayOptions(replicas=1), request_timeout=1.0, queue_size=4)
    slow = threading.Thread(
        target=lambda: slow_result.append(
            _pickle(backend.url, {"a": np.full(4, 5000.0, np.float32)})
        )
    )
    slow_result: list[Any] = []
    slow.start()  # holds the replica's one worker for 3 s
    wait_for(lambda: _busy(backend), 10, "the slow batch to start")
    with ThreadPoolExecutor(24) as pool:
        answers = list(
            pool.map(lambda _: _pickle(backend.url, {"a": np.ones(4, np.float32)}), range(24))
        )
    slow.join(30)
    status, _, out = slow_result[0]
    assert status == 504, out
    assert out["error"]["type"] == "deadline_exceeded"
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {503, 504}, statuses
    refused = [a for a in answers if a[0] == 503]
    assert refused, statuses  # the queue of 4 was full
    assert all("retry-after" in headers for _, headers, _ in refused)
    assert all(out["error"]["type"] == "overloaded" for _, _, out in refused)
    wait_for(lambda: _pickle(backend.url, {"a": np.ones(4, np.float32)})[0] == 200, 20, "recovery")


def _busy(backend: RayBackend) -> bool:
    activity = backend._tick()
    return activity["in_flight"] >= 1
