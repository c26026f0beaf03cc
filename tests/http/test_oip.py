"""The Open Inference Protocol API, driven by tritonclient's HTTP client (a real client that
no one here wrote), against the real server on a loopback port."""

from __future__ import annotations

import gzip
import json
import pickle
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from studioserve.models import IdentityModel, PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.store.local import LocalStore
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import (
    DATATYPES,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    serialize_bytes,
)
from tests.helpers import raw_post, running_server

W = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 64


def _tiny_model(**batching: Any) -> PipeModel:
    pipe = ModelPipe(name="tiny")
    pipe.add(lambda x: x @ W, max_batch_size=32, name="matmul", **batching)
    return PipeModel(
        pipe,
        source="tiny-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
    )


def _two_in_two_out() -> PipeModel:
    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"sum": batch["a"] + batch["b"], "prod": (batch["a"] * batch["b"]).astype("f8")}

    pipe = ModelPipe(name="multi")
    pipe.add(fn, max_batch_size=16, name="arith")
    return PipeModel(
        pipe,
        source="multi-test",
        inputs=[TensorSpec("a", (3,), "int32"), TensorSpec("b", (3,), "int32")],
        outputs=[TensorSpec("sum", (3,), "int32"), TensorSpec("prod", (3,), "float64")],
    )


def _client(server: Any) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def tiny() -> Iterator[Any]:
    model = _tiny_model(max_delay=0.002, preferred_batch_sizes=[8, 16])
    with running_server("tiny", model=model, max_delay_ms=2.0, max_batch_size=32) as s:
        yield s


@pytest.fixture(scope="module")
def identity() -> Iterator[Any]:
    with running_server("ident", model=IdentityModel(source="none")) as s:
        yield s


@pytest.fixture(scope="module")
def multi() -> Iterator[Any]:
    with running_server("multi", model=_two_in_two_out()) as s:
        yield s


@pytest.fixture
def client(tiny: Any) -> Iterator[triton.InferenceServerClient]:
    c = _client(tiny)
    yield c
    c.close()


def _input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    t = triton.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


# -- metadata and health --------------------------------------------------------------------------


def test_server_metadata_and_health(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("other")
    meta = client.get_server_metadata()
    assert meta["name"] == "studioserve"
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(meta["extensions"])


def test_model_metadata_comes_from_the_signature(client: triton.InferenceServerClient) -> None:
    meta = client.get_model_metadata("tiny")
    assert meta == client.get_model_metadata("tiny", "1")
    assert meta["name"] == "tiny"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]


def test_not_ready_answers_503(tiny: Any, client: triton.InferenceServerClient) -> None:
    tiny.service.ready = False
    try:
        assert not client.is_server_ready()
        assert not client.is_model_ready("tiny")
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [_input("x", _x(1), "FP32", True)])
        assert info.value.status() == "503"
        assert "not loaded" in info.value.message()
    finally:
        tiny.service.ready = True
    assert client.is_server_ready()


# -- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 32, 40])
@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False)])
def test_infer_matches_the_model(
    client: triton.InferenceServerClient, n: int, binary_in: bool, binary_out: bool
) -> None:
    x = _x(n, seed=n)
    out = [triton.InferRequestedOutput("y", binary_data=binary_out)]
    result = client.infer("tiny", [_input("x", x, "FP32", binary_in)], outputs=out)
    y = result.as_numpy("y")
    assert y.dtype == np.float32
    assert y.shape == (n, 4)
    np.testing.assert_allclose(y, x @ W, rtol=1e-6)
    tensor = result.get_output("y")
    assert ("parameters" in tensor) == binary_out
    assert result.get_response()["model_name"] == "tiny"


def test_infer_without_requested_outputs_answers_binary(
    client: triton.InferenceServerClient,
) -> None:
    # tritonclient then asks for binary_data_output: true
    x = _x(3)
    result = client.infer("tiny", [_input("x", x, "FP32", False)], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_output("y")["parameters"]["binary_data_size"] == 3 * 4 * 4
    np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)


def test_versioned_infer_and_int_inputs_cast_to_the_model(
    client: triton.InferenceServerClient,
) -> None:
    x = np.arange(32, dtype=np.int32).reshape(2, 16)
    result = client.infer("tiny", [_input("x", x, "INT32", True)], model_version="1")
    np.testing.assert_allclose(result.as_numpy("y"), x.astype(np.float32) @ W, rtol=1e-6)


