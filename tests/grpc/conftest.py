"""Fixtures for the gRPC API: real servers with ``--grpc-port 0`` on loopback (shared by the
package, each started once), and small real models."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer
from studioserve.store.local import LocalStore
from studioserve.tensors import TensorSpec
from tests.helpers import running_server

W = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64
TOKEN = "gr4pc-t0ken"
#: the tiny server's --max-body (small, so a message over it is cheap to send)
MAX_BODY = 1 << 20


def tiny_model() -> PipeModel:
    """``y = x @ W`` for ``x`` float32[16], batched."""
    pipe = ModelPipe(name="tiny")
    pipe.add(lambda x: x @ W, max_batch_size=32, name="matmul")
    return PipeModel(
        pipe,
        source="tiny-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
    )


class Gate:
    """A batched ``x @ W`` that holds each batch until :meth:`open` (rows per call recorded)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []
        pipe = ModelPipe(name="gated")
        pipe.add(self._fn, max_batch_size=64, name="gated")
        self.pipe = pipe
        self.model = PipeModel(
            pipe,
            source="gated",
            inputs=[TensorSpec("x", (16,), "float32")],
            outputs=[TensorSpec("y", (4,), "float32")],
        )

    def _fn(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        self.entered.set()
        self.gate.wait(30)
        return batch @ W

    def reset(self) -> None:
        self.gate.clear()
        self.entered.clear()
        self.calls.clear()


@pytest.fixture(scope="package")
def tiny() -> Iterator[ModelServer]:
    """The tiny model over HTTP and gRPC (no auth; --max-body 1 MiB)."""
    with running_server("tiny", model=tiny_model(), grpc_port=0, max_body=MAX_BODY) as s:
        yield s


@pytest.fixture(scope="package")
def secured() -> Iterator[ModelServer]:
    """The tiny model with token auth on."""
    with running_server("tiny", model=tiny_model(), grpc_port=0, token=TOKEN) as s:
        yield s


@pytest.fixture(scope="package")
def gated() -> Iterator[tuple[ModelServer, Gate]]:
    gate = Gate()
    with running_server("gated", model=gate.model, grpc_port=0) as s:
        yield s, gate
    gate.gate.set()


@pytest.fixture
def gate(gated: tuple[ModelServer, Gate]) -> Iterator[Gate]:
    g = gated[1]
    g.reset()
    yield g
    g.gate.set()


@pytest.fixture(scope="package")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """Two experiments of a local store (no artifact: identity models), loadable and
    unloadable through the repository extension."""
    root = tmp_path_factory.mktemp("grpc_store")
    store = LocalStore(root / "store")
    for key in ("alpha", "beta"):
        src = root / key
        src.mkdir()
        (src / "notes.txt").write_text("no model file: the identity model serves\n")
        store.add(key, src)
    with running_server("alpha", keys=["alpha", "beta"], store=store.url, grpc_port=0) as s:
        yield s


def stub_and_channel(server: ModelServer) -> tuple[Any, Any]:
    """A channel to the server's gRPC port and the generated stub on it (no tritonclient)."""
    import grpc

    from studioserve.grpcapi.proto import grpc_service_pb2_grpc

    assert server.grpc_address is not None
    channel = grpc.insecure_channel(server.grpc_address)
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel), channel
