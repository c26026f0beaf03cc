"""``studio serve --backend ray`` as a user runs it: its own local Ray instance, the inactivity
timer and SIGTERM, and nothing left running on this machine after either exit.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.helpers import raw_post, start_cli, stop_cli
from tests.rayserve.conftest import SLOW_WRAPPER, free_port, wait_for

pytestmark = pytest.mark.allow_thread_leak


def _ray_processes() -> list[str]:
    """Ray's own daemons running on this machine (its GCS and raylet)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "gcs_server" in line or "/raylet" in line]


@pytest.fixture
def no_ray_running() -> None:
    wait_for(lambda: not _ray_processes(), 30, f"earlier Ray daemons to go: {_ray_processes()}")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def test_killafter_deletes_the_application_and_stops_the_local_ray(
    onnx_store: tuple[str, np.ndarray], no_ray_running: None
) -> None:
    store, w = onnx_store
    port = free_port()
    args = ["mlp", "--backend", "ray", "--store", store, "--port", str(port), "--killafter", "8"]
    proc, url = start_cli(args, _env())
    try:
        assert url == f"http://127.0.0.1:{port}"
        x = np.ones(8, np.float32)
        status, _, body = raw_post(url, pickle.dumps({"a": x}))
        assert status == 200, body
        out = pickle.loads(body)  # noqa: S301 - our own server's answer
        np.testing.assert_allclose(out["a"], x @ w, rtol=1e-5, atol=1e-5)
        # within --killafter of that request: the application is still there
        listed = subprocess.run(
            [sys.executable, "-m", "studioserve", "ray", "status", "--json"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        (app,) = json.loads(listed.stdout)
        assert app["name"] == "studioserve"
        assert app["url"] == url
        assert app["models"]["mlp"]["replicas"] == {"RUNNING": 1}
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert "--killafter" in err
    assert "deleted the Ray Serve application" in err
    wait_for(lambda: not _ray_processes(), 60, f"Ray's daemons to stop: {_ray_processes()}")


def test_sigterm_finishes_the_request_in_flight_then_exits_0_leaving_nothing(
    onnx_store: tuple[str, np.ndarray], no_ray_running: None
) -> None:
    store, _ = onnx_store
    port = free_port()
    args = ["slow", "--backend", "ray", "--wrapper", SLOW_WRAPPER, "--store", store]
    proc, url = start_cli([*args, "--port", str(port), "--killafter", "0"], _env())
    answers: list[Any] = []
    try:
        slow = threading.Thread(
            target=lambda: answers.append(
                raw_post(url, pickle.dumps({"a": np.full(4, 5000.0, np.float32)}))
            )
        )
        slow.start()  # takes 3 s in the replica
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        slow.join(60)
        assert stop_cli(proc, timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    status, _, body = answers[0]
    assert status == 200, body
    np.testing.assert_allclose(pickle.loads(body)["a"], np.full(4, 10000.0))  # noqa: S301
    wait_for(lambda: not _ray_processes(), 60, f"Ray's daemons to stop: {_ray_processes()}")
