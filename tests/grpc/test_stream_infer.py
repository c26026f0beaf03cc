"""ModelStreamInfer (Triton's streaming inference) against the real server: with
tritonclient.grpc's stream API, and with raw bytes on a grpcio channel (no tritonclient):
answers by id, a request's error in its answer while the stream goes on, auth, activity, and
the bound on what one stream may have in flight."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from studioserve.grpcapi.proto import grpc_service_pb2 as pb
from studioserve.grpcapi.service import STREAM_WINDOW
from studioserve.runtime import ModelServer
from tests.grpc.conftest import TOKEN, Gate, W

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def _request(model: str, x: np.ndarray, rid: str) -> bytes:
    req = pb.ModelInferRequest(model_name=model, id=rid)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    data: bytes = req.SerializeToString()
    return data


def _y(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(out.shape))


def _raw_stream(server: ModelServer, messages: Iterator[bytes], **kwargs: Any) -> list[Any]:
    """Every answer of one ModelStreamInfer call, parsed."""
    assert server.grpc_address is not None
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.stream_stream(STREAM)
        return [pb.ModelStreamInferResponse.FromString(m) for m in call(messages, **kwargs)]


def test_tritonclient_streams_answer_every_request_by_id(tiny: ModelServer) -> None:
    assert tiny.grpc_address is not None
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tg.InferenceServerClient(tiny.grpc_address)
    xs = {f"r{i}": _x(1 + i % 3, seed=i) for i in range(24)}
    bad = tg.InferInput("x", [1, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i, (rid, x) in enumerate(xs.items()):
            tensor = tg.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer("tiny", [tensor], request_id=rid)
            if i == 10:  # a bad request in the middle of the stream
                client.async_stream_infer("tiny", [bad], request_id="bad")
        got: dict[str, np.ndarray] = {}
        errors: list[InferenceServerException] = []
        for _ in range(len(xs) + 1):
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("y")
    finally:
        client.stop_stream()
        client.close()
    assert set(got) == set(xs)
    for rid, x in xs.items():
        np.testing.assert_allclose(got[rid], x @ W, rtol=1e-6)
    [error] = errors
    assert "shape" in error.message(), error.message()


def test_raw_stream_errors_keep_their_id_and_the_stream_goes_on(tiny: ModelServer) -> None:
    service = tiny.service
    assert service is not None
    accepted = service.activity.accepted
    messages = [
        _request("tiny", _x(1), "first"),
        _request("ghost", _x(1), "unknown"),
        b"\xff\xff\xff not a message",
        _request("tiny", _x(2, seed=3), "last"),
    ]
    answers = _raw_stream(tiny, iter(messages), timeout=30)
    assert len(answers) == 4
    by_id = {a.infer_response.id: a for a in answers if a.infer_response.id}
    assert set(by_id) == {"first", "unknown", "last"}
    assert by_id["first"].error_message == ""
    np.testing.assert_allclose(_y(by_id["first"].infer_response), _x(1) @ W, rtol=1e-6)
    np.testing.assert_allclose(_y(by_id["last"].infer_response), _x(2, seed=3) @ W, rtol=1e-6)
    assert "ghost" in by_id["unknown"].error_message
    assert by_id["unknown"].infer_response.model_name == "ghost"
    [garbage] = [a for a in answers if not a.infer_response.id]
    assert "not an inference.ModelInferRequest" in garbage.error_message
    assert service.activity.accepted == accepted + 2  # the two answered requests


def test_a_stream_needs_the_token(secured: ModelServer) -> None:
    message = _request("tiny", _x(1), "a")
    with pytest.raises(grpc.RpcError) as info:
        _raw_stream(secured, iter([message]), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [answer] = _raw_stream(
        secured, iter([message]), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)
    )
    assert answer.error_message == ""
    np.testing.assert_allclose(_y(answer.infer_response), _x(1) @ W, rtol=1e-6)


def test_one_stream_has_at_most_its_window_in_flight(
    gated: tuple[ModelServer, Gate], gate: Gate
) -> None:
    server, _ = gated
    service = server.service
    assert service is not None
    count = STREAM_WINDOW + 40
    answers: list[Any] = []

    def messages() -> Iterator[bytes]:
        for i in range(count):
            yield _request("gated", _x(1, seed=i), f"m{i}")

    worker = threading.Thread(
        target=lambda: answers.extend(_raw_stream(server, messages(), timeout=60))
    )
    worker.start()
    try:
        assert gate.entered.wait(30)
        peak = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the model holds every batch meanwhile
            peak = max(peak, service.activity.in_flight)
            time.sleep(0.01)
        assert 0 < peak <= STREAM_WINDOW  # the rest waits unread, in the stream
    finally:
        gate.gate.set()
        worker.join(60)
    assert len(answers) == count
    assert all(a.error_message == "" for a in answers)
    assert {a.infer_response.id for a in answers} == {f"m{i}" for i in range(count)}


def test_a_client_that_reads_no_answers_holds_its_stream_back(repository: ModelServer) -> None:
    """Answers not yet written count against the window: a stream whose client stops
    reading stops being read, instead of its answers piling up in the server."""
    service = repository.service
    assert service is not None
    assert repository.grpc_address is not None
    count, big = 300, np.ones((1, 64 * 1024), np.float32)  # 256 KiB each way (identity)
    accepted = service.activity.accepted

    def messages() -> Iterator[bytes]:
        for i in range(count):
            yield _request("alpha", big, f"m{i}")

    with grpc.insecure_channel(repository.grpc_address) as channel:
        answers = channel.stream_stream(STREAM)(messages(), timeout=120)
        time.sleep(3.0)  # nothing read meanwhile
        held = service.activity.accepted - accepted
        assert 0 < held <= STREAM_WINDOW + 32, held  # + what HTTP/2 windows carry
        got = [pb.ModelStreamInferResponse.FromString(m) for m in answers]
    assert len(got) == count
    assert all(a.error_message == "" for a in got)
