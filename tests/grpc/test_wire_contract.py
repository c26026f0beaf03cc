"""The wire contract of the gRPC API, with a client built from the published .proto alone
(grpcio and the generated stubs in studioserve.grpcapi.proto; no tritonclient): raw and typed
tensor contents, every error's gRPC code and the retry information of UNAVAILABLE, the size
limit, deadlines, batching with HTTP and pickle requests, the drain, metrics and activity."""

from __future__ import annotations

import json
import pickle
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from studioserve.config import ServeConfig
from studioserve.errors import ConfigError, StudioServeError
from studioserve.grpcapi.proto import grpc_service_pb2 as pb
from studioserve.grpcapi.protocol import GRPC_CODES, grpc_code
from studioserve.runtime import ModelServer
from studioserve.wire.oip_codec import decode_infer_response, encode_infer_request
from tests.grpc.conftest import MAX_BODY, Gate, W, stub_and_channel, tiny_model
from tests.helpers import raw_post, running_server


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def _raw_request(model: str, x: np.ndarray, **fields: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, **fields)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return req


def _y(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    assert (out.name, out.datatype) == ("y", "FP32")
    return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(out.shape))


@pytest.fixture
def stub(tiny: ModelServer) -> Any:
    s, channel = stub_and_channel(tiny)
    yield s
    channel.close()


def _error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# -- tensors ------------------------------------------------------------------------------------


def test_raw_and_typed_contents_give_the_same_answer(stub: Any) -> None:
    x = _x(3)
    raw = stub.ModelInfer(_raw_request("tiny", x, id="r1"))
    assert (raw.model_name, raw.model_version, raw.id) == ("tiny", "1", "r1")
    np.testing.assert_allclose(_y(raw), x @ W, rtol=1e-6)
    typed = pb.ModelInferRequest(model_name="tiny")
    t = typed.inputs.add(name="x", datatype="FP32", shape=[3, 16])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    np.testing.assert_allclose(_y(stub.ModelInfer(typed)), x @ W, rtol=1e-6)
    # integers cast safely to the model's float32, as over HTTP
    ints = pb.ModelInferRequest(model_name="tiny")
    t = ints.inputs.add(name="x", datatype="INT32", shape=[1, 16])
    t.contents.int_contents.extend(range(16))
    np.testing.assert_allclose(
        _y(stub.ModelInfer(ints)), np.arange(16, dtype=np.float32)[None] @ W, rtol=1e-6
    )


def test_typed_contents_are_checked(stub: Any) -> None:
    def typed(datatype: str, shape: list[int], **contents: Any) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="tiny")
        t = req.inputs.add(name="x", datatype=datatype, shape=shape)
        for field, values in contents.items():
            getattr(t.contents, field).extend(values)
        return req

    x = _x(1).ravel().tolist()
    cases = [
        (typed("FP32", [1, 16], fp32_contents=x[:5]), "has 16 elements but contents"),
        (typed("FP32", [1, 16], int_contents=range(16)), "goes in contents.fp32_contents"),
        (typed("INT8", [1, 16], int_contents=[300] * 16), "out of the range of INT8"),
        (typed("FP16", [1, 16]), "FP16 has no typed contents"),
        (typed("FP32", [1, -16], fp32_contents=x), "non-negative integers"),
        (typed("COMPLEX", [1, 16]), "unsupported datatype"),
    ]
    for req, text in cases:
        e = _error(stub.ModelInfer, req)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, e.details())
        assert text in e.details(), e.details()
    both = _raw_request("tiny", _x(1))
    both.inputs[0].contents.fp32_contents.extend(x)
    assert "send every input one way" in _error(stub.ModelInfer, both).details()
    short = _raw_request("tiny", _x(1))
    short.inputs.add(name="extra", datatype="FP32", shape=[1])
    assert "one raw_input_contents entry per input" in _error(stub.ModelInfer, short).details()


# -- errors and their codes ---------------------------------------------------------------------


def test_every_error_status_has_a_grpc_code() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for c in cls.__subclasses__() for s in subclasses(c))]

    statuses = {c.http_status for c in subclasses(StudioServeError)}
    for status in statuses | {401, 413, 429, 504}:
        assert grpc_code(status) != grpc.StatusCode.UNKNOWN
    assert GRPC_CODES[400] == grpc.StatusCode.INVALID_ARGUMENT
    assert GRPC_CODES[404] == grpc.StatusCode.NOT_FOUND
    assert GRPC_CODES[413] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert GRPC_CODES[503] == grpc.StatusCode.UNAVAILABLE
    assert GRPC_CODES[504] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_code(422) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(599) == grpc.StatusCode.INTERNAL


