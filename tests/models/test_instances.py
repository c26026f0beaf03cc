"""Models as several instances: one batching stage, one queue, a copy of the model per instance.

The device rule is pure (:func:`default_devices`) and tested for GPU machines here; the Keras
and SavedModel copies run for real on this machine's CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ModelLoadError
from studioserve.models import KerasModel, Model, PipeModel, SavedModel
from studioserve.models.keras import default_devices, instance_devices, load_keras, visible_gpus
from studioserve.pipelines import ModelPipe
from studioserve.tensors import TensorSpec

WAIT = 10.0


# -- where the instances go ----------------------------------------------------------------------


def test_without_gpus_every_instance_is_on_the_cpu() -> None:
    assert default_devices(1, []) == ["CPU"]
    assert default_devices(3, ()) == ["CPU", "CPU", "CPU"]


def test_more_instances_than_gpus_go_round_robin() -> None:
    assert default_devices(4, ["GPU:0", "GPU:1"]) == ["GPU:0", "GPU:1", "GPU:0", "GPU:1"]
    assert default_devices(1, ["GPU:0", "GPU:1"]) == ["GPU:0"]


def test_as_many_instances_as_gpus_put_one_on_each() -> None:
    gpus = ["GPU:0", "GPU:1", "GPU:2", "GPU:3"]
    assert default_devices(4, gpus) == gpus


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_instances_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ValueError, match="instances must be an integer >= 1"):
        default_devices(bad, [])
    with pytest.raises(ValueError, match="instances must be an integer >= 1"):
        instance_devices(bad, None)


def test_explicit_devices_are_one_per_instance() -> None:
    assert instance_devices(2, ["GPU:1", " CPU "]) == ["GPU:1", "CPU"]
    with pytest.raises(ValueError, match="1 devices for 2 instances"):
        instance_devices(2, ["CPU"])
    with pytest.raises(ValueError, match="a list of labels"):
        instance_devices(1, "CPU")
    with pytest.raises(ValueError, match="non-empty"):
        instance_devices(1, [""])
    assert instance_devices(2, None) == default_devices(2, visible_gpus())


# -- a pipe model reports its model stage's instances --------------------------------------------


def test_a_pipe_model_runs_two_requests_on_two_instances_at_once() -> None:
    entered = [threading.Event(), threading.Event()]
    release = threading.Event()

    def copy(i: int) -> Callable[[np.ndarray], np.ndarray]:
        def run(batch: np.ndarray) -> np.ndarray:
            entered[i].set()
            assert release.wait(WAIT)
            return batch.sum(axis=1, keepdims=True) + i * 0  # both copies answer alike

        return run

    copies = [copy(0), copy(1)]
    pipe = ModelPipe()
    pipe.add(copies[0], max_batch_size=4, name="sum", instances=copies, devices=["CPU", "CPU"])
    model = PipeModel(pipe, source="t", inputs=[TensorSpec("x", (2,), "float32")])
    assert (model.instances, model.devices) == (2, ("CPU", "CPU"))
    assert model.describe().endswith("x 2 instances on CPU")
    model.start()
    results: dict[str, Any] = {}

    def ask(key: str, value: list[float]) -> None:
        results[key] = model.predict({key: value}, timeout=WAIT)[key]

    try:
        first = threading.Thread(target=ask, args=("a", [1, 2]))
        first.start()
        assert any(e.wait(WAIT) for e in entered)
        second = threading.Thread(target=ask, args=("b", [3, 4]))
        second.start()
        assert all(e.wait(WAIT) for e in entered)  # both instances hold a request's batch
        release.set()
        first.join(WAIT)
        second.join(WAIT)
    finally:
        release.set()
        model.close()
    np.testing.assert_allclose(results["a"], [3.0])
    np.testing.assert_allclose(results["b"], [7.0])
    st = pipe.stats().stages["sum"]
    assert [i.batches for i in st.instances] == [1, 1]


def test_one_instance_says_nothing_more() -> None:
    pipe = ModelPipe()
    pipe.add(lambda b: b, max_batch_size=4, name="m")
    model = PipeModel(pipe, source="t")
    assert (model.instances, model.devices) == (1, ())  # not placed: no labels
    assert model.describe() == "pipe model from t: inputs (any) -> outputs (any)"
    model.close()


def test_the_model_base_class_defaults_to_one_unplaced_instance() -> None:
    class Plain(Model):
        def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
            return data

    plain = Plain(source="p")
    assert (plain.instances, plain.devices) == (1, ())


# -- real Keras and SavedModel copies ------------------------------------------------------------


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 8)).astype(np.float32)


def _predict_each(model: Model, x: np.ndarray) -> np.ndarray:
    model.start()
    out = model.predict({str(i): x[i] for i in range(len(x))}, timeout=30)
    return np.stack([out[str(i)] for i in range(len(x))])


def test_two_keras_instances_answer_as_one_does(
    tmp_path: Path, keras_mlp_factory: Callable[..., Any]
) -> None:
    path = tmp_path / "mlp.keras"
    keras_mlp_factory().save(path)
    one = KerasModel(
        load_keras(path), source=str(path), max_batch_size=4, max_delay=0.0, queue_size=64
    )
    two = KerasModel(
        load_keras(path),
        source=str(path),
        max_batch_size=4,
        max_delay=0.0,
        queue_size=64,
        instances=2,
    )
    try:
        x = _rows(12)
        np.testing.assert_allclose(
            _predict_each(two, x), _predict_each(one, x), rtol=1e-5, atol=1e-6
        )
        st = two.pipe.stats().stages["keras"]
        assert len(st.instances) == 2
        assert sum(i.items for i in st.instances) == st.items == 12
        assert two.instances == 2
        assert two.devices == tuple(default_devices(2, visible_gpus()))
        assert "x 2 instances on " in two.describe()
        assert " instances" not in one.describe()
        a, b = two.keras_models
        assert a is two.keras_model
        assert b is not a
        assert all(
            np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
        )
    finally:
        one.close()
        two.close()


def _lookup_model() -> Any:
    """A model whose state is not all in its weights: an adapted lookup table (a clone of it
    has an empty table and fails)."""
    import keras

    lookup = keras.layers.IntegerLookup(output_mode="one_hot")
    lookup.adapt(np.array([[3], [5], [7]]))
    x = keras.Input((1,), dtype="int64", name="x")
    return keras.Model(x, keras.layers.Dense(2, name="y")(lookup(x)))


def test_a_model_that_does_not_clone_is_loaded_again_from_its_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "lookup.keras"
    _lookup_model().save(path)
    caplog.set_level(logging.INFO, logger="studioserve.models.keras")
    model = KerasModel(
        load_keras(path),
        source=str(path),
        max_batch_size=4,
        max_delay=0.0,
        queue_size=16,
        instances=2,
    )
    try:
        x = np.array([[3], [5], [9]], np.int64)
        got = _predict_each(model, x)
        want = np.asarray(model.keras_model(x, training=False))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert model.instances == 2
        assert model.keras_models[1] is not model.keras_model
        assert f"loading {path} again for another instance" in caplog.text
    finally:
        model.close()


def test_a_model_object_that_does_not_clone_names_the_fix() -> None:
    with pytest.raises(ModelLoadError, match="cannot make another instance of wrapper.py"):
        KerasModel(
            _lookup_model(),
            source="wrapper.py",
            max_batch_size=4,
            max_delay=0.0,
            queue_size=16,
            instances=2,
        )


def test_two_savedmodel_instances_answer_as_one_does(
    tmp_path: Path, keras_mlp_factory: Callable[..., Any]
) -> None:
    folder = tmp_path / "export"
    keras_mlp_factory().export(folder, verbose=False)
    one = SavedModel(folder, max_batch_size=4, max_delay=0.0, queue_size=64)
    two = SavedModel(
        folder, max_batch_size=4, max_delay=0.0, queue_size=64, instances=2, devices=["CPU", "CPU"]
    )
    try:
        x = _rows(6)
        np.testing.assert_allclose(
            _predict_each(two, x), _predict_each(one, x), rtol=1e-5, atol=1e-6
        )
        assert (two.instances, two.devices) == (2, ("CPU", "CPU"))
        assert len(two.pipe.stats().stages["savedmodel"].instances) == 2
        assert one.instances == 1
    finally:
        one.close()
        two.close()
