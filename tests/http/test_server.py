"""The real server on an ephemeral loopback port, with real small Keras models."""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve import wire
from studioserve.client import Client
from studioserve.errors import ClientError
from studioserve.models import CallableModel, PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.store.local import LocalStore
from tests.helpers import error_of, gated_pipe, post_pickle, raw_post, running_server

IN_DIM = 8
OUT_DIM = 3


@pytest.fixture(scope="module")
def keras_model(keras_mlp_factory: Any) -> Any:
    return keras_mlp_factory(in_dim=IN_DIM, hidden=16, out_dim=OUT_DIM, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, keras_model: Any) -> LocalStore:
    """A store with the same model saved as .keras, .h5 and a SavedModel, plus an empty one."""
    root = tmp_path_factory.mktemp("serve_store")
    store = LocalStore(root / "store")
    for fmt in ("keras", "h5"):
        src = root / f"src_{fmt}"
        src.mkdir()
        keras_model.save(src / f"model.{fmt}")
        store.add(f"mlp-{fmt}", src)
    src = root / "src_savedmodel"
    src.mkdir()
    keras_model.export(str(src / "exported"), verbose=False)
    store.add("mlp-savedmodel", src)
    empty = root / "src_empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no checkpoint here")
    store.add("empty", empty)
    return store


@pytest.fixture(scope="module")
def keras_server(store: LocalStore) -> Iterator[Any]:
    with running_server("mlp-keras", store=store.url) as server:
        yield server


