"""The bundled demo experiment: a small classifier added to the local store, in any framework.

``studio demo`` builds a 4-feature, 3-class model (a Keras MLP by default; ``--framework``
picks PyTorch, ONNX, scikit-learn, XGBoost, LightGBM, a closure or PySpark), saves it the way
that framework's users do (the README's framework table), adds the folder to the store and
serves it. Each builder imports its framework only when called.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import resolve_store_url
from .errors import ConfigError
from .models.artifacts import scan
from .models.keras import build_mlp
from .store import ExperimentInfo, open_store

logger = logging.getLogger(__name__)

DEMO_INPUTS = 4
DEMO_CLASSES = 3


def build_demo_model(seed: int = 7) -> object:
    """A small Keras MLP: 4 float32 features -> 16 relu -> 3-class softmax."""
    return build_mlp(
        DEMO_INPUTS,
        16,
        DEMO_CLASSES,
        seed=seed,
        input_name="features",
        output_name="probs",
        name="demo_mlp",
    )


def _data(seed: int = 7) -> tuple[Any, Any]:
    """A small 3-class problem on 4 features (for the models that learn from data)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(150, DEMO_INPUTS)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.8).astype(np.int64)
    return x, y


def _weights(seed: int = 7) -> tuple[Any, Any, Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(DEMO_INPUTS, 16)).astype(np.float32) * 0.5,
        np.zeros(16, np.float32),
        rng.normal(size=(16, DEMO_CLASSES)).astype(np.float32) * 0.5,
        np.zeros(DEMO_CLASSES, np.float32),
    )


def _save_keras(folder: Path) -> None:
    build_demo_model().save(folder / "model.keras")  # type: ignore[attr-defined]


def _save_torch(folder: Path) -> None:
    import torch

    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(DEMO_INPUTS, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, DEMO_CLASSES),
        torch.nn.Softmax(dim=-1),
    ).eval()
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; it still serves
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(folder / "model.pt"))


def _save_onnx(folder: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = _weights()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
            helper.make_node("Add", ["h3", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "demo_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", DEMO_INPUTS])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", DEMO_CLASSES])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))


def _save_sklearn(folder: Path) -> None:
    import skops.io
    from sklearn.linear_model import LogisticRegression

    x, y = _data()
    skops.io.dump(LogisticRegression(max_iter=500).fit(x, y), folder / "model.skops")


def _save_xgboost(folder: Path) -> None:
    import xgboost

    x, y = _data()
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3).fit(x, y)
    model.save_model(folder / "model.ubj")


def _save_lightgbm(folder: Path) -> None:
    import lightgbm

    x, y = _data()
    model = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(x, y)
    model.booster_.save_model(str(folder / "model.txt"))


def _save_closure(folder: Path) -> None:
    import cloudpickle
    import numpy as np

    w1, _, w2, _ = _weights()

    def predict(batch: Any) -> list[Any]:  # Clipper's contract: a batch in, one output each
        logits = np.maximum(np.asarray(batch, np.float32) @ w1, 0) @ w2
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return list(e / e.sum(axis=-1, keepdims=True))

    (folder / "model.cloudpickle").write_bytes(cloudpickle.dumps(predict))
    (folder.parent / SERVING_TOML).write_text(
        f'[[input]]\nname = "features"\ndtype = "float32"\nshape = [{DEMO_INPUTS}]\n'
    )


def _save_spark(folder: Path) -> None:
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import SparkSession

    x, y = _data()
    spark = SparkSession.builder.master("local[1]").appName("studioserve-demo").getOrCreate()
    try:
        cols = [f"f{i}" for i in range(DEMO_INPUTS)]
        rows = [(*map(float, r), float(label)) for r, label in zip(x, y, strict=True)]
        df = spark.createDataFrame(rows, [*cols, "label"])
        pipeline = Pipeline(
            stages=[VectorAssembler(inputCols=cols, outputCol="features"), LogisticRegression()]
        )
        pipeline.fit(df).write().overwrite().save(str(folder / "spark_model"))
    finally:
        spark.stop()


#: ``studio demo --framework NAME``: how each framework's demo model is saved
DEMO_BUILDERS: dict[str, Callable[[Path], None]] = {
    "keras": _save_keras,
    "torch": _save_torch,
    "onnx": _save_onnx,
    "sklearn": _save_sklearn,
    "xgboost": _save_xgboost,
    "lightgbm": _save_lightgbm,
    "closure": _save_closure,
    "spark": _save_spark,
}
SERVING_TOML = "serving.toml"


def add_demo_experiment(
    key: str = "demo-mlp", store: str | None = None, *, framework: str = "keras"
) -> ExperimentInfo:
    """Build the demo model in ``framework``, save it and add it to the store as ``key``.

    An existing experiment under ``key`` is replaced.

    :raises ConfigError: for a framework the demo does not have.
    """
    build = DEMO_BUILDERS.get(framework)
    if build is None:
        raise ConfigError(
            f"the demo has no {framework!r} model; --framework takes one of "
            f"{', '.join(DEMO_BUILDERS)}"
        )
    with tempfile.TemporaryDirectory(prefix="studioserve-demo-") as tmp:
        modeldir = Path(tmp) / "modeldir"
        modeldir.mkdir()
        try:
            build(modeldir)
        except ImportError as e:
            raise ConfigError(
                f"the {framework} demo needs {e.name or 'a package'}, which is not installed; "
                f"pip install 'studioserve[{framework}]'"
            ) from e
        serving = Path(tmp) / SERVING_TOML
        found = scan(modeldir)
        return open_store(resolve_store_url(store)).add(
            key,
            modeldir,
            description=f"studioserve demo ({framework}): 4 features -> 3 classes",
            framework=found[-1].framework.name if found else framework,
            force=True,
            serving_config=serving if serving.exists() else None,
        )


def client_snippet(url: str, token: str | None = None) -> str:
    """Copy-paste Python and curl lines that query the demo server at ``url``."""
    auth = f", token={token!r}" if token else ""
    header = f" -H 'Authorization: Bearer {token}'" if token else ""
    return (
        "Try it from Python:\n"
        "    import numpy as np\n"
        "    from studioserve import Client\n"
        f"    print(Client({url!r}{auth}).predict("
        "{'a': np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)}))\n"
        "or with curl (JSON in, JSON out):\n"
        f"    curl -s -X POST{header} -H 'Content-Type: application/json' "
        f"-d '{{\"a\": [0.1, 0.2, 0.3, 0.4]}}' {url}/"
    )
