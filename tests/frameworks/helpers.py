"""What every framework's end-to-end test does: serve an artifact, compare, batch, refuse.

Each framework test saves a real small model, adds its folder to a real local store, serves it
through the real server and calls these checks; they compare the server's answers with the
framework's own output on the same input, over pickle and OIP.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from studioserve.config import ServeConfig
from studioserve.runtime import ModelServer
from studioserve.store import open_store
from studioserve.wire.oip_codec import decode_infer_response, encode_infer_request
from tests.helpers import raw_post

Predict = Callable[[np.ndarray], Any]


def add_experiment(store_dir: Path, key: str, folder: Path, serving: str | None = None) -> None:
    with open_store(str(store_dir)) as store:
        store.add(key, folder, serving_config=serving.encode() if serving else None)


@contextmanager
def serving(store_dir: Path, key: str, **config: Any) -> Iterator[ModelServer]:
    """A real server on an ephemeral loopback port serving experiment ``key``."""
    cfg = ServeConfig(key=key, store=str(store_dir), port=0, killafter=0, **config)
    server = ModelServer(cfg)
    server.start()
    try:
        yield server
    finally:
        server.close()


def post(url: str, data: dict[str, Any]) -> tuple[int, Any]:
    status, _, body = raw_post(url, pickle.dumps(data))
    if status != 200:
        return status, json.loads(body)
    return status, pickle.loads(body)  # noqa: S301 - our own server's answer, in a test


def post_oip(url: str, name: str, inputs: dict[str, np.ndarray]) -> tuple[int, Any]:
    body, headers = encode_infer_request(inputs)
    status, resp_headers, raw = raw_post(url, body, headers, path=f"/v2/models/{name}/infer")
    if status != 200:
        return status, json.loads(raw)
    return status, decode_infer_response(raw, resp_headers.get("inference-header-content-length"))


def assert_close(got: Any, want: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Arrays (or dicts of arrays, or labels) equal within tolerance."""
    if isinstance(want, dict):
        assert set(got) == set(want), (sorted(got), sorted(want))
        for k in want:
            assert_close(got[k], want[k], rtol, atol)
        return
    want = np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype.kind in "OUSb" or want.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def check_pickle_answers(
    url: str, x_many: np.ndarray, predict: Predict, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """One example and n examples per key answer what the framework itself computes."""
    status, out = post(url, {"one": x_many[0], "many": x_many})
    assert status == 200, out
    assert_close(out["many"], predict(x_many), rtol, atol)
    one = predict(x_many[:1])
    one = {k: v[0] for k, v in one.items()} if isinstance(one, dict) else np.asarray(one)[0]
    assert_close(out["one"], one, rtol, atol)


def check_oip_answers(
    url: str, name: str, inputs: dict[str, np.ndarray], want: dict[str, np.ndarray]
) -> None:
    """OIP infer answers ``want`` (output name -> array) for ``inputs``."""
    status, out = post_oip(url, name, inputs)
    assert status == 200, out
    got = out["outputs"]
    for k, v in want.items():
        assert k in got, (k, list(got))
        assert_close(got[k], v, rtol=1e-4, atol=1e-5)


def check_batches_shared(server: ModelServer, x_many: np.ndarray, clients: int = 8) -> None:
    """Concurrent clients' items meet in one model call: some batch holds items of several."""
    pipe = server.service.model.pipe if server.service else None
    assert pipe is not None
    stage = pipe.model_stage
    gate = threading.Barrier(clients)

    def one(i: int) -> int:
        gate.wait(10)
        return post(server.url, {"k": x_many[i % len(x_many)]})[0]

    for _ in range(5):
        with ThreadPoolExecutor(clients) as pool:
            assert set(pool.map(one, range(clients))) == {200}
        stats = pipe.stats().stages[stage]
        if any(rows > 1 and count for rows, count in stats.batch_sizes.items()):
            return
    raise AssertionError(f"no batch held items of several requests: {stats.batch_sizes}")


def check_422(url: str, bad: Any, input_name: str) -> None:
    status, body = post(url, {"k": bad})
    assert status == 422, body
    assert input_name in body["error"]["message"], body


def studio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m studioserve ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "studioserve", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def without_module(tmp: Path, *modules: str) -> dict[str, str]:
    """An environment in which ``import MODULE`` fails (a stub package that raises first on
    sys.path), to show the message a user gets without the framework installed."""
    stubs = tmp / "blocked_modules"
    for module in modules:
        pkg = stubs / module
        pkg.mkdir(parents=True, exist_ok=True)
        message = f"No module named {module!r}"
        (pkg / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    path = os.pathsep.join(p for p in [str(stubs), os.environ.get("PYTHONPATH", "")] if p)
    return {"PYTHONPATH": path}


@contextmanager
def cli_served(
    store_dir: Path,
    key: str,
    folder: Path,
    framework: str,
    *serve_args: str,
    config: Path | None = None,
) -> Iterator[str]:
    """``studio experiments add KEY FOLDER [--serving-config CONFIG]`` (its detected framework
    checked with ``show``), then ``studio serve KEY SERVE_ARGS`` as a user runs them; yields
    the server's URL, stops it after."""
    from tests.helpers import start_cli, stop_cli

    env = {**os.environ, "STUDIO_STORE": str(store_dir), "PYTHONUNBUFFERED": "1"}
    with_config = ["--serving-config", str(config)] if config is not None else []
    added = studio("experiments", "add", key, str(folder), *with_config, env=env)
    assert added.returncode == 0, added.stderr
    shown = studio("experiments", "show", key, env=env)
    assert json.loads(shown.stdout)["framework"] == framework
    proc, url = start_cli([key, "--port", "0", "--killafter", "0", *serve_args], env)
    try:
        yield url
    finally:
        assert stop_cli(proc) == 0


def check_missing_extra(
    tmp: Path, store_dir: Path, key: str, module: str, extra: str, *serve_args: str
) -> None:
    """``studio serve KEY`` with ``module`` not importable fails naming ``studioserve[extra]``."""
    env = {"STUDIO_STORE": str(store_dir), **without_module(tmp, module)}
    done = studio("serve", key, *serve_args, "--port", "0", "--killafter", "0", env=env)
    assert done.returncode != 0
    assert f"studioserve[{extra}]" in done.stderr, done.stderr
