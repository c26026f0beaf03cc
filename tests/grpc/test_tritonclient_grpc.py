"""The gRPC API driven by tritonclient.grpc (a real client no one here wrote), sync and async,
against the real server on a loopback port: health, metadata, configuration, statistics,
inference, the repository extension, auth, and errors with their gRPC codes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from tritonclient.utils import InferenceServerException

from studioserve.runtime import ModelServer
from tests.grpc.conftest import TOKEN, W
from tests.helpers import raw_post


@pytest.fixture
def client(tiny: ModelServer) -> Iterator[tg.InferenceServerClient]:
    assert tiny.grpc_address is not None
    c = tg.InferenceServerClient(tiny.grpc_address)
    yield c
    c.close()


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def _input(arr: np.ndarray, name: str = "x", datatype: str = "FP32") -> tg.InferInput:
    t = tg.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


def _http_json(server: ModelServer, path: str) -> Any:
    status, _, body = raw_post(server.url, None, path=path, method="GET")
    assert status == 200, body
    return json.loads(body)


def _code(e: InferenceServerException) -> str:
    return str(e.status())


# -- health and metadata ----------------------------------------------------------------------


def test_health_and_server_metadata(client: tg.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("other")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "studioserve"
    assert {"model_configuration", "statistics", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_is_the_http_document(
    tiny: ModelServer, client: tg.InferenceServerClient
) -> None:
    meta = client.get_model_metadata("tiny")
    assert meta.name == "tiny"
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 4])]
    http = _http_json(tiny, "/v2/models/tiny")
    assert meta.platform == http["platform"]
    assert client.get_model_metadata("tiny", "1") == meta


def test_model_config_is_the_http_document(
    tiny: ModelServer, client: tg.InferenceServerClient
) -> None:
    config = client.get_model_config("tiny").config
    http = _http_json(tiny, "/v2/models/tiny/config")
    assert config.name == "tiny"
    assert config.max_batch_size == http["max_batch_size"] == 32
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [16])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [4])]
    assert tg.model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_FP32"
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].count == 1


# -- inference ----------------------------------------------------------------------------------


def test_sync_infer_matches_the_model(client: tg.InferenceServerClient) -> None:
    x = _x(3)
    result = client.infer(
        "tiny",
        [_input(x)],
        outputs=[tg.InferRequestedOutput("y")],
        request_id="req-7",
        model_version="1",
    )
    np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "req-7")
    # without requested outputs every output comes back; one example without a batch axis too
    one = client.infer("tiny", [_input(x[0])])
    np.testing.assert_allclose(one.as_numpy("y"), x[0] @ W, rtol=1e-6)


def test_async_infer_concurrent_calls(tiny: ModelServer) -> None:
    assert tiny.grpc_address is not None
    address = tiny.grpc_address

    async def run() -> list[np.ndarray]:
        c = tga.InferenceServerClient(address)
        try:
            assert await c.is_model_ready("tiny")
            results = await asyncio.gather(
                *(c.infer("tiny", [_input(_x(2, seed))]) for seed in range(8))
            )
            return [r.as_numpy("y") for r in results]
        finally:
            await c.close()

    outputs = asyncio.run(run())
    for seed, y in enumerate(outputs):
        np.testing.assert_allclose(y, _x(2, seed) @ W, rtol=1e-6)


def test_statistics_count_grpc_requests(client: tg.InferenceServerClient) -> None:
    def stats() -> Any:
        (s,) = client.get_inference_statistics("tiny").model_stats
        return s

    before = stats()
    for _ in range(3):
        client.infer("tiny", [_input(_x(2))])
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [_input(_x(2)[:, :3])])
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count == 6
    everything = client.get_inference_statistics().model_stats
    assert [s.name for s in everything] == ["tiny"]


# -- errors and their codes ---------------------------------------------------------------------


def test_errors_carry_grpc_codes(client: tg.InferenceServerClient) -> None:
    x = _x(2)
    cases = [
        (lambda: client.infer("nope", [_input(x)]), "NOT_FOUND", "unknown model 'nope'"),
        (lambda: client.infer("tiny", [_input(x)], model_version="9"), "NOT_FOUND", "version"),
        (lambda: client.infer("tiny", [_input(x, "z")]), "INVALID_ARGUMENT", "unknown input"),
        (lambda: client.infer("tiny", [_input(x[:, :5])]), "INVALID_ARGUMENT", "'x'"),
        (
            lambda: client.infer("tiny", [_input(x)], outputs=[tg.InferRequestedOutput("w")]),
            "INVALID_ARGUMENT",
            "unknown output 'w'",
        ),
        (lambda: client.get_model_metadata("nope"), "NOT_FOUND", "unknown model"),
        (lambda: client.get_model_config("nope"), "NOT_FOUND", "unknown model"),
    ]
    for call, code, text in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert _code(info.value) == f"StatusCode.{code}", info.value
        assert text in info.value.message(), info.value


def test_unimplemented_extensions_say_so(client: tg.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert _code(info.value) == "StatusCode.UNIMPLEMENTED"


# -- auth ---------------------------------------------------------------------------------------


def test_the_token_is_required_in_the_metadata(secured: ModelServer) -> None:
    assert secured.grpc_address is not None
    c = tg.InferenceServerClient(secured.grpc_address)
    try:
        assert c.is_server_live()  # the probes need no token
        assert c.is_server_ready()
        accepted = secured.service.activity.accepted if secured.service else 0
        for call in (
            lambda h: c.infer("tiny", [_input(_x(1))], headers=h),
            lambda h: c.get_model_metadata("tiny", headers=h),
            lambda h: c.get_model_repository_index(headers=h),
        ):
            for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
                with pytest.raises(InferenceServerException) as info:
                    call(headers)
                assert _code(info.value) == "StatusCode.UNAUTHENTICATED"
                assert "authorization: Bearer <token>" in info.value.message()
        assert secured.service is not None
        assert secured.service.activity.accepted == accepted  # refused: not activity
        good = {"authorization": f"Bearer {TOKEN}"}
        result = c.infer("tiny", [_input(_x(2))], headers=good)
        np.testing.assert_allclose(result.as_numpy("y"), _x(2) @ W, rtol=1e-6)
        assert c.get_model_metadata("tiny", headers=good).name == "tiny"
        assert secured.service.activity.accepted == accepted + 1
    finally:
        c.close()


# -- the model repository extension -------------------------------------------------------------


def test_repository_index_unload_and_load(repository: ModelServer) -> None:
    assert repository.grpc_address is not None
    c = tg.InferenceServerClient(repository.grpc_address)
    try:

        def index(ready: bool = False) -> list[tuple[str, str]]:
            models = c.get_model_repository_index(as_json=True).get("models", [])
            if ready:
                models = [m for m in models if m.get("state") == "READY"]
            return [(m["name"], m["state"]) for m in models]

        assert index() == [("alpha", "READY"), ("beta", "READY")]
        x = np.arange(3, dtype=np.int32)
        got = c.infer("beta", [_input(x, "v", "INT32")]).as_numpy("v")
        np.testing.assert_array_equal(got, x)  # the identity model
        c.unload_model("beta")
        assert not c.is_model_ready("beta")
        assert ("beta", "UNAVAILABLE") in index()
        with pytest.raises(InferenceServerException) as info:
            c.infer("beta", [_input(x, "v", "INT32")])
        assert _code(info.value) == "StatusCode.NOT_FOUND"
        ready = c.get_model_repository_index(as_json=True)
        assert [m["name"] for m in ready["models"] if m.get("state") == "READY"] == ["alpha"]
        c.load_model("beta")
        assert c.is_model_ready("beta")
        assert index() == [("alpha", "READY"), ("beta", "READY")]
        with pytest.raises(InferenceServerException) as info:
            c.load_model("nothing-here")
        assert _code(info.value) == "StatusCode.NOT_FOUND"
    finally:
        c.close()
