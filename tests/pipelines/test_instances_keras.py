"""A Keras model as a stage of several instances: a clone and a runner per instance, placed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from studioserve.pipelines import BatchEvent, ModelPipe
from studioserve.pipelines.keras_stage import KerasRunner, clone_keras_model, same_outputs

keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def mlp(keras_mlp_factory: Callable[..., Any]) -> Any:
    return keras_mlp_factory(in_dim=8, hidden=16, out_dim=3)


class Unclonable(keras.Model):  # type: ignore[misc]
    """A subclassed model built from an array: it has no config, so it does not clone."""

    def __init__(self, scale: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale
        self.dense = keras.layers.Dense(3)

    def call(self, x: Any) -> Any:
        return self.dense(x) * self.scale


def test_a_keras_model_given_instances_is_cloned_per_instance(mlp: Any) -> None:
    x = np.random.default_rng(0).random((6, 8), dtype=np.float32)
    want = np.asarray(mlp(x, training=False))
    events: list[BatchEvent] = []
    with ModelPipe(name="kx") as pipe:
        pipe.add(mlp, max_batch_size=4, instances=2, devices=["CPU", "CPU:0"], name="keras")
        pipe.add_listener(events.append)
        assert pipe.keras_model is mlp
        outs = [pipe.submit(x[i : i + 1]).result(30) for i in range(6)]
        st = pipe.stats().stages["keras"]
    np.testing.assert_allclose(np.vstack(outs), want, rtol=1e-5, atol=1e-6)
    assert [i.device for i in st.instances] == ["CPU", "CPU:0"]
    assert sum(i.items for i in st.instances) == st.items == 6
    assert {e.instance for e in events} <= {0, 1}


def test_a_clone_has_its_own_weights_with_the_same_values(mlp: Any) -> None:
    clone = clone_keras_model(mlp, "CPU")
    assert clone is not mlp
    assert all(a is not b for a, b in zip(clone.weights, mlp.weights, strict=True))
    runner, original = KerasRunner(clone, device="CPU"), KerasRunner(mlp)
    runner.warm()
    probe = original.probe()
    assert probe.shape == (2, 8)
    assert probe.any()
    assert same_outputs(runner(probe), original(probe))
    assert not same_outputs(runner(probe), original(probe) + 1)
    assert same_outputs({"a": [np.ones(2)]}, {"a": [np.ones(2)]})
    assert not same_outputs({"a": np.ones(2)}, [np.ones(2)])


def test_copies_must_be_of_one_model_and_of_one_kind(
    mlp: Any, keras_mlp_factory: Callable[..., Any]
) -> None:
    other = keras_mlp_factory(in_dim=5)
    pipe = ModelPipe()
    with pytest.raises(ValueError, match="every instance must be a copy of the same model"):
        pipe.add(mlp, instances=[mlp, other])
    with pytest.raises(TypeError, match=r"instances\[1\] is not the same kind"):
        pipe.add(mlp, instances=[mlp, abs])
    with pytest.raises(TypeError, match=r"instances\[0\] is not the same kind"):
        pipe.add(abs, max_batch_size=2, instances=[mlp])
    assert pipe.stage_names == []


def test_a_model_that_does_not_clone_names_the_fix() -> None:
    model = Unclonable(np.full(3, 2.0, np.float32))
    model(np.zeros((1, 4), np.float32))
    pipe = ModelPipe()
    with pytest.raises(ValueError, match=r"pass the copies themselves as instances=\["):
        pipe.add(model, max_batch_size=4, instances=2)
    with pytest.raises(ValueError, match="cannot be cloned: NotImplementedError: Object"):
        clone_keras_model(model)
