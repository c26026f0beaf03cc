"""Admission control: the controller alone, through the request path, and a real server
overloaded at 4x, 10x and 50x its capacity (every answer a 200 or a quick 503).

The controller tests decide the load themselves (a stub pipe's :class:`PipeLoad`, or a gated
pipe whose model call waits on an event), so they never depend on timing. The end-to-end
tests drive a real server from a separate client process (its own GIL) at a paced rate and
check bounds that hold with a wide margin on a loaded two-core machine.
"""

from __future__ import annotations

import base64
import gc
import http.client
import json
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from studioserve.errors import Overloaded, Saturated
from studioserve.models import IdentityModel, PipeModel
from studioserve.pipelines import ModelPipe, PipeLoad
from studioserve.serving.admission import (
    AdmissionController,
    default_max_in_flight,
    default_max_queue_time,
)
from studioserve.serving.inference import InferenceRequest, RequestHandler
from studioserve.serving.observer import Observers
from studioserve.serving.protocols import OipProtocol, PickleProtocol
from studioserve.serving.service import ModelService
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import encode_infer_request
from tests.helpers import gated_pipe, raw_post, running_server

# -- the controller alone ------------------------------------------------------------------------


class StubPipe:
    """A pipe stand-in whose load the test sets."""

    def __init__(self, load: PipeLoad | None = None) -> None:
        self.now = load or PipeLoad()

    def load(self) -> PipeLoad:
        return self.now


def controller(
    load: PipeLoad | None = None, *, max_queue_time: float = 0.2, max_in_flight: int | None = None
) -> tuple[AdmissionController, StubPipe]:
    pipe = StubPipe(load)
    ctl = AdmissionController(
        cast(ModelPipe, pipe), max_queue_time=max_queue_time, max_in_flight=max_in_flight
    )
    return ctl, pipe


