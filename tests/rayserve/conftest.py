"""A real local Ray cluster on loopback for the Ray backend's tests, and what they serve.

``ray_cluster`` (one per test module) is ``ray.init`` on 127.0.0.1 with Serve started and its
HTTP proxy on a free loopback port; each test deploys its own application on it through
:class:`~studioserve.rayserve.backend.RayBackend` (which then leaves the cluster and Serve
running: it did not start them) and must leave no studioserve application or replica behind.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from studioserve.rayserve.backend import METRIC_PUSH_VARIABLES  # noqa: E402

HERE = Path(__file__).resolve().parent
SLOW_WRAPPER = str(HERE / "slow_wrapper.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[int]:
    """A local Ray instance and Serve; yields the HTTP proxy's port."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    for name in METRIC_PUSH_VARIABLES:  # the autoscaler sees load at once
        os.environ[name] = "0.5"
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        namespace="studioserve-tests",
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_actors() -> list[str]:
    """The names of the Serve replica actors alive in the cluster."""
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA")
    ]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def assert_nothing_left() -> None:
    """No application and no replica in the cluster (the backend's teardown)."""
    wait_for(lambda: not serve.status().applications, 30, "the application to go")
    wait_for(lambda: not replica_actors(), 30, f"the replicas to go: {replica_actors()}")


@pytest.fixture(scope="module")
def onnx_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    """A local store with experiment ``mlp`` (an ONNX ``x @ w``, 8 -> 3); ``(store, w)``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from studioserve.store import open_store

    root = tmp_path_factory.mktemp("ray_store")
    w = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [x],
        [y],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    (root / "mlp").mkdir()
    onnx.save(model, str(root / "mlp" / "model.onnx"))
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("the wrapper ignores this folder")
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"this is not an ONNX graph")
    store = str(root / "store")
    with open_store(store) as st:
        st.add("mlp", root / "mlp")
        st.add("slow", root / "empty")
        st.add("broken", root / "broken")
    return store, w
