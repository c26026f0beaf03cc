"""The ASGI front door (studioserve.http.asgi) under a real ASGI server, uvicorn, on loopback.

It is what Ray Serve's HTTP proxy calls (tests/rayserve go through Ray itself); here the same
app runs under uvicorn, so its own rules are checked directly: inference on the loop through
the one request path (answers, batching), the rest through Flask (status page, probes, 401),
the body limits (a declared length over --max-body is 413 unread; a chunked body over it is
413; a body shorter than its Content-Length is a 400) and the drain's Connection: close.
"""

from __future__ import annotations

import http.client
import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from studioserve.http.app import drain_of
from studioserve.http.asgi import AsgiApp
from studioserve.http.state import state_of
from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer
from studioserve.tensors import TensorSpec
from tests.helpers import raw_post, running_server

uvicorn = pytest.importorskip("uvicorn")

W = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64
TOKEN = "asgi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024


def _model() -> PipeModel:
    pipe = ModelPipe(name="asgi")

    def matmul(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.005)  # long enough that concurrent requests queue up behind a batch
        return batch @ W

    pipe.add(matmul, max_batch_size=32, name="matmul")
    return PipeModel(
        pipe,
        source="asgi-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
    )


@pytest.fixture(scope="module")
def asgi_server() -> Iterator[tuple[ModelServer, AsgiApp, str]]:
    with running_server(model=_model(), token=TOKEN, max_body=MAX_BODY) as server:
        app = AsgiApp(server.app, state_of(server.app), drain_of(server.app), threads=4)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        runner = uvicorn.Server(config)
        thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not runner.started and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            yield server, app, f"http://127.0.0.1:{port}"
        finally:
            runner.should_exit = True
            thread.join(10)
            sock.close()
            app.close()


def test_inference_answers_and_concurrent_requests_batch(
    asgi_server: tuple[ModelServer, AsgiApp, str],
) -> None:
    server, _, url = asgi_server
    x = np.random.default_rng(0).normal(size=16).astype(np.float32)
    status, _, body = raw_post(url, pickle.dumps({"a": x}), AUTH)
    assert status == 200, body
    np.testing.assert_allclose(pickle.loads(body)["a"], x @ W, rtol=1e-5)  # noqa: S301
    status, _, body = raw_post(url, pickle.dumps({"a": x}), AUTH, path="/models/exp")
    assert status == 200
    pipe = server.state.service.model.pipe
    assert pipe is not None
    before = pipe.stats().stages["matmul"].batches

    def one(_: int) -> int:
        return raw_post(url, pickle.dumps({"a": x}), AUTH)[0]

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(160))) == {200}
    batches = pipe.stats().stages["matmul"].batches - before
    assert batches < 120  # items of concurrent requests met in batches


def test_the_rest_is_flask_with_the_same_auth(
    asgi_server: tuple[ModelServer, AsgiApp, str],
) -> None:
    _, _, url = asgi_server
    x = np.zeros(16, np.float32)
    assert raw_post(url, pickle.dumps({"a": x}))[0] == 401
    assert raw_post(url, None, path="/healthz", method="GET")[0] == 200
    assert raw_post(url, None, path="/readyz", method="GET")[0] == 200
    status, _, body = raw_post(url, None, {**AUTH, "Accept": "application/json"}, method="GET")
    assert status == 200
    assert json.loads(body)["models"][0]["name"] == "exp"
    status, _, body = raw_post(url, None, AUTH, path="/v2/models/exp", method="GET")
    assert status == 200
    assert json.loads(body)["name"] == "exp"


def _chunked(url: str, parts: list[bytes]) -> tuple[int, bytes]:
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/", body=iter(parts), headers=AUTH, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_body_limits_hold(asgi_server: tuple[ModelServer, AsgiApp, str]) -> None:
    _, _, url = asgi_server
    status, _, body = raw_post(url, b"x" * (MAX_BODY + 1), AUTH)
    assert status == 413, body
    status, body = _chunked(url, [b"y" * 4096] * (MAX_BODY // 4096 + 2))
    assert status == 413, body
    good = pickle.dumps({"a": np.ones(16, np.float32)})
    status, body = _chunked(url, [good[:10], good[10:]])
    assert status == 200, body
    # a body that ends before its Content-Length: a 400, and the server keeps serving
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 1000\r\n\r\n"
            + good[:20]
        )
        s.shutdown(socket.SHUT_WR)
        answer = s.recv(65536)
    assert not answer or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert raw_post(url, good, AUTH)[0] == 200


def test_a_drain_closes_connections(asgi_server: tuple[ModelServer, AsgiApp, str]) -> None:
    server, app, url = asgi_server
    app.drain.start()
    try:
        _, headers, _ = raw_post(url, None, path="/healthz", method="GET")
        assert headers.get("connection") == "close"
        status, headers, _ = raw_post(url, pickle.dumps({"a": np.ones(16, np.float32)}), AUTH)
        assert status == 200
        assert headers.get("connection") == "close"
    finally:
        app.drain.draining = False