def _x(n: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (IN_DIM,) if n is None else (n, IN_DIM)
    return rng.standard_normal(shape).astype(np.float32)


def _expected(model: Any, x: np.ndarray) -> np.ndarray:
    batch = x[np.newaxis] if x.ndim == 1 else x
    out = np.asarray(model.predict_on_batch(batch))
    return out[0] if x.ndim == 1 else out


@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_predictions_equal_the_models_own(store: LocalStore, keras_model: Any, fmt: str) -> None:
    with running_server(f"mlp-{fmt}", store=store.url) as server, Client(server.url) as client:
        one, many, other = _x(), _x(5, seed=1), _x(2, seed=2)
        out = client.predict({"one": one, "many": many, "other": other})
        assert set(out) == {"one", "many", "other"}
        assert out["one"].shape == (OUT_DIM,)
        assert out["many"].shape == (5, OUT_DIM)
        np.testing.assert_allclose(out["one"], _expected(keras_model, one), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["many"], _expected(keras_model, many), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            out["other"], _expected(keras_model, other), rtol=1e-5, atol=1e-6
        )
        assert [s.shape for s in server.service.inputs] == [(IN_DIM,)]


def test_json_and_npz_bodies(keras_server: Any, keras_model: Any) -> None:
    x = _x(2, seed=4)
    status, headers, body = raw_post(
        keras_server.url,
        json.dumps({"a": x.tolist()}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    np.testing.assert_allclose(json.loads(body)["a"], _expected(keras_model, x), rtol=1e-4)
    buf = io.BytesIO()
    np.savez(buf, a=x)
    status, headers, body = raw_post(
        keras_server.url, buf.getvalue(), {"Content-Type": "application/x-npz"}
    )
    assert status == 200, body
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["a"], _expected(keras_model, x), rtol=1e-5)


def test_concurrent_clients_share_batches(keras_model: Any) -> None:
    """Items of concurrent requests end up in one model call (the gate decides, not timing)."""
    gate = threading.Event()
    first_call = threading.Event()
    calls: list[int] = []

    def model_fn(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        first_call.set()
        gate.wait(30)
        return np.asarray(keras_model.predict_on_batch(batch))

    pipe = ModelPipe(name="gated")
    pipe.add(model_fn, max_batch_size=64)
    loaded = PipeModel(pipe, source="test")
    n_clients = 6
    with running_server(model=loaded) as server, Client(server.url) as client:
        xs = [_x(seed=i) for i in range(n_clients + 1)]
        with ThreadPoolExecutor(n_clients + 1) as pool:
            first = pool.submit(client.predict, {"k": xs[0][np.newaxis]})
            assert first_call.wait(30)
            rest = [pool.submit(client.predict, {"k": x[np.newaxis]}) for x in xs[1:]]
            # all the other requests are queued behind the first batch before it is released
            while pipe.stats().in_flight < n_clients + 1:
                threading.Event().wait(0.005)
            gate.set()
            outs = [first.result(30)] + [f.result(30) for f in rest]
    assert calls == [1, n_clients], calls
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out["k"][0], _expected(keras_model, x), rtol=1e-5, atol=1e-6)


def test_identity_fallback_returns_what_was_sent(store: LocalStore) -> None:
    with running_server("empty", store=store.url) as server, Client(server.url) as client:
        assert server.service.model.kind == "identity"
        x = np.arange(6, dtype=np.int16).reshape(2, 3)
        out = client.predict({"a": x, "b": 1.5})
        np.testing.assert_array_equal(out["a"], x)
        assert out["b"] == 1.5


REPO = Path(__file__).resolve().parents[2]


def test_increment_wrapper(store: LocalStore) -> None:
    wrapper = str(REPO / "wrappers" / "increment.py")
    with running_server("empty", store=store.url, wrapper=wrapper) as server:
        with Client(server.url) as client:
            out = client.predict({"a": np.array([1, 2, 3]), "b": np.float32(0.5)})
    np.testing.assert_array_equal(out["a"], [2, 3, 4])
    assert out["b"] == pytest.approx(1.5)


def test_keras_pipe_wrapper(store: LocalStore, keras_model: Any) -> None:
    wrapper = str(REPO / "wrappers" / "keras_pipe.py")
    with running_server("mlp-keras", store=store.url, wrapper=wrapper) as server:
        with Client(server.url) as client:
            x = (np.arange(IN_DIM * 3, dtype=np.float32).reshape(3, IN_DIM) * 7) % 255
            out = client.predict({"imgs": x, "one": x[0]})
    expected = np.argmax(keras_model.predict_on_batch(x / 255.0), axis=-1)
    np.testing.assert_array_equal(np.ravel(out["imgs"]), expected)
    np.testing.assert_array_equal(np.ravel(out["one"]), expected[:1])


def _write_wrapper(tmp_path: Path, body: str, name: str = "wrap_mod") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return path


def test_wrapper_returning_a_keras_model_by_module_name(
    store: LocalStore, keras_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_wrapper(
        tmp_path,
        "import keras, pathlib\n"
        "def create_model(modeldir):\n"
        "    path = pathlib.Path(modeldir) / 'model.keras'\n"
        "    return keras.models.load_model(path, compile=False)\n",
        name="wrapper_keras_mod",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with running_server("mlp-keras", store=store.url, wrapper="wrapper_keras_mod") as server:
        assert server.service.model.kind == "keras"
        with Client(server.url) as client:
            x = _x(3, seed=9)
            out = client.predict({"a": x})
    np.testing.assert_allclose(out["a"], _expected(keras_model, x), rtol=1e-5, atol=1e-6)


# -- bad input -------------------------------------------------------------------------------


def _still_serving(server: Any, keras_model: Any) -> None:
    x = _x(2, seed=11)
    with Client(server.url) as client:
        out = client.predict({"ok": x})
    np.testing.assert_allclose(out["ok"], _expected(keras_model, x), rtol=1e-5, atol=1e-6)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_never_runs(
    keras_server: Any, keras_model: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    status, _, body = raw_post(keras_server.url, pickle.dumps({"a": _Evil(marker)}))
    assert status == 400
    err = error_of(body)
    assert "system" in err["message"]
    assert not marker.exists()
    _still_serving(keras_server, keras_model)


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"\x00garbage\xff" * 10, {}, 400, "pickle"),
        (pickle.dumps({"a": np.ones((2, IN_DIM), np.float32)})[:-7], {}, 400, "pickle"),
        (pickle.dumps({"a": np.array([1, "x"], dtype=object)}), {}, 400, "object"),
        (b"", {}, 400, "empty"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "text/plain"),
        (pickle.dumps([1, 2, 3]), {}, 400, "dict"),
        (pickle.dumps({"a": np.array(["x"] * IN_DIM)}), {}, 400, "dtype"),
        (b"{not json", {"Content-Type": "application/json"}, 400, "JSON"),
    ],
    ids=[
        "garbage",
        "truncated",
        "object-array",
        "empty",
        "content-type",
        "not-a-dict",
        "string-array",
        "bad-json",
    ],
)
def test_undecodable_bodies(
    keras_server: Any,
    keras_model: Any,
    body: bytes,
    headers: dict[str, str],
    status: int,
    needle: str,
) -> None:
    got, resp_headers, resp = raw_post(keras_server.url, body, headers)
    assert got == status, resp
    assert resp_headers["content-type"].startswith("application/json")
    assert needle.lower() in error_of(resp)["message"].lower()
    _still_serving(keras_server, keras_model)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.ones((IN_DIM + 1,), np.float32), "shape"),
        (np.ones((2, 3, IN_DIM), np.float32), "shape"),
        (np.ones((IN_DIM,), np.complex64), "complex"),
        (np.ones((IN_DIM,), bool), "bool"),
        (np.ones((0, IN_DIM), np.float32), "0 examples"),
    ],
    ids=["wrong-width", "wrong-rank", "complex", "bool", "empty-batch"],
)
def test_wrong_shapes_and_dtypes_get_422(
    keras_server: Any, keras_model: Any, value: np.ndarray, needle: str
) -> None:
    status, _, body = post_pickle(keras_server.url, {"good": _x(), "bad": value})
    assert status == 422, body
    err = error_of(body)
    assert err["type"] == "invalid_input"
    assert set(err["keys"]) == {"bad"}
    assert needle in err["keys"]["bad"]
    _still_serving(keras_server, keras_model)


