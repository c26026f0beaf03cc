"""The asynchronous request path on granian's loop (studioserve.http.rsgi).

Real servers on loopback: inference runs as coroutines on granian's loop (no pool thread per
request), a lone request on an idle cheap model is computed right there, concurrent requests
still batch, the request timeout holds on the loop, a client that goes away frees what it
held, and models without a pipe run in the pool of ``--threads`` threads.
"""

from __future__ import annotations

import http.client
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from studioserve.models import PipeModel
from studioserve.models.callable import CallableModel
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer
from studioserve.tensors import TensorSpec
from tests.helpers import error_of, gated_pipe, raw_post, running_server

W = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64


class Threads:
    """Records the name of every thread that ran a function."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def note(self) -> None:
        with self._lock:
            self.names.append(threading.current_thread().name)

    def clear(self) -> None:
        with self._lock:
            self.names.clear()


def _recording_model(threads: Threads, head: Threads, **batching: Any) -> PipeModel:
    def to_rows(x: np.ndarray) -> np.ndarray:
        head.note()  # runs where the request is handled: the submitting thread
        return x

    def matmul(batch: np.ndarray) -> np.ndarray:
        threads.note()
        return batch @ W

    pipe = ModelPipe(name="rec")
    pipe.add(to_rows)
    pipe.add(matmul, max_batch_size=32, name="matmul", **batching)
    return PipeModel(
        pipe,
        source="rec-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
    )


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[ModelServer, Threads, Threads]]:
    threads, head = Threads(), Threads()
    with running_server("rec", model=_recording_model(threads, head)) as server:
        assert server.http is not None
        assert server.http.kind == "granian"
        yield server, threads, head


def _post(url: str, x: np.ndarray, path: str = "/") -> np.ndarray:
    status, _, body = raw_post(url, pickle.dumps({"x": x}), path=path)
    assert status == 200, body
    out: np.ndarray = pickle.loads(body)["x"]
    return out


def _oip(url: str, x: np.ndarray) -> list[float]:
    import json

    doc = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.tolist()}]}
    status, _, body = raw_post(
        url,
        json.dumps(doc).encode(),
        {"Content-Type": "application/json"},
        path="/v2/models/rec/infer",
    )
    assert status == 200, body
    data: list[float] = json.loads(body)["outputs"][0]["data"]
    return data


def test_inference_runs_on_the_loop_not_in_a_pool_thread(
    recorded: tuple[ModelServer, Threads, Threads],
) -> None:
    server, _, head = recorded
    head.clear()
    x = np.ones(16, np.float32)
    np.testing.assert_allclose(_post(server.url, x), x @ W, rtol=1e-6)
    np.testing.assert_allclose(_post(server.url, x, "/models/rec"), x @ W, rtol=1e-6)
    np.testing.assert_allclose(_oip(server.url, x), x @ W, rtol=1e-6)
    # the pickle routes and OIP infer run their request path on granian's loop thread
    assert head.names
    assert set(head.names) == {"granian-worker"}, head.names


def test_a_lone_request_on_an_idle_cheap_model_is_computed_on_the_loop(
    recorded: tuple[ModelServer, Threads, Threads],
) -> None:
    server, threads, _ = recorded
    x = np.full(16, 2, np.float32)
    for _ in range(3):  # the first batches measure the model's batch time
        _post(server.url, x)
    threads.clear()
    for _ in range(20):
        np.testing.assert_allclose(_post(server.url, x), x @ W, rtol=1e-6)
    assert threads.names.count("granian-worker") >= 15, threads.names
    pipe = server.repository.lease("rec", None)
    try:
        stats = pipe.model.pipe.stats().stages["matmul"]  # type: ignore[union-attr]
    finally:
        pipe.release()
    # computed inline or not, every item is counted as a batch of the model stage
    assert stats.items == stats.batch_sizes.get(1, 0) + sum(
        n * c for n, c in stats.batch_sizes.items() if n > 1
    )


def test_concurrent_requests_still_meet_in_one_batch(
    recorded: tuple[ModelServer, Threads, Threads],
) -> None:
    server, _, _ = recorded
    lease = server.repository.lease("rec", None)
    pipe = lease.model.pipe
    lease.release()
    assert pipe is not None
    gate = threading.Barrier(16)
    x = np.arange(16, dtype=np.float32)

    def one(i: int) -> None:
        gate.wait(10)
        np.testing.assert_allclose(_post(server.url, x + i), (x + i) @ W, rtol=1e-5)

    for _ in range(5):
        before = dict(pipe.stats().stages["matmul"].batch_sizes)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(16)))
        after = pipe.stats().stages["matmul"].batch_sizes
        if any(n > 1 and after.get(n, 0) > before.get(n, 0) for n in after):
            return
    raise AssertionError(f"no batch held items of several requests: {after}")


def test_the_request_timeout_holds_on_the_loop_and_others_are_served() -> None:
    pipe, gate, entered = gated_pipe()
    model = PipeModel(pipe, source="gated", inputs=[TensorSpec("x", (2,), "float32")])
    with running_server("gated", model=model, request_timeout=0.5) as server:
        try:
            t0 = time.monotonic()
            status, _, body = raw_post(server.url, pickle.dumps({"x": np.ones(2, np.float32)}))
            took = time.monotonic() - t0
            assert status == 504, body
            assert "request timeout" in error_of(body)["message"]
            assert 0.4 < took < 3.0, took
            assert entered.is_set()
            # the loop was never blocked: probes and the status page answer meanwhile
            status, _, _ = raw_post(server.url, None, path="/healthz", method="GET")
            assert status == 200
        finally:
            gate.set()


def test_a_client_that_goes_away_frees_its_slot_and_lease() -> None:
    pipe, gate, entered = gated_pipe()
    model = PipeModel(pipe, source="gated", inputs=[TensorSpec("x", (2,), "float32")])
    with running_server("gated", model=model) as server:
        body = pickle.dumps({"x": np.ones(2, np.float32)})
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-pickle\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert entered.wait(10)
        gate.set()  # the model answers after its client left
        admission = server.state.admission
        deadline = time.monotonic() + 10
        while admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert admission.in_flight == 0
        assert server.service is not None
        assert server.service.activity.in_flight == 0
        # and the server serves on
        status, _, _ = raw_post(server.url, body)
        assert status == 200


def test_a_model_without_a_pipe_runs_in_the_pool_of_threads() -> None:
    seen = Threads()

    def func(data: dict[str, Any]) -> dict[str, Any]:
        seen.note()
        return {k: np.asarray(v) * 2 for k, v in data.items()}

    before = set(threading.enumerate())
    with running_server("call", model=CallableModel(func, source="f"), threads=4) as server:
        for _ in range(5):
            status, _, body = raw_post(server.url, pickle.dumps({"a": np.ones(3)}))
            assert status == 200, body
            np.testing.assert_array_equal(pickle.loads(body)["a"], np.full(3, 2.0))
        assert seen.names
        assert all(n.startswith("studioserve-http") for n in seen.names)
        pool = {
            t.name
            for t in set(threading.enumerate()) - before
            if t.name.startswith("studioserve-http_")
        }
        assert len(pool) == 4, pool  # all started with the server, none per request


def test_keep_alive_connections_are_reused_for_hot_and_flask_routes(
    recorded: tuple[ModelServer, Threads, Threads],
) -> None:
    server, _, _ = recorded
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        body = pickle.dumps({"x": np.ones(16, np.float32)})
        for path, method in [("/", "POST"), ("/healthz", "GET"), ("/", "POST"), ("/", "GET")]:
            conn.request(method, path, body=body if method == "POST" else None)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, (path, resp.status)
            assert (resp.getheader("Connection") or "").lower() != "close"
    finally:
        conn.close()


def test_a_body_cut_short_is_a_bad_request_not_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _recording_model(Threads(), Threads())
    with running_server("cut", model=model) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        admission = server.state.admission
        deadline = time.monotonic() + 10
        while (admission.in_flight or not admission.admitted) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert admission.admitted == 1
        assert admission.in_flight == 0  # its slot, lease and activity are released
        assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
        np.testing.assert_allclose(_post(server.url, np.ones(16, np.float32)), np.ones(16) @ W)
