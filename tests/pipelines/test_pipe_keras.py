"""A real (small) Keras model in a ModelPipe: recognised, warmed, checked, batched, fast path."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from studioserve.errors import InvalidInput, ItemFailed
from studioserve.pipelines import BatchEvent, ModelPipe
from studioserve.pipelines.keras_stage import KerasRunner, is_keras_model

keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def mlp(keras_mlp_factory: Callable[..., Any]) -> Any:
    return keras_mlp_factory(in_dim=8, hidden=16, out_dim=3)


def reference(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x.astype("float32"), training=False))


@pytest.fixture(scope="module")
def two_in_two_out() -> Any:
    keras.utils.set_random_seed(1)
    a = keras.Input(shape=(4,), name="a")
    b = keras.Input(shape=(2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    return keras.Model(
        {"a": a, "b": b},
        {"p": keras.layers.Dense(3, name="p")(h), "q": keras.layers.Dense(1, name="q")(h)},
    )


class Holder:
    """A batch listener that holds the model's worker after its first batch."""

    def __init__(self) -> None:
        self.first_done = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, event: BatchEvent) -> None:
        self.sizes.append(event.rows)
        if len(self.sizes) == 1:
            self.first_done.set()
            self.release.wait()


@pytest.fixture
def holder() -> Iterator[Holder]:
    h = Holder()
    yield h
    h.release.set()


