"""Helpers shared by the server tests: real servers on loopback, raw HTTP requests."""

from __future__ import annotations

import http.client
import json
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import numpy as np

from studioserve.config import ServeConfig
from studioserve.models import Model
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer


@contextmanager
def running_server(
    key: str = "exp",
    *,
    model: Model | None = None,
    http_server: str = "granian",
    max_in_flight: int | None = None,
    max_queue_time: float | None = None,
    **config: Any,
) -> Iterator[ModelServer]:
    """A real studioserve server on 127.0.0.1, an ephemeral port, stopped and joined after.

    ``max_in_flight`` and ``max_queue_time`` set the admission controller's limits
    (:mod:`studioserve.serving.admission`) once the server is built, before any request.
    """
    cfg = ServeConfig(key=key, port=0, killafter=config.pop("killafter", 0), **config)
    server = ModelServer(cfg, model=model, http_server=http_server)
    server.start()
    admission = server.state.admission
    if max_in_flight is not None:
        admission.max_in_flight = max_in_flight
    if max_queue_time is not None:
        admission.max_queue_time = max_queue_time
    try:
        yield server
    finally:
        server.close()


def raw_post(
    url: str,
    body: bytes | None,
    headers: dict[str, str] | None = None,
    path: str = "/",
    method: str = "POST",
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns (status, headers, body)."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_pickle(url: str, data: Any, headers: dict[str, str] | None = None) -> Any:
    return raw_post(url, pickle.dumps(data), headers)


def error_of(body: bytes) -> dict[str, Any]:
    """The ``error`` object of a JSON error body."""
    err: dict[str, Any] = json.loads(body)["error"]
    return err


def start_cli(
    args: list[str], env: dict[str, str], command: str = "serve"
) -> tuple[subprocess.Popen[str], str]:
    """Run ``python -m studioserve <command> ARGS`` and wait for the URL it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "studioserve", command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"studio {command} did not start: {err}")


def stop_cli(proc: subprocess.Popen[str], timeout: float = 60) -> int:
    """SIGTERM the process and return its exit code (killing it if it hangs)."""
    try:
        if proc.poll() is None:
            proc.terminate()
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def gated_pipe(
    *, queue_size: int = 1024, max_batch_size: int = 8
) -> tuple[ModelPipe, threading.Event, threading.Event]:
    """A pipe whose batched ``x + 1`` waits on ``gate``; ``entered`` is set once it is called."""
    gate, entered = threading.Event(), threading.Event()

    def fn(batch: np.ndarray) -> np.ndarray:
        entered.set()
        gate.wait(30)
        return batch + 1

    pipe = ModelPipe(queue_size=queue_size, name="gated")
    pipe.add(fn, max_batch_size=max_batch_size)
    return pipe, gate, entered


def time_wait_on(port: int) -> int | None:
    """How many TIME-WAIT sockets have ``port`` as their local port (None without ``ss``)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-tan", "state", "time-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if f":{port} " in line)