def test_one_example_without_the_batch_dimension(tiny: Any) -> None:
    x = _x(1)[0]
    body, headers = encode_infer_request({"x": x}, binary=False, binary_output=False)
    status, _, raw = raw_post(tiny.url, body, headers, path="/v2/models/tiny/infer")
    assert status == 200, raw
    out = decode_infer_response(raw)["outputs"]["y"]
    assert out.shape == (4,)
    np.testing.assert_allclose(out, x @ W, rtol=1e-6)


def test_gzip_and_deflate_request_bodies(client: triton.InferenceServerClient) -> None:
    x = _x(4)
    for algo in ("gzip", "deflate"):
        result = client.infer(
            "tiny", [_input("x", x, "FP32", True)], request_compression_algorithm=algo
        )
        np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)


def test_requested_outputs_and_mixed_binary(multi: Any) -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    b = np.array([[10, 20, 30], [1, 1, 1]], dtype=np.int32)
    c = _client(multi)
    try:
        meta = c.get_model_metadata("multi")
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
            ("a", "INT32"),
            ("b", "INT32"),
        ]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
            ("sum", "INT32"),
            ("prod", "FP64"),
        ]
        inputs = [_input("a", a, "INT32", True), _input("b", b, "INT32", False)]
        only = c.infer("multi", inputs, outputs=[triton.InferRequestedOutput("prod")])
        assert [o["name"] for o in only.get_response()["outputs"]] == ["prod"]
        assert only.as_numpy("sum") is None
        np.testing.assert_array_equal(only.as_numpy("prod"), (a * b).astype("f8"))
        both = c.infer(
            "multi",
            inputs,
            outputs=[
                triton.InferRequestedOutput("sum", binary_data=False),
                triton.InferRequestedOutput("prod", binary_data=True),
            ],
        )
        assert "data" in both.get_output("sum")
        assert "parameters" in both.get_output("prod")
        assert both.as_numpy("sum").dtype == np.int32
        np.testing.assert_array_equal(both.as_numpy("sum"), a + b)
        np.testing.assert_array_equal(both.as_numpy("prod"), a * b)
        with pytest.raises(InferenceServerException) as info:
            c.infer("multi", inputs, outputs=[triton.InferRequestedOutput("nope")])
        assert info.value.status() == "400"
        assert "unknown output 'nope'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            c.infer("multi", inputs[:1])
        assert info.value.status() == "400"
        assert "missing input(s) 'b'" in info.value.message()
    finally:
        c.close()


_VALUES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[0.1, -1e30, 3.5]], dtype=np.float32),
    "FP64": np.array([[0.1, -1e300, 3.5]], dtype=np.float64),
    "BYTES": np.array([[b"", b"abc", "n\u00e4me".encode()]], dtype=object),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(_VALUES))
def test_every_datatype_round_trips_exactly(identity: Any, datatype: str, binary: bool) -> None:
    """Through the identity model: what goes in comes back with the same datatype and values."""
    value = _VALUES[datatype]
    c = _client(identity)
    try:
        result = c.infer(
            "ident",
            [_input("t", value, datatype, binary)],
            outputs=[triton.InferRequestedOutput("t", binary_data=binary)],
        )
    finally:
        c.close()
    assert result.get_output("t")["datatype"] == datatype
    got = result.as_numpy("t")
    assert got.shape == value.shape
    if datatype == "BYTES":
        # JSON carries BYTES as strings, and tritonclient leaves them str
        as_bytes = [v.encode() if isinstance(v, str) else v for v in got.ravel().tolist()]
        assert as_bytes == value.ravel().tolist()
    else:
        assert got.dtype == DATATYPES[datatype].newbyteorder("=")
        np.testing.assert_array_equal(got, value)


