"""The drain under keep-alive load, and the restart after it.

32 client threads, each reusing one HTTP/1.1 connection as real clients do (a new one after a
response with ``Connection: close``), send inference requests while the server is stopped as
SIGTERM stops it (``request_stop`` then ``close``). Every request sent must get an answer (200,
or 503 with ``Connection: close`` once the drain began), none a closed socket; a request the
server can no longer take fails at connect (refused), before anything is sent. Then another
server binds the same port at once, though the stopped one's connections sit in TIME-WAIT.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import pickle
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from studioserve.config import ServeConfig
from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer
from studioserve.tensors import TensorSpec
from tests.helpers import start_cli, time_wait_on

CLIENTS = 32
BODY = pickle.dumps({"x": np.zeros((1, 4), np.float32)})
HEADERS = {"Content-Type": "application/x-pickle"}
#: what a request that got no answer raises (sent on a connection the server closed)
NO_ANSWER = (http.client.RemoteDisconnected, ConnectionError, socket.timeout)


def _model() -> PipeModel:
    pipe = ModelPipe(name="plus-one")
    pipe.add(lambda x: x + 1, max_batch_size=32, name="plus")
    return PipeModel(
        pipe,
        source="drain-test",
        inputs=[TensorSpec("x", (4,), "float32")],
        outputs=[TensorSpec("x", (4,), "float32")],
    )


@dataclass
class Load:
    """Closed-loop keep-alive clients and what they saw.

    :param retry_after: honour a 503's Retry-After (wait before the next request), as a
        well-behaved client does; False: send the next request at once, on a new connection.
    """

    port: int
    seconds: float
    retry_after: bool = True
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    #: (reused connection?, error, seconds since the stop began) of each request with no answer
    dropped: list[tuple[bool, str, float]] = field(default_factory=list)
    refused: int = 0
    #: 503s of the drain ("not_ready") that came without Connection: close
    kept_open_503: int = 0
    stop_began: float = float("inf")
    gone: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int = CLIENTS) -> None:
        ready = threading.Barrier(clients + 1)
        for _ in range(clients):
            t = threading.Thread(target=self._client, args=(ready,), daemon=True)
            t.start()
            self._threads.append(t)
        ready.wait(10)

    def join(self) -> None:
        for t in self._threads:
            t.join(self.seconds + 30)
        assert not any(t.is_alive() for t in self._threads)

    def _client(self, ready: threading.Barrier) -> None:
        ready.wait(10)
        deadline = time.monotonic() + self.seconds
        conn: http.client.HTTPConnection | None = None
        reused = False
        while time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                try:
                    conn.connect()
                except OSError:  # the server stopped listening: nothing was sent
                    conn = None
                    with self._lock:
                        self.refused += 1
                    if self.gone.is_set():
                        return
                    time.sleep(0.01)
                    continue
                reused = False
            try:
                conn.request("POST", "/", body=BODY, headers=HEADERS)
                resp = conn.getresponse()
                body = resp.read()
            except NO_ANSWER as e:
                with self._lock:
                    since = time.monotonic() - self.stop_began
                    self.dropped.append((reused, type(e).__name__, round(since, 3)))
                conn.close()
                conn = None
                continue
            with self._lock:
                self.statuses[resp.status] += 1
                # a drain's 503 must close the connection (an overload 503 need not)
                if resp.status == 503 and not resp.will_close and _draining(body):
                    self.kept_open_503 += 1
            if resp.will_close:
                conn.close()
                conn = None
            else:
                reused = True
            if resp.status == 503 and self.retry_after:
                wait = float(resp.getheader("Retry-After") or 1)
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        if conn is not None:
            conn.close()

    def summary(self) -> str:
        return (
            f"{sum(self.statuses.values())} answered {dict(self.statuses)}, "
            f"{len(self.dropped)} dropped {self.dropped[:8]}, {self.refused} refused at connect"
        )


def _idle_connection(port: int) -> socket.socket:
    """A kept-alive connection that has had one answer and then sits idle."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/", body=BODY, headers=HEADERS)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert not resp.will_close
    assert conn.sock is not None
    sock: socket.socket = conn.sock
    return sock


def _serve(kind: str, port: int = 0) -> ModelServer:
    config = ServeConfig(key="tiny", port=port, killafter=0)
    return ModelServer(config, model=_model(), http_server=kind).start()