def test_ints_and_float64_are_cast_to_the_models_dtype(keras_server: Any, keras_model: Any) -> None:
    x = np.arange(IN_DIM, dtype=np.int64)
    with Client(keras_server.url) as client:
        out = client.predict({"i": x, "d": x.astype(np.float64), "l": x.tolist()})
    want = _expected(keras_model, x.astype(np.float32))
    for key in ("i", "d", "l"):
        np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-6)


def test_oversized_body_gets_413(store: LocalStore, keras_model: Any) -> None:
    with running_server("mlp-keras", store=store.url, max_body=4096) as server:
        status, _, body = post_pickle(server.url, {"a": np.zeros((1000, IN_DIM), np.float32)})
        assert status == 413
        assert "4096" in error_of(body)["message"]
        _still_serving(server, keras_model)


def test_a_model_that_raises_gets_500_and_the_server_keeps_serving() -> None:
    def fn(batch: np.ndarray) -> np.ndarray:
        if np.any(batch < 0):
            raise ValueError("negative input")
        return batch * 2

    pipe = ModelPipe(name="raising")
    pipe.add(fn, max_batch_size=8)
    loaded = PipeModel(pipe, source="test")
    with running_server(model=loaded) as server, Client(server.url) as client:
        with pytest.raises(ClientError) as info:
            client.predict({"bad": -np.ones((1, 2))})
        assert info.value.status == 500
        assert "negative input" in str(info.value)
        out = client.predict({"good": np.ones((1, 2))})
        np.testing.assert_array_equal(out["good"], 2 * np.ones((1, 2)))


def test_a_callable_that_raises_gets_500() -> None:
    def fn(data: dict[str, Any]) -> dict[str, Any]:
        if "boom" in data:
            raise RuntimeError("kaboom")
        return data

    loaded = CallableModel(fn, source="test")
    with running_server(model=loaded) as server, Client(server.url) as client:
        with pytest.raises(ClientError, match="kaboom") as info:
            client.predict({"boom": 1})
        assert info.value.status == 500
        assert client.predict({"fine": 2}) == {"fine": 2}


# -- auth, probes, routes --------------------------------------------------------------------


def test_auth_on_and_off(store: LocalStore, keras_model: Any) -> None:
    with running_server("mlp-keras", store=store.url, token="s3cret-token") as server:
        assert server.token == "s3cret-token"
        status, headers, body = post_pickle(server.url, {"a": _x()})
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")
        status, _, _ = post_pickle(server.url, {"a": _x()}, {"Authorization": "Bearer wrong"})
        assert status == 401
        assert raw_post(server.url, None, path="/healthz", method="GET")[0] == 200
        assert raw_post(server.url, None, path="/readyz", method="GET")[0] == 200
        assert raw_post(server.url, None, path="/", method="GET")[0] == 401
        assert server.service.activity.accepted == 0  # refused requests are not activity
        with Client(server.url, token="s3cret-token") as client:
            out = client.predict({"a": _x()})
        np.testing.assert_allclose(out["a"], _expected(keras_model, _x()), rtol=1e-5)
        assert server.service.activity.accepted == 1
    with running_server("mlp-keras", store=store.url) as server:
        assert server.token is None
        assert post_pickle(server.url, {"a": _x()})[0] == 200