def test_the_defaults() -> None:
    assert default_max_queue_time(60.0) == 1.0
    assert default_max_queue_time(2.0) == 0.5
    assert default_max_in_flight(32) == 28
    assert default_max_in_flight(16) == 14
    assert default_max_in_flight(4) == 3
    assert default_max_in_flight(2) == 1
    assert default_max_in_flight(1) == 1


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_queue_time"):
        AdmissionController(None, max_queue_time=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        AdmissionController(None, max_queue_time=1, max_in_flight=0)


def test_a_light_load_is_always_admitted() -> None:
    # work queued, but it all fits in the next round: nothing is ahead of a new request
    ctl, _ = controller(PipeLoad(queued=3, oldest_wait=0.1, batch_seconds=0.5, round_rows=8))
    for _ in range(16):
        ctl.admit()
    assert ctl.in_flight == 16
    for _ in range(16):
        ctl.release()
    assert ctl.snapshot() == {
        "max_in_flight": None,
        "max_queue_ms": 200.0,
        "in_flight": 0,
        "admitted": 16,
        "refused": 0,
        "refused_by": {"in_flight": 0, "queue_full": 0, "queue_time": 0},
    }


def test_requests_admitted_but_not_yet_queued_count_as_work_ahead() -> None:
    # the queue looks empty (the admitted requests are still being decoded): a burst must not
    # all get in on one look at it. 2 rows a round, 50 ms a batch, 0.2 s bound: 2 running and
    # 9 ahead (4 whole rounds) let the 12th in; the 13th would find 5 whole rounds ahead
    load = PipeLoad(batch_seconds=0.05, round_rows=2)
    ctl, _ = controller(load, max_queue_time=0.2)
    for _ in range(12):
        ctl.admit()
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.reason == "queue_time"
    assert ctl.expected_wait(load, 11) == pytest.approx(0.2)
    assert ctl.expected_wait(load, 12) == pytest.approx(0.25)
    assert ctl.expected_wait(load, 3) == 0.0  # one ahead: it shares the next round
    ctl.release()
    ctl.admit()


def test_before_the_first_batch_is_measured_two_rounds_are_admitted() -> None:
    ctl, pipe = controller(PipeLoad(round_rows=2))
    for _ in range(4):  # the running round and the next
        ctl.admit()
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.reason == "queue_time"
    assert e.value.retry_after == 1.0
    assert "not measured yet" in str(e.value)
    pipe.now = PipeLoad(round_rows=2, batch_seconds=0.01)  # measured: fast
    for _ in range(20):
        ctl.admit()


def test_a_pipe_without_stages_has_no_queue_estimate() -> None:
    ctl, _ = controller(PipeLoad())  # round_rows 0: its functions run in the request thread
    for _ in range(50):
        ctl.admit()


def test_the_cap_refuses_beyond_max_in_flight_until_a_slot_is_released() -> None:
    ctl, _ = controller(max_in_flight=2)
    ctl.admit()
    ctl.admit()
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.reason == "in_flight"
    assert e.value.http_status == 503
    assert e.value.error_type == "overloaded"
    assert isinstance(e.value, Overloaded)
    assert e.value.retry_after == 1.0
    assert "2 inference requests are in flight" in str(e.value)
    ctl.release()
    ctl.admit()  # room again
    assert (ctl.in_flight, ctl.admitted, ctl.refused) == (2, 3, 1)


def test_work_queued_beyond_the_queue_time_is_refused_with_its_retry_after() -> None:
    ctl, pipe = controller(PipeLoad(expected_wait=0.2, batch_seconds=0.05), max_queue_time=0.2)
    ctl.admit()  # exactly at the bound: admitted
    pipe.now = PipeLoad(expected_wait=2.3, oldest_wait=0.1, batch_seconds=0.05)
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.reason == "queue_time"
    assert e.value.retry_after == 3.0  # ceil(2.3 + 0.05): when the backlog has drained
    assert "2.30 s of work is queued" in str(e.value)
    assert ctl.snapshot()["refused_by"]["queue_time"] == 1
    assert ctl.in_flight == 1  # a refusal takes no slot


def test_an_item_waiting_longer_than_the_queue_time_and_a_batch_refuses() -> None:
    ctl, pipe = controller(PipeLoad(oldest_wait=0.29, batch_seconds=0.1), max_queue_time=0.2)
    ctl.admit()  # within the bound plus one batch time
    pipe.now = PipeLoad(oldest_wait=0.31, batch_seconds=0.1)
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.reason == "queue_time"


def test_a_full_queue_is_refused_before_submit() -> None:
    ctl, _ = controller(PipeLoad(queued=8, full=True))
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.reason == "queue_full"
    assert "input queue is full" in str(e.value)


def test_retry_after_is_capped() -> None:
    ctl, _ = controller(PipeLoad(expected_wait=500.0, batch_seconds=1.0))
    with pytest.raises(Saturated) as e:
        ctl.admit()
    assert e.value.retry_after == 30.0


def test_limits_set_later_apply_to_the_next_request() -> None:
    ctl, _ = controller(PipeLoad(expected_wait=0.5))
    ctl.max_queue_time = 1.0
    ctl.admit()
    ctl.max_in_flight = 1
    with pytest.raises(Saturated):
        ctl.admit()


def test_a_gated_pipe_refuses_once_its_oldest_item_waited_too_long() -> None:
    """The model stuck in one call: the estimate knows no batch time, the queue's age tells."""
    pipe, gate, entered = gated_pipe(max_batch_size=2)
    ctl = AdmissionController(pipe, max_queue_time=0.3)
    try:
        held = pipe.submit(np.zeros(1))
        assert entered.wait(10)  # the worker is inside the model call
        queued = [pipe.submit(np.zeros(1)) for _ in range(3)]
        ctl.admit()  # just queued: well within the bound
        for _ in range(1000):  # bounded: until the oldest item has waited past the bound
            if pipe.load().oldest_wait > 0.3:
                break
            time.sleep(0.005)
        with pytest.raises(Saturated) as e:
            ctl.admit()
        assert e.value.reason == "queue_time"
        gate.set()
        for f in [held, *queued]:
            f.result(10)
        ctl.admit()  # drained: admitted again
        assert (ctl.admitted, ctl.refused) == (2, 1)
    finally:
        gate.set()
        pipe.close()


# -- through the request path ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    def on_request(self, route: str, status: int, seconds: float) -> None:
        self.statuses.append(status)

    def on_batch(self, event: Any) -> None:
        pass


@pytest.fixture
def gated() -> Iterator[tuple[ModelService, threading.Event, threading.Event]]:
    pipe, gate, entered = gated_pipe(max_batch_size=4)
    model = PipeModel(pipe, source="gated")
    service = ModelService(model, request_timeout=10, name="gated")
    model.start()
    service.ready = True
    yield service, gate, entered
    gate.set()
    service.close()


def _pickle_request(reads: list[int]) -> InferenceRequest:
    body = pickle.dumps({"x": np.ones(1, np.float32)})

    def read() -> bytes:
        reads.append(1)
        return body

    return InferenceRequest(len(body), read)


def test_a_refused_request_is_a_503_with_retry_after_counted_but_not_activity(
    gated: tuple[ModelService, threading.Event, threading.Event],
) -> None:
    service, gate, entered = gated
    recorder = Recorder()
    observers = Observers(service.model.pipe)
    observers.attach(recorder)
    admission = AdmissionController(service.model.pipe, max_queue_time=1.0, max_in_flight=1)
    handler = RequestHandler(
        service, PickleProtocol(), max_body=4096, observers=observers, admission=admission
    )
    reads: list[int] = []
    replies: list[Any] = []
    held = threading.Thread(target=lambda: replies.append(handler.handle(_pickle_request(reads))))
    held.start()
    try:
        assert entered.wait(10)  # the one admitted request waits in the model
        accepted = service.activity.accepted
        refused = handler.handle(_pickle_request(reads))
        assert refused.status == 503
        headers = dict(refused.headers)
        assert headers["Retry-After"] == "1"
        error = json.loads(refused.body)["error"]
        assert error["type"] == "overloaded"
        assert "saturated" in error["message"]
        assert service.activity.accepted == accepted  # the inactivity timer did not see it
        assert len(reads) == 2  # its body was drained (the connection stays usable), not decoded
    finally:
        gate.set()
        held.join(10)
    assert replies[0].status == 200
    assert recorder.statuses == [503, 200]
    assert admission.snapshot()["refused_by"]["in_flight"] == 1
    assert admission.in_flight == 0
    assert handler.handle(_pickle_request(reads)).status == 200  # the slot came back


def test_oip_refusals_are_503_with_retry_after_too(
    gated: tuple[ModelService, threading.Event, threading.Event],
) -> None:
    service, gate, _ = gated
    admission = AdmissionController(service.model.pipe, max_queue_time=1.0, max_in_flight=1)
    protocol = OipProtocol(service, "gated", 4096)
    handler = RequestHandler(
        service, protocol, max_body=4096, observers=Observers(None), admission=admission
    )
    body, headers = encode_infer_request({"x": np.ones((1,), np.float32)})
    request = InferenceRequest(len(body), lambda: body, headers.get, model="gated")
    admission.admit()  # someone else holds the only slot
    reply = handler.handle(request)
    assert reply.status == 503
    assert dict(reply.headers)["Retry-After"] == "1"
    assert "saturated" in json.loads(reply.body)["error"]
    admission.release()
    gate.set()
    assert handler.handle(request).status == 200
    assert admission.in_flight == 0


def test_a_request_that_fails_gives_its_slot_back() -> None:
    service = ModelService(IdentityModel(source="identity"))
    service.ready = True
    admission = AdmissionController(None, max_queue_time=1.0, max_in_flight=1)
    handler = RequestHandler(
        service, PickleProtocol(), max_body=4096, observers=Observers(None), admission=admission
    )
    bad = InferenceRequest(3, lambda: b"\x80\x04x", lambda name: None)
    for _ in range(3):
        assert handler.handle(bad).status == 400
    assert admission.in_flight == 0
    assert admission.refused == 0


def test_the_size_limit_and_readiness_come_before_admission() -> None:
    service = ModelService(IdentityModel(source="identity"))
    admission = AdmissionController(None, max_queue_time=1.0, max_in_flight=1)
    handler = RequestHandler(
        service, PickleProtocol(), max_body=10, observers=Observers(None), admission=admission
    )
    admission.admit()  # saturated
    assert handler.handle(InferenceRequest(5, lambda: b"")).status == 503  # not ready
    service.ready = True
    assert handler.handle(InferenceRequest(50, lambda: b"")).status == 413
    assert admission.refused == 0


# -- a real server, overloaded -------------------------------------------------------------------

#: the model: 50 ms per batch of at most 2 items, so its capacity is 40 requests per second
BATCH_SECONDS = 0.05
MAX_BATCH = 2
CAPACITY = MAX_BATCH / BATCH_SECONDS
#: the request timeout; its quarter is the default bounded queue time (0.2 s)
REQUEST_TIMEOUT = 0.8
LOAD_SECONDS = 2.5

# An open-loop client, in its own process so that its GIL is not the server's: it sends
# ``rate`` requests per second for ``seconds``, each at its scheduled time whatever the answers
# before it, over at most ``conns`` kept-alive connections (a request finding none free waits
# for one: it is then late, which the results record). Each result is
# ``[status or error name, seconds from send to answer, Retry-After, seconds late]``.
_CLIENT = r"""
import asyncio, base64, json, sys, time
port, rate, seconds, conns = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
body = base64.b64decode(sys.argv[5])
request = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-pickle\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
results = []
async def exchange(conn):
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    keep = headers.get("connection", "").lower() != "close"
    return status, headers.get("retry-after"), keep
async def one(pool, due):
    conn = await pool.get()
    t0 = time.perf_counter()
    try:
        if conn is None:
            conn = await asyncio.open_connection("127.0.0.1", port)
        status, retry, keep = await exchange(conn)
        results.append([status, time.perf_counter() - t0, retry, t0 - due])
        if not keep:
            conn[1].close()
            conn = None
    except Exception as e:
        results.append([type(e).__name__, time.perf_counter() - t0, None, t0 - due])
        if conn is not None:
            conn[1].close()
        conn = None
    pool.put_nowait(conn)
async def main():
    pool = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(None)
    loop_start = time.perf_counter() + 0.1
    tasks, n, total = [], 0, int(rate * seconds)
    while n < total:
        now = time.perf_counter()
        due = loop_start + n / rate
        if due > now:
            await asyncio.sleep(min(due - now, 0.005))
            continue
        while n < total and loop_start + n / rate <= now:
            tasks.append(asyncio.create_task(one(pool, loop_start + n / rate)))
            n += 1
    await asyncio.gather(*tasks)
    while not pool.empty():
        c = pool.get_nowait()
        if c is not None:
            c[1].close()
    return time.perf_counter() - loop_start
took = asyncio.run(main())
json.dump({"seconds": took, "results": results}, sys.stdout)
"""


def _slow(batch: np.ndarray) -> np.ndarray:
    time.sleep(BATCH_SECONDS)
    return batch + 1


def _slow_model() -> PipeModel:
    pipe = ModelPipe(name="slow")
    pipe.add(_slow, max_batch_size=MAX_BATCH)
    return PipeModel(pipe, source="slow")


def _rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize()


def _drive(
    port: int, rate: float, seconds: float, conns: int
) -> tuple[float, list[tuple[Any, float, Any, float]]]:
    """``(seconds from the first send to the last answer, the results)``, see ``_CLIENT``."""
    body = base64.b64encode(pickle.dumps({"x": np.ones(1, np.float32)})).decode()
    args = [str(port), str(rate), str(seconds), str(conns), body]
    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT, *args],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    out = json.loads(proc.stdout)
    return out["seconds"], [tuple(r) for r in out["results"]]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Keep the objects earlier tests left (Keras, TensorFlow) out of the garbage collector's
    scans while the server runs here: a full collection of that heap pauses this process, the
    server in it included, for a quarter of a second, which no latency bound survives."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_load(times_capacity: float, conns: int = 64) -> dict[str, Any]:
    """Serve the slow model and drive it at ``times_capacity``; what came back, and RSS."""
    with running_server(
        model=_slow_model(),
        request_timeout=REQUEST_TIMEOUT,
        max_in_flight=default_max_in_flight(32),  # what studio serve derives from --threads 32
    ) as server:
        rss: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                value = _rss_bytes()
                if value is not None:
                    rss.append(value)

        before = _rss_bytes()
        sampler = threading.Thread(target=sample, name="rss-sampler")
        sampler.start()
        try:
            took, results = _drive(server.port, times_capacity * CAPACITY, LOAD_SECONDS, conns)
        finally:
            done.set()
            sampler.join(5)
        snapshot = server.state.admission.snapshot()
        accepted = server.state.service.activity.accepted
    statuses: dict[Any, int] = {}
    for r in results:
        statuses[r[0]] = statuses.get(r[0], 0) + 1
    ok = [r[1] for r in results if r[0] == 200]
    shed = [r[1] for r in results if r[0] == 503]
    report = {
        "x": times_capacity,
        "statuses": statuses,
        "ok_per_s": round(len(ok) / took, 1),
        "p99_200_ms": round(_p99(ok) * 1000, 1) if ok else None,
        "p99_503_ms": round(_p99(shed) * 1000, 1) if shed else None,
        "p99_late_ms": round(_p99([r[3] for r in results]) * 1000, 1),
        "rss_growth_mb": round((max(rss) - before) / 2**20, 1) if rss and before else None,
        "admission": snapshot,
        "accepted": accepted,
        "retry_after": {r[2] for r in results if r[0] == 503},
    }
    print(report)  # shown with -s: the numbers behind the bounds below
    return report


