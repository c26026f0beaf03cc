"""The Ray backend on a real local Ray cluster: the local server's contract through Ray
Serve's HTTP proxy, replicas that batch, autoscaling, a replica killed under load, teardown.

Every test deploys through :class:`~studioserve.rayserve.backend.RayBackend` and checks that
nothing of its application is left in the cluster afterwards.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from studioserve.config import ServeConfig
from studioserve.errors import StudioServeError
from studioserve.rayserve.backend import RayBackend
from studioserve.wire.oip_codec import decode_infer_response, encode_infer_request
from tests.helpers import error_of, raw_post
from tests.rayserve.conftest import (
    assert_nothing_left,
    wait_for,
)

pytestmark = pytest.mark.allow_thread_leak  # Ray's driver keeps its own threads

TOKEN = "ray-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(store: str, key: str, port: int, **changes: Any) -> ServeConfig:
    return ServeConfig(
        key=key, store=store, port=port, killafter=0, backend="ray", token=TOKEN, **changes
    )


def _pickle(url: str, data: dict[str, Any], path: str = "/") -> tuple[int, dict[str, str], Any]:
    status, headers, body = raw_post(
        url, pickle.dumps(data), {**AUTH, "Content-Type": "application/x-pickle"}, path=path
    )
    if status == 200:
        return status, headers, pickle.loads(body)  # noqa: S301 - our server's own answer
    return status, headers, json.loads(body)


def _status(url: str) -> dict[str, Any]:
    status, _, body = raw_post(url, None, {**AUTH, "Accept": "application/json"}, method="GET")
    assert status == 200, body
    info: dict[str, Any] = json.loads(body)
    return info


def test_a_model_that_cannot_load_is_a_clear_error_and_leaves_nothing(
    ray_cluster: int, onnx_store: tuple[str, np.ndarray]
) -> None:
    store, _ = onnx_store
    with pytest.raises(StudioServeError, match="failed to start") as caught:
        RayBackend(_config(store, "broken", ray_cluster)).start()
    assert "model-broken" in str(caught.value), caught.value
    assert_nothing_left()


def test_a_second_application_of_the_same_name_is_refused(
    ray_cluster: int, onnx_store: tuple[str, np.ndarray], mlp_app: RayBackend
) -> None:
    store, _ = onnx_store
    with pytest.raises(StudioServeError, match="already runs an application"):
        RayBackend(_config(store, "mlp", ray_cluster)).start()
    assert _pickle(mlp_app.url, {"a": np.ones(8, np.float32)})[0] == 200


@pytest.fixture(scope="module")
def mlp_app(ray_cluster: int, onnx_store: tuple[str, np.ndarray]) -> Iterator[RayBackend]:
    """The ONNX model on two replicas, behind the token."""
    store, _ = onnx_store
    backend = RayBackend(_config(store, "mlp", ray_cluster, replicas=2, max_body=1 << 20))
    backend.start()
    try:
        yield backend
    finally:
        backend.close()
        assert_nothing_left()


def test_pickle_and_oip_answer_like_the_model(
    mlp_app: RayBackend, onnx_store: tuple[str, np.ndarray]
) -> None:
    _, w = onnx_store
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    one = x[0]
    status, _, out = _pickle(mlp_app.url, {"many": x, "one": one})
    assert status == 200, out
    np.testing.assert_allclose(out["many"], x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["one"], one @ w, rtol=1e-5, atol=1e-5)
    status, _, out = _pickle(mlp_app.url, {"a": one}, path="/models/mlp")
    assert status == 200
    np.testing.assert_allclose(out["a"], one @ w, rtol=1e-5, atol=1e-5)

    body, headers = encode_infer_request({"x": x})
    status, resp_headers, raw = raw_post(
        mlp_app.url, body, {**headers, **AUTH}, path="/v2/models/mlp/infer"
    )
    assert status == 200, raw
    decoded = decode_infer_response(raw, resp_headers.get("inference-header-content-length"))
    np.testing.assert_allclose(decoded["outputs"]["y"], x @ w, rtol=1e-5, atol=1e-5)

    doc = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": one.tolist()}]}
    status, _, raw = raw_post(
        mlp_app.url,
        json.dumps(doc).encode(),
        {**AUTH, "Content-Type": "application/json"},
        path="/v2/models/mlp/infer",
    )
    assert status == 200, raw
    answer = json.loads(raw)["outputs"][0]
    np.testing.assert_allclose(answer["data"], (one @ w).tolist(), rtol=1e-5, atol=1e-5)

    status, _, raw = raw_post(mlp_app.url, None, AUTH, path="/v2/models/mlp", method="GET")
    assert status == 200
    meta = json.loads(raw)
    assert meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]] == ["x"]


def test_the_token_is_required_and_probes_are_public(mlp_app: RayBackend) -> None:
    x = np.zeros(8, np.float32)
    status, _, body = raw_post(mlp_app.url, pickle.dumps({"a": x}))
    assert status == 401
    status, _, body = raw_post(
        mlp_app.url, pickle.dumps({"a": x}), {"Authorization": "Bearer wrong"}
    )
    assert status == 401
    for path in ("/healthz", "/readyz"):
        status, _, _ = raw_post(mlp_app.url, None, path=path, method="GET")
        assert status == 200, path
    status, _, body = raw_post(mlp_app.url, None, path="/metrics", method="GET")
    assert status == 401  # metrics are not public when auth is on


def test_bad_requests_get_the_documented_errors(mlp_app: RayBackend) -> None:
    status, _, out = _pickle(mlp_app.url, {"a": np.zeros(7, np.float32)})
    assert status == 422, out
    assert "a" in out["error"]["keys"]
    status, _, out = _pickle(mlp_app.url, {"a": np.zeros(8, np.float32)}, path="/models/nope")
    assert status == 404
    assert "mlp" in out["error"]["message"]
    status, _, body = raw_post(mlp_app.url, b"\x80\x04not a pickle", AUTH)
    assert status == 400, body
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    status, _, body = raw_post(mlp_app.url, evil, AUTH)
    assert status == 400
    assert error_of(body)["type"] in ("unsafe_pickle", "bad_request")
    status, _, body = raw_post(mlp_app.url, b"x" * ((1 << 20) + 1), AUTH)
    assert status == 413
    # the server keeps serving
    status, _, out = _pickle(mlp_app.url, {"a": np.ones(8, np.float32)})
    assert status == 200


def test_both_replicas_batch_under_concurrent_load(mlp_app: RayBackend) -> None:
    x = np.ones(8, np.float32)

    def one(_: int) -> int:
        return _pickle(mlp_app.url, {"a": x})[0]

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(400)))
    assert statuses.count(200) == len(statuses)
    wait_for(lambda: mlp_app._tick() is not None, 5, "a tick")
    info = _status(mlp_app.url)
    model = info["models"][0]
    assert model["name"] == "mlp"
    version = model["versions"][0]
    assert version["kind"] == "ray"
    assert version["runs_as"] == "onnx"
    replicas = version["replicas"]
    assert replicas["running"] == 2
    per = replicas["per_replica"]
    assert len(per) == 2, per  # both replicas answered ...
    assert all(r["requests"] > 20 for r in per.values()), per
    assert all(r["batches"] > 0 for r in per.values()), per  # ... and batched in their pipes
    status, _, metrics = raw_post(mlp_app.url, None, AUTH, path="/metrics", method="GET")
    assert status == 200
    assert b"studioserve_requests_total" in metrics
