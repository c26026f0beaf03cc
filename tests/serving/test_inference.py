"""The one request path, without HTTP: RequestHandler with the real protocols and a real pipe."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from studioserve import wire
from studioserve.errors import TooLarge
from studioserve.models import PipeModel
from studioserve.pipelines import BatchEvent, ModelPipe
from studioserve.serving.inference import InferenceRequest, RequestHandler
from studioserve.serving.observer import Observers
from studioserve.serving.protocols import OipProtocol, PickleProtocol
from studioserve.serving.service import ModelService
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import encode_infer_request

W = np.arange(12, dtype=np.float32).reshape(4, 3)
MAX_BODY = 4096


class Recorder:
    """An observer that keeps what it heard."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.batches: list[BatchEvent] = []

    def on_request(self, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.requests.append((route, status))

    def on_batch(self, event: BatchEvent) -> None:
        self.batches.append(event)


class Broken:
    def on_request(self, route: str, status: int, seconds: float) -> None:
        raise RuntimeError("observer bug")

    def on_batch(self, event: BatchEvent) -> None:
        raise RuntimeError("observer bug")


def _fails_on_negative(batch: np.ndarray) -> np.ndarray:
    if (batch < 0).any():
        raise ValueError("negative input")
    return batch @ W


@pytest.fixture
def service() -> Iterator[ModelService]:
    pipe = ModelPipe(name="test")
    pipe.add(_fails_on_negative, max_batch_size=8, name="matmul")
    model = PipeModel(
        pipe,
        source="test",
        inputs=[TensorSpec("x", (4,), "float32")],
        outputs=[TensorSpec("y", (3,), "float32")],
    )
    service = ModelService(model, request_timeout=10, name="tiny")
    model.start()
    service.ready = True
    yield service
    service.close()


@pytest.fixture
def recorder(service: ModelService) -> Recorder:
    return Recorder()


def _handler(service: ModelService, recorder: Recorder, protocol: Any = None) -> RequestHandler:
    observers = Observers(service.model.pipe)
    observers.attach(Broken())  # a broken observer never breaks a request
    observers.attach(recorder)
    return RequestHandler(
        service, protocol or PickleProtocol(), max_body=MAX_BODY, observers=observers
    )


def _request(body: bytes, **headers: str) -> InferenceRequest:
    return InferenceRequest(len(body), lambda: body, lambda name: headers.get(name))


def test_a_request_is_decoded_predicted_encoded_counted_and_observed(
    service: ModelService, recorder: Recorder
) -> None:
    x = np.ones(4, np.float32)
    reply = _handler(service, recorder).handle(_request(pickle.dumps({"a": x, "b": x[None]})))
    assert reply.status == 200
    assert ("Content-Type", "application/x-pickle") in reply.headers
    out = wire.decode_response(reply.body, "application/x-pickle")
    np.testing.assert_allclose(out["a"], x @ W)
    np.testing.assert_allclose(out["b"], (x @ W)[None])
    assert service.activity.accepted == 1
    assert service.activity.in_flight == 0
    assert recorder.requests == [("/", 200)]
    assert sum(e.size for e in recorder.batches) == 2


def test_json_in_json_out(service: ModelService, recorder: Recorder) -> None:
    body = json.dumps({"a": [1, 2, 3, 4]}).encode()
    reply = _handler(service, recorder).handle(
        _request(body, **{"Content-Type": "application/json"})
    )
    assert reply.status == 200
    assert json.loads(reply.body)["a"] == pytest.approx((np.arange(1, 5) @ W).tolist())


def test_not_ready_is_503_with_retry_after_and_does_not_count(
    service: ModelService, recorder: Recorder
) -> None:
    service.ready = False
    read: list[int] = []

    def reader() -> bytes:
        read.append(1)
        return b""

    reply = _handler(service, recorder).handle(InferenceRequest(10, reader))
    assert reply.status == 503
    assert ("Retry-After", "1") in reply.headers
    assert json.loads(reply.body)["error"]["type"] == "not_ready"
    assert read == []  # the body is never read
    assert service.activity.accepted == 0
    assert recorder.requests == [("/", 503)]


def test_a_declared_length_over_the_limit_is_413_before_reading(
    service: ModelService, recorder: Recorder
) -> None:
    def reader() -> bytes:
        raise AssertionError("the body must not be read")

    reply = _handler(service, recorder).handle(InferenceRequest(MAX_BODY + 1, reader))
    assert reply.status == 413
    error = json.loads(reply.body)["error"]
    assert error["type"] == "too_large"
    assert f"{MAX_BODY + 1} bytes is larger than the limit of {MAX_BODY} bytes" in error["message"]
    assert service.activity.accepted == 0


def test_a_reader_that_finds_the_body_too_large_is_413(
    service: ModelService, recorder: Recorder
) -> None:
    def reader() -> bytes:
        raise TooLarge(MAX_BODY)

    reply = _handler(service, recorder).handle(InferenceRequest(None, reader))
    assert reply.status == 413
    assert "--max-body" in json.loads(reply.body)["error"]["message"]


def test_an_undecodable_body_is_400_and_does_not_count(
    service: ModelService, recorder: Recorder
) -> None:
    reply = _handler(service, recorder).handle(_request(b"\x80\x04not a pickle"))
    assert reply.status == 400
    assert service.activity.accepted == 0
    assert recorder.requests == [("/", 400)]


def test_a_key_the_model_raises_for_is_500_with_per_key_messages(
    service: ModelService, recorder: Recorder
) -> None:
    good, bad = np.ones(4, np.float32), -np.ones(4, np.float32)
    reply = _handler(service, recorder).handle(_request(pickle.dumps({"ok": good, "bad": bad})))
    assert reply.status == 500
    error = json.loads(reply.body)["error"]
    assert set(error["keys"]) == {"bad"}
    assert "negative input" in error["keys"]["bad"]
    assert service.activity.in_flight == 0


def test_a_wrong_shape_is_422_and_never_reaches_the_pipe(
    service: ModelService, recorder: Recorder
) -> None:
    reply = _handler(service, recorder).handle(_request(pickle.dumps({"a": np.ones(5)})))
    assert reply.status == 422
    assert "expects shape (4,)" in json.loads(reply.body)["error"]["message"]
    assert service.model.pipe is not None
    assert service.model.pipe.stats().stages["matmul"].items == 0


def test_a_bug_in_a_protocol_is_500_and_the_request_is_still_balanced(
    service: ModelService, recorder: Recorder
) -> None:
    class BrokenEncoder(PickleProtocol):
        def encode(self, result: Any, context: Any, request: InferenceRequest) -> Any:
            raise ValueError("encoder bug")

    handler = _handler(service, recorder, BrokenEncoder())
    reply = handler.handle(_request(pickle.dumps({"a": np.ones(4, np.float32)})))
    assert reply.status == 500
    assert "internal server error: ValueError" in json.loads(reply.body)["error"]["message"]
    assert service.activity.in_flight == 0
    assert recorder.requests == [("/", 500)]


def test_oip_unknown_model_is_404_in_the_oip_body(
    service: ModelService, recorder: Recorder
) -> None:
    protocol = OipProtocol(service, "tiny", MAX_BODY)
    body, headers = encode_infer_request({"x": np.ones((1, 4), np.float32)})
    request = InferenceRequest(len(body), lambda: body, headers.get, "other", None)
    reply = _handler(service, recorder, protocol).handle(request)
    assert reply.status == 404
    assert json.loads(reply.body) == {"error": "unknown model 'other'; this server serves 'tiny'"}
    assert recorder.requests == [("/v2/models/infer", 404)]


def test_oip_infer_goes_through_the_same_pipe(service: ModelService, recorder: Recorder) -> None:
    protocol = OipProtocol(service, "tiny", MAX_BODY)
    x = np.ones((2, 4), np.float32)
    body, headers = encode_infer_request({"x": x}, binary=False, binary_output=False)
    request = InferenceRequest(len(body), lambda: body, headers.get, "tiny", "1")
    reply = _handler(service, recorder, protocol).handle(request)
    assert reply.status == 200, reply.body
    doc = json.loads(reply.body)
    assert doc["outputs"][0]["name"] == "y"
    assert doc["outputs"][0]["shape"] == [2, 3]
    assert service.model.pipe is not None
    assert service.model.pipe.stats().stages["matmul"].items == 1