@pytest.mark.usefixtures("frozen_heap")
@pytest.mark.parametrize("times_capacity", [4, 10, 50])
def test_overload_gives_only_200s_and_quick_503s_with_bounded_latency_and_memory(
    times_capacity: float,
) -> None:
    report = _run_load(times_capacity)
    statuses = report["statuses"]
    # the load was offered as planned (an open loop: requests sent on time, whatever came back)
    assert sum(statuses.values()) == int(times_capacity * CAPACITY * LOAD_SECONDS)
    assert report["p99_late_ms"] < 250, report
    # only 200s and 503s: no 504 (nothing admitted waits out its timeout), no connection errors
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.get(503, 0) > 0
    assert report["retry_after"] == {"1"}  # whole seconds, at least 1
    # the model is kept busy: at least half its capacity is served
    assert report["ok_per_s"] >= 0.5 * CAPACITY, report
    # 200s wait at most the bounded queue time plus the batch running and their own, with room
    queue_time = default_max_queue_time(REQUEST_TIMEOUT)
    assert report["p99_200_ms"] < (queue_time + 4 * BATCH_SECONDS) * 1000, report
    # refusals are answered at once, not after a wait in the listener's backlog
    assert report["p99_503_ms"] < 100, report
    # refused requests are counted, and not as activity (the inactivity timer)
    assert report["admission"]["refused"] == statuses[503]
    assert report["accepted"] == statuses.get(200, 0)
    # memory stays bounded: the pipe queue and the admitted requests are bounded
    if report["rss_growth_mb"] is not None:
        assert report["rss_growth_mb"] < 64, report


