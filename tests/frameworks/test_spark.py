"""PySpark PipelineModels served end to end, through one local SparkSession.

One pipeline (VectorAssembler over three columns, then LogisticRegression) is trained here on
50 synthetic rows, once per module (Spark is slow to start), saved as a PipelineModel folder
and served; answers are compared with Spark's own ``transform`` of the same rows. The module
holds the session while it runs; when the last holder lets go the JVM must be gone.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.models import spark as spark_runtime
from studioserve.models.loader import load_model
from studioserve.runtime import ModelServer
from studioserve.tensors import TensorSpec
from tests.frameworks.helpers import (
    add_experiment,
    assert_close,
    check_422,
    check_batches_shared,
    check_missing_extra,
    check_oip_answers,
    check_pickle_answers,
    serving,
    studio,
)
from tests.helpers import raw_post

pytest.importorskip("pyspark")

COLUMNS = ["a", "b", "c"]
ONE_INSTANCE = "instances = 1\n"


@dataclasses.dataclass
class Trained:
    folder: Path  # holds spark_model/, the PipelineModel folder
    model: Any  # the fitted PipelineModel, for Spark's own answers
    session: Any
    gateway_proc: Any  # the JVM of the module's session
    held: bool = True

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Spark's own transform of the rows of ``x``, in order."""
        rows = [(*map(float, r), i) for i, r in enumerate(np.asarray(x, np.float64))]
        frame = self.session.createDataFrame(rows, [*COLUMNS, "i"])
        got = sorted(self.model.transform(frame).select("i", "prediction", "probability").collect())
        return {
            "prediction": np.array([r.prediction for r in got]),
            "probability": np.array([r.probability.toArray() for r in got]),
        }


def _x(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, len(COLUMNS)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    from pyspark import SparkContext
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import VectorAssembler

    session = spark_runtime.acquire_session()
    gateway = SparkContext._gateway
    held = Trained(Path(), None, session, getattr(gateway, "proc", None))
    try:
        x = _x(50, seed=0)
        y = (x @ np.array([1.0, -1.0, 0.5]) > 0).astype(float)
        frame = session.createDataFrame(
            [(*map(float, r), float(label)) for r, label in zip(x, y, strict=True)],
            [*COLUMNS, "label"],
        )
        stages = [
            VectorAssembler(inputCols=COLUMNS, outputCol="features"),
            LogisticRegression(maxIter=10),
        ]
        fitted = Pipeline(stages=stages).fit(frame)
        folder = tmp_path_factory.mktemp("spark") / "lr"
        folder.mkdir()
        fitted.write().overwrite().save(str(folder / "spark_model"))
        held.folder, held.model = folder, fitted
        yield held
    finally:
        if held.held:
            spark_runtime.release_session()
    # the last holder let go: the session, its JVM and Py4J are gone
    assert spark_runtime.session_users() == 0
    assert SparkContext._gateway is None
    if held.gateway_proc is not None:
        assert held.gateway_proc.poll() is not None, "the Spark JVM outlived its last model"


@pytest.fixture(scope="module")
def served(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    store = tmp_path_factory.mktemp("store")
    add_experiment(store, "lr", trained.folder, serving=ONE_INSTANCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(store, "lr") as server:
            yield server


def _get(url: str, path: str) -> Any:
    status, _, body = raw_post(url, None, method="GET", path=path)
    assert status == 200, body
    return json.loads(body)


def test_answers_sparks_own_prediction_and_probability_over_pickle_and_oip(
    served: ModelServer, trained: Trained
) -> None:
    x = _x(7)
    check_pickle_answers(served.url, x, trained.predict)
    check_oip_answers(served.url, "lr", {"features": x}, trained.predict(x))
    meta = _get(served.url, "/v2/models/lr")
    config = _get(served.url, "/v2/models/lr/config")
    model = served.service.model if served.service else None
    assert model is not None
    assert model.kind == "spark"
    assert meta["platform"] == config["platform"] == "spark_mlib"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP64", "shape": [-1, 3]}]
    assert meta["outputs"] == [
        {"name": "prediction", "datatype": "FP64", "shape": [-1]},
        {"name": "probability", "datatype": "FP64", "shape": [-1, 2]},
    ]
    assert "input columns: a, b, c" in model.describe()
    assert model.pipe.max_batch_size == spark_runtime.DEFAULT_BATCH_ROWS


def test_concurrent_clients_share_batches(served: ModelServer) -> None:
    check_batches_shared(served, _x(16))


def test_a_wrong_feature_count_is_422_naming_the_input(served: ModelServer) -> None:
    check_422(served.url, np.zeros(len(COLUMNS) + 1), "features")
    check_422(served.url, np.zeros((2, len(COLUMNS) - 1)), "features")
    check_422(served.url, np.ones(len(COLUMNS), bool), "features")


def test_serving_toml_columns_are_inputs_and_the_model_lets_go_of_the_session(
    trained: Trained,
) -> None:
    before = spark_runtime.session_users()
    inputs = [TensorSpec(c, (), "float64") for c in COLUMNS]
    outputs = [TensorSpec("probability", (2,), "float32")]
    model = load_model(trained.folder, inputs=inputs, outputs=outputs, max_batch_size=64)
    try:
        assert spark_runtime.session_users() == before + 1
        model.start()
        x = _x(5)
        got = model.predict({"k": {c: x[:, i] for i, c in enumerate(COLUMNS)}}, timeout=60)
    finally:
        model.close()
    model.close()  # twice: still one release
    assert spark_runtime.session_users() == before
    assert model.pipe.max_batch_size == 64
    assert got["k"]["probability"].dtype == np.float32
    assert_close(got["k"], {"probability": trained.predict(x)["probability"]}, rtol=1e-6)


def test_importing_the_runtime_imports_no_pyspark() -> None:
    code = (
        "import sys, studioserve, studioserve.models.spark\n"
        "assert 'pyspark' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_without_java_the_error_says_pyspark_needs_one(
    trained: Trained, store_dir: Path, tmp_path: Path
) -> None:
    add_experiment(store_dir, "lr", trained.folder, serving=ONE_INSTANCE)
    nowhere = tmp_path / "empty"
    nowhere.mkdir()
    env = {"STUDIO_STORE": str(store_dir), "PATH": str(nowhere), "JAVA_HOME": str(nowhere)}
    done = studio("serve", "lr", "--port", "0", "--killafter", "0", env=env)
    assert done.returncode != 0
    assert "Java 17+" in done.stderr, done.stderr
    assert "apt-get install -y default-jre-headless" in done.stderr
    assert f"JAVA_HOME={nowhere} has no bin/java" in done.stderr
    done = studio("serve", "lr", "--port", "0", "--killafter", "0", env={**env, "JAVA_HOME": ""})
    assert "no java on PATH" in done.stderr, done.stderr


def test_missing_pyspark_names_the_extra(trained: Trained, store_dir: Path, tmp_path: Path) -> None:
    add_experiment(store_dir, "lr", trained.folder, serving=ONE_INSTANCE)
    check_missing_extra(tmp_path, store_dir, "lr", "pyspark", "spark")
