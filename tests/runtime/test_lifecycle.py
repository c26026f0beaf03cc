"""--killafter, graceful drain, SIGTERM: the lifecycle, in-process and as `studio serve`."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.client import Client
from studioserve.models import IdentityModel, PipeModel
from tests.helpers import gated_pipe, raw_post, running_server, start_cli


def test_killafter_waits_for_the_in_flight_request_then_exits() -> None:
    pipe, gate, entered = gated_pipe()
    loaded = PipeModel(pipe, source="test")
    killafter = 0.3
    with running_server(model=loaded, killafter=killafter) as server:
        results: list[Any] = []
        with Client(server.url) as client:
            worker = threading.Thread(
                target=lambda: results.append(client.predict({"a": np.zeros((1, 2))}))
            )
            worker.start()
            assert entered.wait(30)
            # idle time far beyond --killafter passes while the request is in flight
            assert not server.wait(timeout=4 * killafter)
            assert server.service is not None
            assert server.service.activity.in_flight == 1
            gate.set()
            worker.join(30)
        np.testing.assert_array_equal(results[0]["a"], np.ones((1, 2)))
        assert server.wait(timeout=30), "the inactivity timer never fired"
        assert server.stop_reason == "inactivity"


def test_probes_do_not_keep_the_server_alive() -> None:
    loaded = IdentityModel(source="test")
    with running_server(model=loaded, killafter=0.5, token="tok") as server:
        stop_probing = threading.Event()

        def probe() -> None:
            while not stop_probing.is_set():
                raw_post(server.url, None, path="/healthz", method="GET")
                raw_post(server.url, b"x", path="/")  # refused: no token
                stop_probing.wait(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            assert server.wait(timeout=30), "probes kept the server alive"
        finally:
            stop_probing.set()
            prober.join()
        assert server.stop_reason == "inactivity"
        assert server.service is not None
        assert server.service.activity.accepted == 0


def test_draining_server_refuses_new_requests_with_503() -> None:
    pipe, gate, entered = gated_pipe()
    loaded = PipeModel(pipe, source="test")
    with running_server(model=loaded) as server, Client(server.url) as client:
        results: list[Any] = []
        worker = threading.Thread(
            target=lambda: results.append(client.predict({"a": np.zeros((1, 2))}))
        )
        worker.start()
        assert entered.wait(30)
        closer = threading.Thread(target=server.close)
        closer.start()
        while server.service is not None and server.service.ready:
            time.sleep(0.005)
        status, headers, _ = raw_post(server.url, b"\x80\x05N.", path="/")
        assert status == 503
        assert "retry-after" in headers
        gate.set()
        worker.join(30)
        closer.join(30)
        np.testing.assert_array_equal(results[0]["a"], np.ones((1, 2)))


# -- the real command ------------------------------------------------------------------------

SLOW_WRAPPER = """
import threading, time
entered = threading.Event()
def create_model(modeldir):
    def slow(data):
        time.sleep(float(data.get("sleep", 0)))
        return {k: v for k, v in data.items()}
    return slow
"""


@pytest.fixture
def slow_experiment(tmp_path: Path) -> tuple[dict[str, str], Path]:
    from studioserve.store.local import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore(tmp_path / "store")
    store.add("slow", src)
    wrapper = tmp_path / "slow_wrapper.py"
    wrapper.write_text(SLOW_WRAPPER)
    env = dict(os.environ, STUDIO_STORE=store.url)
    return env, wrapper


def test_cli_exits_0_after_killafter(slow_experiment: tuple[dict[str, str], Path]) -> None:
    env, wrapper = slow_experiment
    proc, url = start_cli(["slow", "-w", str(wrapper), "--port", "0", "--killafter", "1"], env)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sigterm_drains_the_in_flight_request(
    slow_experiment: tuple[dict[str, str], Path],
) -> None:
    env, wrapper = slow_experiment
    proc, url = start_cli(["slow", "-w", str(wrapper), "--port", "0", "--killafter", "0"], env)
    try:
        results: list[Any] = []
        with Client(url) as client:
            worker = threading.Thread(
                target=lambda: results.append(client.predict({"sleep": 2.0, "x": 5}))
            )
            worker.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, _, body = raw_post(
                    url, None, path="/", method="GET", headers={"Accept": "application/json"}
                )
                if b'"in_flight": 1' in body:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            worker.join(60)
        assert results == [{"sleep": 2.0, "x": 5}]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
