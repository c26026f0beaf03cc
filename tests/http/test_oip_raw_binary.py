"""Triton's raw binary request (``Inference-Header-Content-Length: 0``: the body is the single
input's raw bytes) against the real server, after the cases of Triton's own HTTP tests
(qa/L0_http/http_test.py): the shape deduced from the one variable dimension, a BYTES input
of one element, and a clear 400 for a model of several inputs, a shape with more than one
variable dimension, or a length that does not fit."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from studioserve.models import IdentityModel, PipeModel
from studioserve.models.callable import CallableModel
from studioserve.pipelines import ModelPipe
from studioserve.runtime import ModelServer
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import decode_infer_response
from tests.helpers import raw_post, running_server

W = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64
RAW = {"Inference-Header-Content-Length": "0"}


def _pipe_model(name: str, fn: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Any:
    pipe = ModelPipe(name=name)
    pipe.add(fn, max_batch_size=32, name=name)
    return PipeModel(pipe, source=name, inputs=inputs, outputs=outputs)


def _callable(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> CallableModel:
    model = CallableModel(lambda data: dict(data), source=name)
    model.inputs, model.outputs = inputs, outputs
    return model


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ModelServer]]:
    models = {
        "tiny": _pipe_model(
            "tiny",
            lambda x: x @ W,
            [TensorSpec("x", (16,), "float32")],
            [TensorSpec("y", (4,), "float32")],
        ),
        "pair": _pipe_model(
            "pair",
            lambda b: b["a"] + b["b"],
            [TensorSpec("a", (8,), "float32"), TensorSpec("b", (8,), "float32")],
            [TensorSpec("s", (8,), "float32")],
        ),
        "ragged": _pipe_model(
            "ragged",
            lambda x: x,
            [TensorSpec("x", (None,), "float16")],
            [TensorSpec("x", (None,), "float16")],
        ),
        "text": _callable(
            "text", [TensorSpec("t", (1,), "object")], [TensorSpec("t", (1,), "object")]
        ),
        "texts": _callable(
            "texts", [TensorSpec("t", (3,), "object")], [TensorSpec("t", (3,), "object")]
        ),
        "vector": _callable(
            "vector", [TensorSpec("v", (None,), "int32")], [TensorSpec("v", (None,), "int32")]
        ),
        "ident": IdentityModel(source="none"),
    }
    started: dict[str, ModelServer] = {}
    contexts = []
    try:
        for name, model in models.items():
            ctx = running_server(name, model=model)
            started[name] = ctx.__enter__()
            contexts.append(ctx)
        yield started
    finally:
        for ctx in reversed(contexts):
            ctx.__exit__(None, None, None)


def _post(server: ModelServer, model: str, body: bytes, **headers: str) -> tuple[int, Any]:
    status, h, raw = raw_post(
        server.url, body, {**RAW, **headers}, path=f"/v2/models/{model}/infer"
    )
    if status != 200:
        return status, json.loads(raw)
    assert h["content-type"] == "application/octet-stream"
    return status, (decode_infer_response(raw, h["inference-header-content-length"]), raw, h)


def test_the_batch_dimension_is_deduced(servers: dict[str, ModelServer]) -> None:
    for rows in (1, 2, 5):
        x = np.arange(16 * rows, dtype=np.float32).reshape(rows, 16)
        status, (doc, _, _) = _post(servers["tiny"], "tiny", x.tobytes())
        assert status == 200
        (y,) = doc["outputs"].values()
        np.testing.assert_allclose(doc["outputs"]["y"], x @ W, rtol=1e-6)
        assert y.shape == (rows, 4)


def test_a_compressed_raw_body(servers: dict[str, ModelServer]) -> None:
    x = np.ones((3, 16), np.float32)
    status, (doc, _, _) = _post(
        servers["tiny"], "tiny", gzip.compress(x.tobytes()), **{"Content-Encoding": "gzip"}
    )
    assert status == 200
    np.testing.assert_allclose(doc["outputs"]["y"], x @ W, rtol=1e-6)


def test_an_unbatched_variable_dimension_is_deduced(servers: dict[str, ModelServer]) -> None:
    v = np.arange(7, dtype=np.int32)
    status, (doc, raw, h) = _post(servers["vector"], "vector", v.tobytes())
    assert status == 200
    np.testing.assert_array_equal(doc["outputs"]["v"], v)
    # every output comes back as binary data, as in Triton's answer to a raw request
    assert raw[int(h["inference-header-content-length"]) :] == v.tobytes()


def test_a_bytes_input_of_one_element(servers: dict[str, ModelServer]) -> None:
    status, (doc, raw, h) = _post(servers["text"], "text", b"427")
    assert status == 200
    assert doc["outputs"]["t"].tolist() == [b"427"]
    # BYTES in binary form: a 4-byte little-endian length, then the bytes
    assert raw[int(h["inference-header-content-length"]) :] == struct.pack("<I", 3) + b"427"


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        ("texts", b"427", "the input must take one element per request (shape [1])"),
        ("ragged", np.ones(4, np.float16).tobytes(), "more than one variable dimension"),
        ("pair", np.arange(24, dtype=np.float32).tobytes(), "takes 2 inputs ('a', 'b')"),
        ("ident", b"abcd", "declares no inputs"),
        ("tiny", np.ones(20, np.float32).tobytes(), "must be a multiple of 64 bytes, not 80"),
        ("tiny", b"", "needs a body"),
    ],
)
def test_what_cannot_be_deduced_is_a_clear_400(
    servers: dict[str, ModelServer], model: str, body: bytes, message: str
) -> None:
    status, doc = _post(servers[model], model, body)
    assert status == 400, doc
    assert message in doc["error"], doc


def test_a_header_length_that_is_not_zero_still_means_json(
    servers: dict[str, ModelServer],
) -> None:
    status, doc = _post(
        servers["tiny"],
        "tiny",
        np.ones(16, np.float32).tobytes(),
        **{"Inference-Header-Content-Length": "4"},
    )
    assert status == 400
    assert "not valid JSON" in doc["error"]