def test_keras_model_from_the_store(tmp_path: Any, keras_mlp_factory: Any) -> None:
    """A real Keras checkpoint: metadata, config and answers come from the loaded model."""
    model = keras_mlp_factory(in_dim=8, hidden=16, out_dim=3, seed=5)
    src = tmp_path / "src"
    src.mkdir()
    model.save(src / "model.keras")
    store = LocalStore(tmp_path / "store")
    store.add("mlp", src)
    with running_server("mlp", store=store.url) as server:
        c = _client(server)
        try:
            meta = c.get_model_metadata("mlp")
            assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
            (out,) = meta["outputs"]
            assert out["datatype"] == "FP32"
            assert out["shape"] == [-1, 3]
            config = c.get_model_config("mlp")
            assert config["input"][0]["dims"] == [8]
            assert config["output"][0]["dims"] == [3]
            x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
            for binary in (True, False):
                result = c.infer(
                    "mlp",
                    [_input("x", x, "FP32", binary)],
                    outputs=[triton.InferRequestedOutput(out["name"], binary_data=binary)],
                )
                np.testing.assert_allclose(
                    result.as_numpy(out["name"]),
                    np.asarray(model.predict_on_batch(x)),
                    rtol=1e-5,
                    atol=1e-6,
                )
        finally:
            c.close()


# -- errors ---------------------------------------------------------------------------------------


def _post_infer(server: Any, body: bytes, headers: dict[str, str], model: str = "tiny") -> Any:
    status, resp_headers, raw = raw_post(
        server.url, body, headers, path=f"/v2/models/{model}/infer"
    )
    return status, resp_headers, json.loads(raw)


def test_errors_with_tritonclient(client: triton.InferenceServerClient) -> None:
    x = _x(2)
    cases = [
        (lambda: client.infer("nope", [_input("x", x, "FP32", True)]), "404", "unknown model"),
        (
            lambda: client.infer("tiny", [_input("x", x, "FP32", True)], model_version="2"),
            "404",
            "unknown version",
        ),
        (lambda: client.infer("tiny", [_input("z", x, "FP32", True)]), "400", "unknown input"),
        (
            lambda: client.infer("tiny", [_input("x", _x(2)[:, :15].copy(), "FP32", True)]),
            "400",
            "expects shape",
        ),
        (
            lambda: client.infer("tiny", [_input("x", x.astype(bool), "BOOL", True)]),
            "400",
            "expects float32",
        ),
        (lambda: client.get_model_metadata("nope"), "404", "unknown model"),
        (lambda: client.get_model_config("nope"), "404", "unknown model"),
    ]
    for call, status, text in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == status, info.value
        assert text in info.value.message(), info.value.message()
    # the server keeps answering correctly afterwards
    result = client.infer("tiny", [_input("x", x, "FP32", True)])
    np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)