def test_malformed_messages_and_unknown_models(tiny: ModelServer, stub: Any) -> None:
    assert tiny.grpc_address is not None
    with grpc.insecure_channel(tiny.grpc_address) as channel:
        raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        e = _error(raw_call, b"\xff\xff\xff not a protobuf")
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an inference.ModelInferRequest" in e.details()
    assert _error(stub.ModelInfer, _raw_request("", _x(1))).code() == grpc.StatusCode.NOT_FOUND
    e = _error(stub.ModelInfer, _raw_request("ghost", _x(1)))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'ghost'" in e.details()
    e = _error(stub.ModelMetadata, pb.ModelMetadataRequest(name="tiny", version="7"))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ModelReady(pb.ModelReadyRequest(name="ghost")).ready is False


def test_a_message_over_max_body_is_resource_exhausted(stub: Any) -> None:
    big = _x(MAX_BODY // 64 + 16)  # 64 bytes a row: more than --max-body in all
    e = _error(stub.ModelInfer, _raw_request("tiny", big))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    np.testing.assert_allclose(_y(stub.ModelInfer(_raw_request("tiny", _x(2)))), _x(2) @ W)


def test_a_message_that_would_build_past_its_budget_is_resource_exhausted(stub: Any) -> None:
    n = 400_000  # empty BYTES elements: 2 bytes each on the wire, ~70 once built
    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="x", datatype="BYTES", shape=[1, n])
    t.contents.bytes_contents.extend([b""] * n)
    assert req.ByteSize() < MAX_BODY
    e = _error(stub.ModelInfer, req)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    assert "budget" in e.details() or "too large" in e.details(), e.details()


def test_not_ready_is_unavailable_with_retry_information(tiny: ModelServer, stub: Any) -> None:
    service = tiny.service
    assert service is not None
    service.ready = False
    try:
        assert stub.ServerReady(pb.ServerReadyRequest()).ready is False
        assert stub.ServerLive(pb.ServerLiveRequest()).live is True
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_raw_request("tiny", _x(1)))
    finally:
        service.ready = True
    e: Any = info.value
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    # the rich error model's messages (googleapis-common-protos, which google-cloud brings)
    status_pb2 = pytest.importorskip("google.rpc.status_pb2")
    error_details_pb2 = pytest.importorskip("google.rpc.error_details_pb2")
    trailers = dict(e.trailing_metadata())
    seconds = int(trailers["retry-after"])
    assert seconds >= 1
    assert trailers["grpc-retry-pushback-ms"] == str(seconds * 1000)
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert status.message == e.details()
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == seconds


# -- deadlines, batching with HTTP, activity and metrics ----------------------------------------


def test_the_timeout_parameter_is_deadline_exceeded(
    gated: tuple[ModelServer, Gate], gate: Gate
) -> None:
    server, _ = gated
    s, channel = stub_and_channel(server)
    try:
        req = _raw_request("gated", _x(1))
        req.parameters["timeout"].int64_param = 200_000  # microseconds, as over HTTP
        started = time.monotonic()
        e = _error(s.ModelInfer, req, timeout=30)
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
        assert time.monotonic() - started < 10
        gate.gate.set()
        # a call past its own gRPC deadline is cancelled; its lease and slot are freed
        gate.reset()
        e = _error(s.ModelInfer, _raw_request("gated", _x(1)), timeout=0.3)
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.gate.set()
        assert server.service is not None
        deadline = time.monotonic() + 10
        while server.service.activity.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.service.activity.in_flight == 0
        np.testing.assert_allclose(_y(s.ModelInfer(_raw_request("gated", _x(1)))), _x(1) @ W)
    finally:
        channel.close()