@pytest.mark.parametrize("kind", ["granian", "waitress"])
def test_sigterm_under_keep_alive_load_drops_no_request_and_the_port_is_free_at_once(
    kind: str,
) -> None:
    server = _serve(kind)
    port = server.port
    load = Load(port, seconds=8.0)
    idle = [_idle_connection(port) for _ in range(4)]  # a pool's spare connections
    try:
        load.start()
        _served_some(load)
        load.stop_began = time.monotonic()
        server.request_stop("SIGTERM")
        server.close()
        load.gone.set()
        stop_took = time.monotonic() - load.stop_began
    finally:
        server.close()
        load.gone.set()
        load.join()
    print(f"{kind}: stop took {stop_took:.2f}s; {load.summary()}")
    assert load.dropped == [], load.summary()
    assert load.statuses[200] > 100, load.summary()
    assert load.statuses[503] >= 1, load.summary()  # the drain was under way while they sent
    assert set(load.statuses) <= {200, 503}, load.summary()
    assert load.kept_open_503 == 0, load.summary()
    assert stop_took < 5.0
    for sock in idle:  # closed by the server (FIN), not left open nor reset
        assert sock.recv(1) == b""
        sock.close()
    # the connections the server closed wait in TIME-WAIT on its port
    waiting = time_wait_on(port)
    assert waiting is None or waiting > 0, "no TIME-WAIT on the port: the restart proves nothing"
    again = _serve(kind, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/", body=BODY, headers=HEADERS)
        resp = conn.getresponse()
        assert resp.status == 200
        np.testing.assert_array_equal(pickle.loads(resp.read())["x"], np.ones((1, 4)))
        conn.close()
    finally:
        again.close()


@pytest.mark.parametrize("kind", ["granian", "waitress"])
def test_no_request_on_a_kept_alive_connection_is_dropped_even_by_impatient_clients(
    kind: str,
) -> None:
    """Clients that ignore Retry-After reconnect at once after each 503 all through the grace;
    none of the requests they send on a reused connection goes unanswered. (A few of the new
    connections they open the instant the listener closes are reset from the kernel's accept
    queue: those requests never reached the server, as with a refused connect a moment later.)
    """
    server = _serve(kind)
    load = Load(server.port, seconds=6.0, retry_after=False)
    try:
        load.start()
        _served_some(load)
        load.stop_began = time.monotonic()
        server.request_stop("SIGTERM")
        server.close()
        load.gone.set()
    finally:
        server.close()
        load.gone.set()
        load.join()
    print(f"{kind}: {load.summary()}")
    assert [d for d in load.dropped if d[0]] == [], load.summary()
    assert load.statuses[200] > 100, load.summary()
    assert load.statuses[503] > 0, load.summary()
    assert load.kept_open_503 == 0, load.summary()


def _served_some(load: Load, count: int = 150, timeout: float = 10.0) -> None:
    """Let the load run until ``count`` requests were answered 200 (about a second here; more
    on a loaded machine), so the drain always starts under load."""
    deadline = time.monotonic() + timeout
    time.sleep(1.0)
    while load.statuses[200] < count and time.monotonic() < deadline:
        time.sleep(0.02)


def _draining(body: bytes) -> bool:
    try:
        return bool(json.loads(body)["error"]["type"] == "not_ready")
    except (ValueError, KeyError, TypeError):
        return True  # not our error body: count it


# -- the real command ------------------------------------------------------------------------

PLUS_ONE_WRAPPER = """
def create_model(modeldir):
    def plus_one(data):
        return {k: v + 1 for k, v in data.items()}
    return plus_one
"""


@pytest.fixture
def plus_one_experiment(tmp_path: Path) -> tuple[dict[str, str], Path]:
    from studioserve.store.local import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore(tmp_path / "store")
    store.add("plus", src)
    wrapper = tmp_path / "plus_wrapper.py"
    wrapper.write_text(PLUS_ONE_WRAPPER)
    return dict(os.environ, STUDIO_STORE=store.url), wrapper


def test_studio_serve_sigterm_under_keep_alive_load_exits_0_and_drops_nothing(
    plus_one_experiment: tuple[dict[str, str], Path],
) -> None:
    env, wrapper = plus_one_experiment
    proc, url = start_cli(["plus", "-w", str(wrapper), "--port", "0", "--killafter", "0"], env)
    try:
        load = Load(int(url.rsplit(":", 1)[1]), seconds=10.0)
        load.start()
        time.sleep(1.0)
        load.stop_began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        load.gone.set()
        load.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    print(load.summary())
    assert code == 0, err
    assert load.dropped == [], load.summary()
    assert load.statuses[200] > 50, load.summary()
    assert set(load.statuses) <= {200, 503}, load.summary()
    assert load.kept_open_503 == 0, load.summary()