@pytest.mark.usefixtures("frozen_heap")
def test_below_capacity_nothing_is_refused() -> None:
    report = _run_load(0.5)
    assert report["statuses"] == {200: report["statuses"].get(200, 0)}
    assert report["statuses"][200] >= 0.8 * 0.5 * CAPACITY * LOAD_SECONDS
    assert report["admission"]["refused"] == 0


def test_the_bytes_of_bodies_in_flight_are_bounded() -> None:
    ctl = AdmissionController(None, max_queue_time=1.0)
    ctl.max_body_bytes = 100
    ctl.admit(None, 150)  # alone: always admitted, however large (it passed --max-body)
    with pytest.raises(Saturated, match="bytes of request bodies are in flight") as refused:
        ctl.admit(None, 1)
    assert refused.value.retry_after >= 1
    ctl.release(None, 150)
    ctl.admit(None, 60)
    ctl.admit(None, 40)
    with pytest.raises(Saturated):
        ctl.admit(None, 1)
    ctl.release(None, 40)
    ctl.admit(None, 40)  # what was released is free again
    assert ctl.snapshot()["refused_by"]["in_flight"] == 2
    assert ctl.in_flight == 2


def test_on_the_loop_a_refused_body_is_dropped_and_the_connection_kept() -> None:
    pipe, gate, entered = gated_pipe()
    model = PipeModel(pipe, source="gated", inputs=[TensorSpec("x", (2,), "float32")])
    body = pickle.dumps({"x": np.ones(2, np.float32)})
    with running_server("gated", model=model) as server:
        admission = server.state.admission
        assert admission.max_body_bytes is not None  # set by the server
        admission.max_body_bytes = len(body)  # one body in flight at a time
        try:
            held = threading.Thread(target=raw_post, args=(server.url, body))
            held.start()
            assert entered.wait(10)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("POST", "/", body=body)
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            assert resp.status == 503
            assert resp.getheader("Retry-After")
            assert "bytes of request bodies are in flight" in answer["error"]["message"]
            gate.set()
            held.join(30)
            conn.request("POST", "/", body=body)  # the same connection serves on
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
            conn.close()
        finally:
            gate.set()