def test_grpc_http_and_pickle_requests_share_a_batch(
    gated: tuple[ModelServer, Gate], gate: Gate
) -> None:
    server, _ = gated
    s, channel = stub_and_channel(server)
    x1, x2, x3, x4 = _x(1, 1), _x(2, 2), _x(3, 3), _x(4, 4)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(s.ModelInfer, _raw_request("gated", x1), timeout=30)
            assert gate.entered.wait(30)
            body, headers = encode_infer_request({"x": x2})
            oip = pool.submit(raw_post, server.url, body, headers, "/v2/models/gated/infer")
            rpc = pool.submit(s.ModelInfer, _raw_request("gated", x3), timeout=30)
            pkl = pool.submit(raw_post, server.url, pickle.dumps({"k": x4}))
            while gate.pipe.stats().in_flight < 4:  # the three queued behind the gated batch
                time.sleep(0.005)
            gate.gate.set()
            np.testing.assert_allclose(_y(first.result(30)), x1 @ W, rtol=1e-6)
            np.testing.assert_allclose(_y(rpc.result(30)), x3 @ W, rtol=1e-6)
            status, h, b = oip.result(30)
            assert status == 200
            out = decode_infer_response(b, h.get("inference-header-content-length"))
            np.testing.assert_allclose(out["outputs"]["y"], x2 @ W, rtol=1e-6)
            status, _, b = pkl.result(30)
            assert status == 200
            np.testing.assert_allclose(pickle.loads(b)["k"], x4 @ W, rtol=1e-6)
        assert gate.calls == [1, 9], gate.calls
    finally:
        channel.close()


def test_grpc_requests_count_as_activity_and_in_metrics(tiny: ModelServer, stub: Any) -> None:
    service = tiny.service
    assert service is not None
    accepted = service.activity.accepted
    for _ in range(2):
        stub.ModelInfer(_raw_request("tiny", _x(1)))
    assert service.activity.accepted == accepted + 2
    assert service.activity.idle_seconds() < 5
    status, _, body = raw_post(tiny.url, None, path="/metrics", method="GET")
    assert status == 200
    text = body.decode()
    assert 'studioserve_requests_total{route="grpc",status="200"}' in text
    _error(stub.ModelInfer, _raw_request("ghost", _x(1)))
    status, _, body = raw_post(tiny.url, None, path="/metrics", method="GET")
    assert 'studioserve_requests_total{route="grpc",status="404"}' in body.decode()


def test_the_status_page_names_the_grpc_address_and_counts_its_calls(
    tiny: ModelServer, stub: Any
) -> None:
    def status() -> dict[str, Any]:
        code, _, body = raw_post(tiny.url, None, {"Accept": "application/json"}, method="GET")
        assert code == 200
        info: dict[str, Any] = json.loads(body)
        return info

    before = status()
    assert before["endpoints"]["grpc"] == tiny.grpc_address
    stub.ModelInfer(_raw_request("tiny", _x(2)))
    assert status()["requests_accepted"] == before["requests_accepted"] + 1
    code, _, page = raw_post(tiny.url, None, {"Accept": "text/html"}, method="GET")
    assert code == 200
    assert f"<code>{tiny.grpc_address}</code> gRPC (KServe v2)" in page.decode()


# -- lifecycle ----------------------------------------------------------------------------------


def test_the_drain_finishes_grpc_calls_in_flight_and_refuses_new_ones() -> None:
    gate = Gate()
    server = ModelServer(
        ServeConfig(key="gated", port=0, killafter=0, grpc_port=0), model=gate.model
    )
    server.start()
    closer: threading.Thread | None = None
    try:
        s, channel = stub_and_channel(server)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(s.ModelInfer, _raw_request("gated", _x(2)), timeout=30)
            assert gate.entered.wait(30)
            closer = threading.Thread(target=server.close, name="test-close")
            closer.start()
            assert server.service is not None
            while not server.service.draining:
                time.sleep(0.005)
            e = _error(s.ModelInfer, _raw_request("gated", _x(1)), timeout=10)
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in e.details()
            gate.gate.set()
            np.testing.assert_allclose(_y(in_flight.result(30)), _x(2) @ W, rtol=1e-6)
        channel.close()
        closer.join(30)
        assert not closer.is_alive()
    finally:
        gate.gate.set()
        if closer is not None:
            closer.join(30)
        server.close()


def test_a_grpc_port_in_use_is_a_config_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=r"cannot listen for gRPC on 127\.0\.0\.1:\d+"):
            with running_server("tiny", model=tiny_model(), grpc_port=port):
                pass


def test_a_missing_grpc_extra_is_a_startup_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith("studioserve.grpcapi.") and not name.startswith(
            "studioserve.grpcapi.proto"
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc now raises ImportError
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"pip install 'studioserve\[grpc\]'"):
        with running_server("tiny", model=model, grpc_port=0):
            pass
    model.close()


def test_grpc_port_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="pass --grpc-port between 0 and 65535"):
        ServeConfig(key="k", grpc_port=70000)
    with pytest.raises(ConfigError, match="--grpc-port is served by the local backend only"):
        ServeConfig(key="k", grpc_port=8001, backend="ray")
    assert ServeConfig(key="k").grpc_port is None
