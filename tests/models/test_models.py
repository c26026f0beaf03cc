"""The Model protocol's implementations, each picked once by the loader and used alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import InvalidInput, ModelLoadError, RequestFailed
from studioserve.models import (
    CallableModel,
    IdentityModel,
    KerasModel,
    Model,
    PipeModel,
    SavedModel,
    load_model,
    model_from_object,
)
from studioserve.pipelines import ModelPipe
from studioserve.tensors import TensorSpec


def _predict(model: Model, data: dict[str, Any]) -> dict[str, Any]:
    model.start()
    try:
        return model.predict(data, timeout=30)
    finally:
        model.close()


def test_identity_answers_with_the_request() -> None:
    model = IdentityModel(source="none")
    data = {"a": np.arange(3)}
    out = _predict(model, data)
    assert out == data
    assert out is not data
    assert not model.batches
    assert model.pipe is None
    assert model.model_stage is None
    assert model.describe() == "identity model from none: inputs (any) -> outputs (any)"


def test_callable_is_called_once_per_request_and_its_errors_are_mapped() -> None:
    calls: list[dict[str, Any]] = []

    def fn(data: dict[str, Any]) -> Any:
        calls.append(data)
        if "boom" in data:
            raise ZeroDivisionError("boom")
        if "refuse" in data:
            raise InvalidInput("not for me")
        if "list" in data:
            return [1, 2]
        return {k: v + 1 for k, v in data.items()}

    model = CallableModel(fn, source="w.py")
    assert _predict(model, {"a": 1, "b": 2}) == {"a": 2, "b": 3}
    assert len(calls) == 1
    with pytest.raises(RequestFailed) as info:
        model.predict({"boom": 1}, timeout=1)
    assert (info.value.http_status, info.value.error_type) == (500, "model_error")
    assert "ZeroDivisionError: boom" in str(info.value)
    with pytest.raises(RequestFailed) as info:
        model.predict({"refuse": 1}, timeout=1)
    assert info.value.http_status == 422
    with pytest.raises(RequestFailed, match="returned list; it must return a dict"):
        model.predict({"list": 1}, timeout=1)


def test_model_from_object_picks_the_implementation_once(keras_mlp_factory: Any) -> None:
    pipe = ModelPipe()
    pipe.add(lambda x: x * 2, max_batch_size=4, name="double")
    as_pipe = model_from_object(pipe, source="w")
    assert type(as_pipe) is PipeModel
    assert as_pipe.batches
    assert as_pipe.model_stage == "double"
    assert type(model_from_object(lambda d: d, source="w")) is CallableModel
    keras_model = model_from_object(keras_mlp_factory(), source="w", max_batch_size=4)
    assert type(keras_model) is KerasModel
    assert keras_model.model_stage == "keras"
    assert model_from_object(as_pipe, source="x") is as_pipe
    with pytest.raises(ModelLoadError, match="returned int"):
        model_from_object(3, source="w")
    for m in (as_pipe, keras_model):
        m.close()


def test_pipe_model_validates_each_key_once_before_the_pipe() -> None:
    pipe = ModelPipe()
    pipe.add(lambda batch: batch.sum(axis=1, keepdims=True), max_batch_size=8, name="sum")
    model = PipeModel(pipe, source="t", inputs=[TensorSpec("x", (3,), "float32")], outputs=[])
    model.start()
    try:
        out = model.predict({"one": [1, 2, 3], "many": np.ones((2, 3), np.int64)}, timeout=10)
        np.testing.assert_allclose(out["one"], [6.0])
        assert out["many"].shape == (2, 1)
        with pytest.raises(RequestFailed) as info:
            model.predict(
                {"ok": [1, 2, 3], "bad": [1.5, 2.5], "ints": [True, False, True]}, timeout=5
            )
        assert info.value.http_status == 422
        assert set(info.value.keys) == {"bad", "ints"}
        assert "2 of 3 key(s) failed" in str(info.value)
        assert pipe.stats().stages["sum"].items == 2  # the failed request queued nothing
    finally:
        model.close()


def test_a_multi_input_keras_model_takes_a_dict_per_key() -> None:
    import keras

    a = keras.Input(shape=(2,), name="a")
    b = keras.Input(shape=(3,), name="b")
    y = keras.layers.Concatenate(name="ab")([a, b])
    model = KerasModel(
        keras.Model([a, b], y), source="mem", max_batch_size=8, max_delay=0.0, queue_size=16
    )
    assert [s.name for s in model.inputs] == ["a", "b"]
    out = _predict(
        model,
        {"k": {"a": [1, 2], "b": [3, 4, 5]}, "n": {"a": np.ones((2, 2)), "b": np.zeros((2, 3))}},
    )
    np.testing.assert_allclose(out["k"], [1, 2, 3, 4, 5])
    assert out["n"].shape == (2, 5)


def test_load_model_chooses_by_what_modeldir_holds(
    tmp_path: Path, keras_mlp_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="studioserve.models.loader"):
        ident = load_model(empty)
    assert type(ident) is IdentityModel
    assert "serving the identity model" in caplog.text

    keras_dir = tmp_path / "keras"
    keras_dir.mkdir()
    keras_mlp_factory().save(keras_dir / "model.keras")
    model = load_model(keras_dir, max_batch_size=4)
    try:
        assert type(model) is KerasModel
        assert model.load_seconds > 0
        assert model.source.endswith("model.keras")
        assert [s.describe() for s in model.inputs] == ["x: float32[8]"]
    finally:
        model.close()

    saved_dir = tmp_path / "saved"
    keras_mlp_factory().export(saved_dir / "export", verbose=False)
    saved = load_model(saved_dir)
    try:
        assert type(saved) is SavedModel
        out = _predict(saved, {"a": np.zeros(8, np.float32)})
        assert out["a"].shape == (3,)
    finally:
        saved.close()