def test_importing_the_pipeline_does_not_import_keras() -> None:
    code = (
        "import sys, studioserve.pipelines as p; "
        "p.ModelPipe().add(lambda x: x).close(); "
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, "
        "sorted(m for m in sys.modules if 'keras' in m or 'tensorflow' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_keras_models_are_recognised(mlp: Any) -> None:
    assert is_keras_model(mlp)
    assert is_keras_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    assert not is_keras_model(lambda x: x)
    assert not is_keras_model(np.zeros(3))


def test_a_model_becomes_a_warm_batching_stage(mlp: Any) -> None:
    with ModelPipe(name="k") as pipe:
        pipe.add(mlp)
        assert pipe.keras_model is mlp
        assert pipe.max_batch_size == 64
        assert pipe.stage_names == [mlp.name]
        x = np.random.default_rng(0).random((1, 8), dtype=np.float32)
        out = pipe.submit(x).result()
    assert isinstance(out, np.ndarray)
    assert out.shape == (1, 3)
    np.testing.assert_allclose(out, reference(mlp, x), rtol=1e-5, atol=1e-6)


def test_submitters_share_model_calls_and_get_their_own_rows(mlp: Any, holder: Holder) -> None:
    rng = np.random.default_rng(1)
    with ModelPipe() as pipe:
        pipe.add(mlp, max_batch_size=16)
        pipe.add_listener(holder)
        pipe.submit(np.zeros((1, 8), np.float32))
        holder.first_done.wait()
        items = [rng.random((n, 8), dtype=np.float32) for n in (1, 3, 1, 2)]
        futs = [pipe.submit(x) for x in items]
        holder.release.set()
        outs = [f.result() for f in futs]
    assert holder.sizes == [1, 7]  # one call for the four waiting items
    for x, out in zip(items, outs, strict=True):
        assert out.shape == (x.shape[0], 3)
        np.testing.assert_allclose(out, reference(mlp, x), rtol=1e-5, atol=1e-6)


def test_a_wrong_shape_fails_only_that_item_before_batching(mlp: Any, holder: Holder) -> None:
    good = np.ones((1, 8), np.float32)
    with ModelPipe() as pipe:
        pipe.add(mlp, name="mlp")
        pipe.add_listener(holder)
        pipe.submit(good)
        holder.first_done.wait()
        ok1 = pipe.submit(good)
        bad = pipe.submit(np.ones((1, 7), np.float32), key="short")
        unbatched = pipe.submit(np.ones(8, np.float32), key="flat")
        ok2 = pipe.submit(good)
        holder.release.set()
        assert ok1.result().shape == ok2.result().shape == (1, 3)
        err = bad.exception()
        flat = unbatched.exception()
    assert holder.sizes == [1, 2]
    assert isinstance(err, InvalidInput)
    assert isinstance(err, ItemFailed)
    assert (err.key, err.stage) == ("short", "mlp")
    assert "(n, 8)" in str(err)
    assert "(1, 7)" in str(err)
    assert isinstance(flat, InvalidInput)
    assert "leading batch axis" in str(flat)


@pytest.mark.parametrize("dtype", ["int64", "float64", "uint8", "int32"])
def test_safe_dtypes_are_converted(mlp: Any, dtype: str) -> None:
    x = np.arange(16).reshape(2, 8).astype(dtype)
    with ModelPipe() as pipe:
        pipe.add(mlp)
        out = pipe.submit(x).result()
    np.testing.assert_allclose(out, reference(mlp, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (np.ones((1, 8), bool), "bool"),
        (np.ones((1, 8), complex), "complex128"),
        (np.array([["a"] * 8]), "<U1"),
        (np.array([[object()] * 8]), "object"),
    ],
)
def test_unsafe_dtypes_are_refused(mlp: Any, value: np.ndarray, got: str) -> None:
    with ModelPipe() as pipe:
        pipe.add(mlp)
        err = pipe.submit(value).exception()
    assert isinstance(err, InvalidInput)
    assert "float32" in str(err)
    assert got.strip("<") in str(err) or value.dtype.name in str(err)


_DTYPES = ["bool", "int8", "int64", "uint8", "uint64", "float16", "float32", "float64", "complex64"]


@pytest.mark.parametrize("want", ["float32", "int32", "uint8", "bool", "complex64"])
def test_server_and_stage_share_one_dtype_rule(want: str) -> None:
    """service validation and the Keras stage accept exactly the same input dtypes."""
    from studioserve.errors import PipelineError
    from studioserve.pipelines.keras_stage import _check
    from studioserve.tensors import TensorSpec, converts_safely
    from studioserve.tensors import check_dtype as _check_dtype

    w = np.dtype(want)
    spec = TensorSpec(name="x", shape=(3,), dtype=want)
    stage_spec = spec  # one TensorSpec type for the service and the stage
    for got in _DTYPES:
        arr = np.ones((2, 3), dtype=got)
        try:
            served = _check_dtype("k", spec, arr).dtype
        except PipelineError:
            served = None
        try:
            staged = _check(stage_spec, arr).dtype
        except InvalidInput:
            staged = None
        assert served == staged, (got, want, served, staged)
        assert (served is not None) == converts_safely(np.dtype(got), w), (got, want)
        if served is not None:
            assert served == w
    assert not converts_safely(np.dtype("float64"), np.dtype("int64"))
    assert not converts_safely(np.dtype("int8"), np.dtype("uint8"))
    assert not converts_safely(np.dtype("bool"), np.dtype("float32"))
    assert converts_safely(np.dtype("uint8"), np.dtype("int8"))


def test_plain_lists_are_accepted(mlp: Any) -> None:
    with ModelPipe() as pipe:
        pipe.add(mlp)
        out = pipe.submit([[0.5] * 8]).result()
        err = pipe.submit([[0.5] * 8, [1.0] * 7]).exception()
    assert out.shape == (1, 3)
    assert isinstance(err, InvalidInput)


def test_multi_input_multi_output_model(two_in_two_out: Any) -> None:
    model = two_in_two_out
    rng = np.random.default_rng(2)
    a = rng.random((2, 4), dtype=np.float32)
    b = rng.random((2, 2), dtype=np.float32)
    with ModelPipe() as pipe:
        pipe.add(model)
        by_name = pipe.submit({"a": a, "b": b}).result()
        by_order = pipe.submit([a[:1], b[:1]]).result()
        missing = pipe.submit({"a": a}).exception()
        mismatched = pipe.submit({"a": a, "b": b[:1]}).exception()
    want = model({"a": a, "b": b}, training=False)
    assert set(by_name) == {"p", "q"}
    np.testing.assert_allclose(by_name["p"], np.asarray(want["p"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_order["q"], np.asarray(want["q"])[:1], rtol=1e-5, atol=1e-6)
    assert isinstance(missing, InvalidInput)
    assert "missing ['b']" in str(missing)
    assert isinstance(mismatched, InvalidInput)
    assert "same number of rows" in str(mismatched)


@pytest.mark.parametrize("method", ["concrete", "tf_function", "predict_on_batch", "call"])
def test_every_call_method_gives_the_same_answer(mlp: Any, method: str) -> None:
    runner = KerasRunner(mlp, method=method)
    runner.warm()
    x = np.random.default_rng(3).random((5, 8), dtype=np.float32)
    np.testing.assert_allclose(runner(x), reference(mlp, x), rtol=1e-5, atol=1e-6)


def test_auto_picks_the_concrete_function_on_tensorflow(mlp: Any) -> None:
    runner = KerasRunner(mlp)
    assert runner.method == "concrete"
    assert runner.input_names == [mlp.inputs[0].name]
    with pytest.raises(ValueError, match="unknown"):
        KerasRunner(mlp, method="predict")


def test_studioml_style_keras_pipe_with_vstack(mlp: Any) -> None:
    rng = np.random.default_rng(4)
    items = [rng.random((1, 8), dtype=np.float32) for _ in range(3)]
    with ModelPipe() as pipe:
        pipe.add(mlp, batch_size=64, batcher=np.vstack)
        pipe.add(lambda rows: np.argmax(rows, axis=-1))
        out = pipe.apply_ordered(items)
    want = [int(np.argmax(reference(mlp, x))) for x in items]
    assert [int(np.asarray(o).ravel()[0]) for o in out] == want


def test_a_model_pipe_with_pre_and_post_processing(mlp: Any) -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda v: np.asarray(v, np.float32).reshape(1, 8) / 10)
        pipe.add(mlp, max_batch_size=8)
        pipe.add(lambda rows: int(rows.argmax()))
        out = pipe({"a": list(range(8)), "b": [1] * 8})
    assert set(out) == {"a", "b"}
    assert all(isinstance(v, int) for v in out.values())
