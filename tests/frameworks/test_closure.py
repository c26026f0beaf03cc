"""Clipper-style closures (cloudpickled functions of a batch) served end to end.

The closures are built here: a lambda that captures a numpy weight vector, and a function
that captures two weight matrices and answers two outputs. Each is saved as
``model.cloudpickle``, refused without trust and served with it, with and without a
serving.toml signature; answers are compared with calling the closure itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ModelLoadError, RequestFailed, StudioServeError
from studioserve.models.loader import load_model
from studioserve.tensors import TensorSpec
from tests.frameworks.helpers import (
    add_experiment,
    assert_close,
    check_422,
    check_batches_shared,
    check_missing_extra,
    check_oip_answers,
    check_pickle_answers,
    cli_served,
    post,
    serving,
)
from tests.helpers import raw_post

cloudpickle = pytest.importorskip("cloudpickle")

FEATURES = 4
W = np.array([0.5, -1.0, 2.0, 0.25])
SIGNATURE = 'instances = 1\n[[input]]\nname = "x"\ndtype = "float64"\nshape = [4]\n'


def linear() -> Callable[[Any], list[float]]:
    """Clipper's contract: a batch in, one output per input (a numpy weight in the closure)."""
    w = W.copy()
    return lambda xs: [float(w @ np.asarray(x, dtype=np.float64)) for x in xs]


def _x(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES))


def _save(func: Any, folder: Path, name: str = "model.cloudpickle") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(cloudpickle.dumps(func))
    return folder


def _get(url: str, path: str) -> Any:
    status, _, body = raw_post(url, None, method="GET", path=path)
    assert status == 200, body
    return json.loads(body)


def test_a_closure_is_refused_without_trust_naming_the_opt_in(
    store_dir: Path, tmp_path: Path
) -> None:
    folder = _save(linear(), tmp_path / "lin")
    with pytest.raises(ModelLoadError) as refused:
        load_model(folder)
    message = str(refused.value)
    assert "cloudpickled closure" in message
    assert "--trust-artifact" in message
    assert "trust = true" in message
    add_experiment(store_dir, "lin", folder, serving="instances = 1\n")
    with pytest.raises(StudioServeError, match="--trust-artifact"), serving(store_dir, "lin"):
        pass


def test_with_a_signature_the_closure_gets_the_stacked_batch(
    store_dir: Path, tmp_path: Path
) -> None:
    func = linear()
    x = _x(6)
    add_experiment(store_dir, "lin", _save(func, tmp_path / "lin"), serving=SIGNATURE)
    with serving(store_dir, "lin", trust_artifact=True) as server:
        check_pickle_answers(server.url, x, lambda b: np.asarray(func(b)))
        check_oip_answers(server.url, "lin", {"x": x}, {"output_0": np.asarray(func(x))})
        check_422(server.url, np.zeros(FEATURES + 1), "x")
        meta = _get(server.url, "/v2/models/lin")
        kind = server.service.model.kind if server.service else None
    assert meta["platform"] == "python"
    assert kind == "closure"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP64", "shape": [-1, FEATURES]}]


def test_without_a_signature_the_closure_gets_the_list_of_raw_values(
    store_dir: Path, tmp_path: Path
) -> None:
    add_experiment(store_dir, "lin", _save(linear(), tmp_path / "lin"), serving="instances = 1\n")
    with serving(store_dir, "lin", trust_artifact=True) as server:
        x = _x(5)
        # one example per key, several keys: the closure gets them as one list (one call)
        status, out = post(server.url, {f"k{i}": x[i] for i in range(5)})
        assert status == 200, out
        assert [out[f"k{i}"] for i in range(5)] == pytest.approx(list(x @ W))
        status, out = post(server.url, {"one": [1.0, 1.0, 1.0, 1.0]})  # a plain list
        assert status == 200, out
        assert out["one"] == pytest.approx(float(W.sum()))
        pipe = server.service.model.pipe if server.service else None
        assert pipe is not None
        sizes = pipe.stats().stages[pipe.model_stage or ""].batch_sizes
    # the five keys of one request met in one call (each array item counts its 4 rows)
    assert max(sizes) >= 5 * FEATURES, sizes