def _binary_body(n: int) -> tuple[bytes, dict[str, str]]:
    """A request whose x claims 64 bytes of binary data, followed by ``n`` bytes."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    ).encode()
    return head + b"\0" * n, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize(
    ("body", "headers", "text"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "JSON object"),
        (b'{"inputs": []}', {}, "non-empty 'inputs'"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1, 16], "data": []}]}',
            {},
            "unsupported datatype 'FP99'",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [1, 2]}]}',
            {},
            "has 16 elements but 'data' has 2",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -3], "data": []}]}',
            {},
            "non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}',
            {},
            "out of the range of INT8",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16]}]}',
            {},
            "neither 'data' nor",
        ),
        (*_binary_body(60), "only 60 bytes"),
        (*_binary_body(68), "4 bytes of binary data that no input claims"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "the body has 2 bytes"),
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, "cannot decompress"),
        (b"{}", {"Content-Encoding": "br"}, "unsupported Content-Encoding"),
    ],
)
def test_malformed_requests_get_400_with_an_error_string(
    tiny: Any, body: bytes, headers: dict[str, str], text: str
) -> None:
    status, resp_headers, doc = _post_infer(
        tiny, body, {"Content-Type": "application/json", **headers}
    )
    assert status == 400, doc
    assert resp_headers["content-type"].startswith("application/json")
    assert isinstance(doc["error"], str)
    assert text in doc["error"], doc["error"]


def test_bytes_length_prefixes_are_checked() -> None:
    good = serialize_bytes(np.array([b"ab", b""], dtype=object))
    assert good == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(good)},
                }
            ]
        }
    ).encode()
    req = decode_infer_request(head + good, str(len(head)))
    assert req.inputs["s"].tolist() == [b"ab", b""]
    from studioserve.errors import RequestFailed

    bad = b"\x09\x00\x00\x00ab"
    head = head.replace(str(len(good)).encode(), str(len(bad)).encode())
    with pytest.raises(RequestFailed, match="says it has 9 bytes but only 2"):
        decode_infer_request(head + bad, str(len(head)))


def test_oversized_body_gets_413() -> None:
    with running_server("tiny", model=_tiny_model(), max_body=2048) as server:
        body, headers = encode_infer_request({"x": _x(64)})
        status, _, doc = _post_infer(server, body, headers)
        assert status == 413
        assert "larger than the limit of 2048 bytes" in doc["error"]
        gz = gzip.compress(json.dumps({"inputs": [], "pad": "x" * 5000}).encode())
        status, _, doc = _post_infer(server, gz, {"Content-Encoding": "gzip"})
        assert status == 413
        assert "decompressed request is larger" in doc["error"]


# -- batching with pickle requests ----------------------------------------------------------------


def test_oip_and_pickle_requests_share_a_batch() -> None:
    gate = threading.Event()
    first_call = threading.Event()
    calls: list[int] = []

    def fn(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        first_call.set()
        gate.wait(30)
        return batch @ W

    pipe = ModelPipe(name="gated")
    pipe.add(fn, max_batch_size=64, name="gated")
    loaded = PipeModel(
        pipe,
        source="gated",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
    )
    with running_server("gated", model=loaded) as server:
        c = _client(server)
        try:
            x1, x2, x3 = _x(1, 1), _x(2, 2), _x(3, 3)
            with ThreadPoolExecutor(3) as pool:
                # tritonclient (gevent) stays on this thread; the others post raw requests
                body1, headers1 = encode_infer_request({"x": x1}, binary=False)
                first = pool.submit(raw_post, server.url, body1, headers1, "/v2/models/gated/infer")
                assert first_call.wait(30)
                oip = pool.submit(
                    raw_post,
                    server.url,
                    encode_infer_request({"x": x2})[0],
                    encode_infer_request({"x": x2})[1],
                    "/v2/models/gated/infer",
                )
                pkl = pool.submit(raw_post, server.url, pickle.dumps({"k": x3}))
                while pipe.stats().in_flight < 3:  # both queued behind the gated batch
                    threading.Event().wait(0.005)
                gate.set()
                s1, h1, b1 = first.result(30)
                s2, h2, b2 = oip.result(30)
                s3, _, b3 = pkl.result(30)
            assert calls == [1, 5], calls
            assert s1 == 200
            y1 = decode_infer_response(b1, h1.get("inference-header-content-length"))["outputs"][
                "y"
            ]
            np.testing.assert_allclose(y1, x1 @ W, rtol=1e-6)
            assert s2 == 200
            y2 = decode_infer_response(b2, h2.get("inference-header-content-length"))
            np.testing.assert_allclose(y2["outputs"]["y"], x2 @ W, rtol=1e-6)
            assert s3 == 200
            np.testing.assert_allclose(pickle.loads(b3)["k"], x3 @ W, rtol=1e-6)
            stats = c.get_inference_statistics("gated")["model_stats"][0]
            assert stats["execution_count"] == 2
            assert stats["inference_count"] == 6
            sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
            assert sizes == {1: 1, 5: 1}
        finally:
            c.close()


# -- Triton extensions: the shapes perf_analyzer reads --------------------------------------------


def test_model_config_has_what_perf_analyzer_reads(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("tiny")
    assert config == client.get_model_config("tiny", "1")
    assert config["name"] == "tiny"
    assert config["max_batch_size"] == 32
    assert isinstance(config["platform"], str)
    assert config["backend"] == "studioserve"
    assert config["input"] == [
        {
            "name": "x",
            "data_type": "TYPE_FP32",
            "format": "FORMAT_NONE",
            "dims": [16],
            "is_shape_tensor": False,
            "allow_ragged_batch": False,
            "optional": False,
        }
    ]
    assert config["output"][0]["name"] == "y"
    assert config["output"][0]["data_type"] == "TYPE_FP32"
    assert config["output"][0]["dims"] == [4]
    dyn = config["dynamic_batching"]
    assert dyn["max_queue_delay_microseconds"] == 2000
    assert dyn["preferred_batch_size"] == [8, 16]
    assert "sequence_batching" not in config
    assert "ensemble_scheduling" not in config
    assert config["model_transaction_policy"] == {"decoupled": False}


def test_identity_model_config_has_no_batching(identity: Any) -> None:
    c = _client(identity)
    try:
        config = c.get_model_config("ident")
        meta = c.get_model_metadata("ident")
    finally:
        c.close()
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config
    assert config["input"] == []
    assert meta["inputs"] == []


def _durations(d: dict[str, Any]) -> None:
    assert set(d) == {"count", "ns"}
    assert isinstance(d["count"], int)
    assert isinstance(d["ns"], int)
    assert d["count"] >= 0
    assert d["ns"] >= 0


def test_statistics_count_known_traffic() -> None:
    with running_server("stats", model=_tiny_model()) as server:
        c = _client(server)
        try:
            before = c.get_inference_statistics("stats")["model_stats"][0]
            assert before["inference_count"] == 0
            assert before["inference_stats"]["success"]["count"] == 0
            for n in (2, 2, 2):
                c.infer("stats", [_input("x", _x(n), "FP32", True)])
            for _ in range(2):
                raw_post(server.url, pickle.dumps({"a": _x(1)[0]}))
            with pytest.raises(InferenceServerException):
                c.infer("stats", [_input("x", _x(2)[:, :3].copy(), "FP32", True)])
            everything = c.get_inference_statistics()
            versioned = c.get_inference_statistics("stats", "1")
            stats = c.get_inference_statistics("stats")
        finally:
            c.close()
    assert everything == versioned == stats
    (s,) = stats["model_stats"]
    assert s["name"] == "stats"
    assert s["version"] == "1"
    assert s["last_inference"] > 0
    inf = s["inference_stats"]
    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _durations(inf[key])
    assert inf["success"]["count"] == 5
    assert inf["fail"]["count"] == 1
    assert s["inference_count"] == 3 * 2 + 2  # rows computed
    assert 1 <= s["execution_count"] <= 5
    assert inf["queue"]["count"] == 5  # items through the model stage
    assert inf["compute_infer"]["count"] == 5
    assert inf["success"]["ns"] >= inf["compute_infer"]["ns"] / 5
    assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"]
    for b in s["batch_stats"]:
        assert b["batch_size"] >= 1
        for key in ("compute_input", "compute_infer", "compute_output"):
            _durations(b[key])


# -- auth -----------------------------------------------------------------------------------------


def test_infer_needs_the_token_when_auth_is_on() -> None:
    with running_server("tiny", model=_tiny_model(), token="t0ken") as server:
        c = _client(server)
        try:
            x = _x(2)
            with pytest.raises(InferenceServerException) as info:
                c.infer("tiny", [_input("x", x, "FP32", True)])
            assert info.value.status() == "401"
            auth = {"Authorization": "Bearer t0ken"}
            result = c.infer("tiny", [_input("x", x, "FP32", True)], headers=auth)
            np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)
            assert c.get_model_metadata("tiny", headers=auth)["name"] == "tiny"
        finally:
            c.close()


def test_health_probes_need_no_token() -> None:
    with running_server("tiny", model=_tiny_model(), token="t0ken") as server:
        c = _client(server)
        try:
            assert c.is_server_live()
            assert c.is_server_ready()
        finally:
            c.close()


def test_unknown_v2_routes_answer_in_the_oip_error_body(
    tiny: Any, client: triton.InferenceServerClient
) -> None:
    """tritonclient formats any /v2 error from ``{"error": "message"}``; unknown routes too."""
    status, _, body = raw_post(tiny.url, b"{}", path="/v2/repository/nothing")
    assert status == 404
    assert json.loads(body) == {
        "error": "no such route '/v2/repository/nothing' in the Open Inference Protocol"
    }
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    # the repository extension answers (a server built around one model has no model control)
    assert client.get_model_repository_index() == [
        {"name": "tiny", "version": "1", "state": "READY"}
    ]
    with pytest.raises(InferenceServerException, match="fixed"):
        client.load_model("tiny")
    with urllib.request.urlopen(tiny.url + "/v2/models/tiny/stats") as resp:
        assert json.loads(resp.read())["model_stats"][0]["name"] == "tiny"
