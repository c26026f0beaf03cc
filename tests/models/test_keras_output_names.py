"""Keras output names: a dict model's keys, else the output layer's name, or ``output_0``,
``output_1``, ... where Keras named the layer itself; the same names in pickle answers, OIP
metadata and answers, and gRPC."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tg

from studioserve.models.keras import KerasModel, load_keras
from studioserve.pipelines.keras_stage import keras_signature
from tests.helpers import raw_post, running_server

keras = pytest.importorskip("keras")


def _names(model: Any) -> list[str]:
    return [s.name for s in keras_signature(model)[1]]


def _x() -> Any:
    return keras.Input(shape=(4,), name="x")


def test_named_layers_name_the_outputs_and_unnamed_ones_are_numbered() -> None:
    x = _x()
    assert _names(keras.Model(x, keras.layers.Dense(2, name="probs")(x))) == ["probs"]
    assert _names(keras.Model(x, keras.layers.Dense(2)(keras.layers.Dense(3)(x)))) == ["output_0"]
    mixed = keras.Model(x, [keras.layers.Dense(2)(x), keras.layers.Dense(3, name="b")(x)])
    assert _names(mixed) == ["output_0", "b"]
    h = keras.layers.Dense(2)(x)
    assert _names(keras.Model(x, [h, keras.layers.Activation("softmax")(h)])) == [
        "output_0",
        "output_1",
    ]
    named = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")])
    assert _names(named) == ["out"]
    assert _names(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])) == ["output_0"]


def test_a_dict_model_is_named_by_its_keys() -> None:
    x = _x()
    model = keras.Model(x, {"p": keras.layers.Dense(2)(x), "q": keras.layers.Dense(1, name="z")(x)})
    specs = keras_signature(model)[1]
    assert [(s.name, s.shape) for s in specs] == [("p", (2,)), ("q", (1,))]


def test_names_survive_a_save_and_load(tmp_path: Path) -> None:
    x = _x()
    model = keras.Model(x, [keras.layers.Dense(2, name="score")(x), keras.layers.Dense(3)(x)])
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"m{suffix}"
        model.save(path)
        assert _names(load_keras(path)) == ["score", "output_1"]


def test_pickle_oip_and_grpc_answers_carry_the_same_names() -> None:
    keras.utils.set_random_seed(3)
    x = _x()
    h = keras.layers.Dense(8, activation="relu")(x)
    net = keras.Model(x, [keras.layers.Dense(3, name="probs")(h), keras.layers.Dense(1)(h)])
    model = KerasModel(net, source="two-heads", max_batch_size=8, max_delay=0.0, queue_size=64)
    rows = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    want = [np.asarray(w) for w in net.predict_on_batch(rows)]
    with running_server("heads", model=model, grpc_port=0) as server:
        status, _, body = raw_post(server.url, pickle.dumps({"k": rows}))
        assert status == 200
        answer = pickle.loads(body)["k"]
        assert list(answer) == ["probs", "output_1"]
        for got, expected in zip(answer.values(), want, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        status, _, body = raw_post(server.url, None, path="/v2/models/heads", method="GET")
        assert [o["name"] for o in json.loads(body)["outputs"]] == ["probs", "output_1"]
        assert server.grpc_address is not None
        c = tg.InferenceServerClient(server.grpc_address)
        try:
            meta = c.get_model_metadata("heads")
            assert [o.name for o in meta.outputs] == ["probs", "output_1"]
            t = tg.InferInput("x", [2, 4], "FP32")
            t.set_data_from_numpy(rows)
            result = c.infer("heads", [t])
            assert [o.name for o in result.get_response().outputs] == ["probs", "output_1"]
            np.testing.assert_allclose(result.as_numpy("output_1"), want[1], rtol=1e-5, atol=1e-6)
        finally:
            c.close()
