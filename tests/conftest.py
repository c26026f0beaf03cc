"""Shared fixtures: a clean environment, leak detection, small real Keras models."""

from __future__ import annotations

import os

# Silence TensorFlow's C++ start-up lines before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_SCRUBBED_PREFIXES = ("AWS_", "GOOGLE_", "CLOUDSDK_", "STUDIO_")
_SCRUBBED = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"}


@pytest.fixture(autouse=True)
def clean_environ(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No real credentials, proxies or user config reach a test; a private STUDIO_HOME."""
    for name in list(os.environ):
        if name.startswith(_SCRUBBED_PREFIXES) or name in _SCRUBBED:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost,::1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    home = tmp_path_factory.mktemp("studio_home")
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.setenv("STUDIO_STORE", str(home / "experiments"))


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


# Threads that libraries start once per process and keep (not ours to join).
_ALLOWED_THREAD_PREFIXES = ("ThreadPoolExecutor", "asyncio_", "pydevd", "Dummy-")


@pytest.fixture(autouse=True)
def thread_leak_detector(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves new non-daemon threads running, or any studioserve thread."""
    before = _live_threads()
    yield
    if request.node.get_closest_marker("allow_thread_leak"):
        return
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t
            for t in _live_threads() - before
            if (not t.daemon or t.name.startswith("studioserve"))
            and not t.name.startswith(_ALLOWED_THREAD_PREFIXES)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"test left threads running: {[t.name for t in leaked]}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_thread_leak: skip the thread leak check")


@pytest.fixture(scope="session")
def keras_mlp_factory() -> object:
    """A function that builds a small real Keras MLP (input 8 -> 16 relu -> 3 softmax)."""

    def build(in_dim: int = 8, hidden: int = 16, out_dim: int = 3, seed: int = 0) -> object:
        import keras

        keras.utils.set_random_seed(seed)
        inputs = keras.Input(shape=(in_dim,), dtype="float32", name="x")
        h = keras.layers.Dense(hidden, activation="relu")(inputs)
        outputs = keras.layers.Dense(out_dim, activation="softmax")(h)
        return keras.Model(inputs, outputs)

    return build


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Ray tests are marked ``ray``: ``make test`` runs them on their own after the
    others (each starts a local Ray instance, whose daemons run niced and, beside a second
    busy pytest-xdist worker, took over a minute to exit)."""
    ray_dir = Path(__file__).parent / "rayserve"
    for item in items:
        if ray_dir in Path(item.fspath).parents:
            item.add_marker(pytest.mark.ray)