def test_probes_and_unknown_routes(keras_server: Any) -> None:
    assert raw_post(keras_server.url, None, path="/healthz", method="GET")[0] == 200
    status, _, body = raw_post(keras_server.url, None, path="/readyz", method="GET")
    assert status == 200
    status, _, body = raw_post(keras_server.url, None, path="/nope", method="GET")
    assert status == 404
    assert error_of(body)["type"] == "not_found"
    status, _, body = raw_post(
        keras_server.url, None, path="/", method="GET", headers={"Accept": "application/json"}
    )
    assert status == 200
    assert json.loads(body)["model"]["kind"] == "keras"


def test_missing_experiment_names_the_store_and_close_keys(store: LocalStore) -> None:
    from studioserve.errors import ExperimentNotFound

    with pytest.raises(ExperimentNotFound) as info, running_server("mlp-kera", store=store.url):
        pass
    message = str(info.value)
    assert store.url in message
    assert message.index("mlp-keras") < message.index("empty")


def test_unreadable_checkpoint_is_a_startup_error(tmp_path: Path) -> None:
    from studioserve.errors import ModelLoadError

    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.keras").write_bytes(b"this is not a zip file")
    store = LocalStore(tmp_path / "store")
    store.add("broken", src)
    with (
        pytest.raises(ModelLoadError, match="broken.keras"),
        running_server("broken", store=store.url),
    ):
        pass


def test_wrapper_without_create_model_is_a_startup_error(tmp_path: Path, store: LocalStore) -> None:
    from studioserve.errors import ModelLoadError

    path = _write_wrapper(tmp_path, "x = 1\n", name="no_create")
    with (
        pytest.raises(ModelLoadError, match="create_model") as info,
        running_server("empty", store=store.url, wrapper=str(path)),
    ):
        pass
    assert str(path) in str(info.value)


def test_overload_gets_503_with_retry_after_and_recovers() -> None:
    pipe, gate, entered = gated_pipe(queue_size=1, max_batch_size=1)
    loaded = PipeModel(pipe, source="test")
    with running_server(model=loaded) as server, ThreadPoolExecutor(2) as pool:
        busy = pool.submit(post_pickle, server.url, {"a": np.zeros((1, 2))})
        assert entered.wait(30)
        queued = pool.submit(post_pickle, server.url, {"a": np.zeros((1, 2))})
        while pipe.stats().in_flight < 2:
            threading.Event().wait(0.005)
        status, headers, body = post_pickle(server.url, {"a": np.zeros((1, 2))})
        assert status == 503, body
        assert int(headers["retry-after"]) >= 1
        assert error_of(body)["type"] == "overloaded"
        gate.set()
        assert busy.result(30)[0] == 200
        assert queued.result(30)[0] == 200
        status, _, body = post_pickle(server.url, {"a": np.ones((1, 2))})
        assert status == 200
        np.testing.assert_array_equal(wire.decode_response(body, None)["a"], 2 * np.ones((1, 2)))


def test_a_request_past_its_timeout_gets_504_and_the_server_keeps_serving() -> None:
    pipe, gate, entered = gated_pipe(max_batch_size=1)
    loaded = PipeModel(pipe, source="test")
    with running_server(model=loaded, request_timeout=0.2) as server:
        status, _, body = post_pickle(server.url, {"slow": np.zeros((1, 2))})
        assert entered.is_set()
        assert status == 504, body
        err = error_of(body)
        assert err["type"] == "deadline_exceeded"
        assert "slow" in err["keys"]
        gate.set()
        status, _, body = post_pickle(server.url, {"a": np.ones((1, 2))})
        assert status == 200
        np.testing.assert_array_equal(wire.decode_response(body, None)["a"], 2 * np.ones((1, 2)))