def test_concurrent_clients_share_batches(store_dir: Path, tmp_path: Path) -> None:
    add_experiment(store_dir, "lin", _save(linear(), tmp_path / "lin"), serving=SIGNATURE)
    with serving(store_dir, "lin", trust_artifact=True) as server:
        check_batches_shared(server, _x(16))


def test_two_outputs_by_name_and_the_output_dtype_from_serving_toml(tmp_path: Path) -> None:
    w1 = np.random.default_rng(0).normal(size=(FEATURES, 3))

    def predict(batch: np.ndarray) -> dict[str, Any]:
        logits = batch @ w1
        return {"label": list(logits.argmax(axis=1)), "scores": list(logits)}

    folder = _save(predict, tmp_path / "two", name="model.cpkl")
    inputs = [TensorSpec("x", (FEATURES,), "float64")]
    outputs = [TensorSpec("label", (), "int32"), TensorSpec("scores", (3,), "float64")]
    model = load_model(folder, trust=True, inputs=inputs, outputs=outputs)
    try:
        model.start()
        x = _x(4)
        got = model.predict({"many": x, "one": x[0]}, timeout=30)
    finally:
        model.close()
    assert got["many"]["label"].dtype == np.int32
    assert_close(got["many"], {"label": (x @ w1).argmax(axis=1), "scores": x @ w1})
    assert_close(got["one"], {"label": (x[0] @ w1).argmax(), "scores": x[0] @ w1})
    assert model.kind == "closure"
    assert model.platform == "python"


def test_a_closure_of_the_wrong_length_fails_those_items_saying_why(tmp_path: Path) -> None:
    folder = _save(lambda xs: [0.0] * (len(xs) + 1), tmp_path / "bad")
    model = load_model(folder, trust=True)
    try:
        model.start()
        with pytest.raises(RequestFailed) as failed:
            model.predict({"a": 1.0, "b": 2.0}, timeout=30)
    finally:
        model.close()
    assert failed.value.keys is not None
    assert set(failed.value.keys) == {"a", "b"}
    message = failed.value.keys["a"]
    assert "returned 2 outputs for a batch of 1 inputs" in message, message
    assert "one output per input" in message
    model = load_model(_save(lambda xs: 3.0, tmp_path / "scalar"), trust=True)
    try:
        model.start()
        with pytest.raises(RequestFailed, match=r"returned a float for a batch of 1 inputs"):
            model.predict({"a": 1.0}, timeout=30)
    finally:
        model.close()


def test_a_file_that_is_not_a_function_is_refused(tmp_path: Path) -> None:
    folder = _save({"weights": [1, 2]}, tmp_path / "dict")
    with pytest.raises(ModelLoadError, match=r"holds a builtins\.dict, not a function"):
        load_model(folder, trust=True)


def test_importing_the_runtime_imports_no_cloudpickle() -> None:
    code = (
        "import sys, studioserve, studioserve.models.closure\n"
        "assert 'cloudpickle' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_cloudpickle_names_the_extra(store_dir: Path, tmp_path: Path) -> None:
    add_experiment(store_dir, "lin", _save(linear(), tmp_path / "lin"), serving="instances = 1\n")
    check_missing_extra(tmp_path, store_dir, "lin", "cloudpickle", "closure", "--trust-artifact")


def test_cli_adds_and_serves_a_closure_with_trust(store_dir: Path, tmp_path: Path) -> None:
    folder = _save(linear(), tmp_path / "lin")
    config = tmp_path / "serving.toml"
    config.write_text(SIGNATURE)
    with cli_served(store_dir, "clo", folder, "closure", "--trust-artifact", config=config) as url:
        x = _x(3)
        status, out = post(url, {"k": x})
        assert status == 200, out
        assert_close(out["k"], x @ W)
