"""scikit-learn estimators served from skops files and trusted pickles, end to end.

The models are fitted here on synthetic data (no download): a LogisticRegression (3 classes,
and one with string labels), a Ridge regressor, a pipeline of a custom FunctionTransformer and
a 20-tree RandomForestClassifier (types skops does not trust). Answers are compared with the
estimator's own ``predict`` / ``predict_proba`` on the same input.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ModelLoadError
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
    post_oip,
    serving,
)
from tests.helpers import raw_post

sio = pytest.importorskip("skops.io")
joblib = pytest.importorskip("joblib")

from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402

FEATURES = 4


def double(x: np.ndarray) -> np.ndarray:
    """A custom function: skops does not trust it (the pipeline's FunctionTransformer)."""
    return x * 2


@dataclasses.dataclass(frozen=True)
class Fitted:
    classifier: Any  # LogisticRegression, labels 0, 1, 2
    regressor: Any  # Ridge
    words: Any  # LogisticRegression, labels "cat", "dog"
    forest: Any  # FunctionTransformer(double) + RandomForestClassifier(20 trees)


def _x(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES))


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    x = _x(300, seed=0)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    forest = make_pipeline(
        FunctionTransformer(double), RandomForestClassifier(20, max_depth=4, random_state=0)
    )
    return Fitted(
        classifier=LogisticRegression(max_iter=500).fit(x, y),
        regressor=Ridge().fit(x, x @ np.arange(1.0, FEATURES + 1)),
        words=LogisticRegression().fit(x, np.array(["cat", "dog"])[(x[:, 2] > 0).astype(int)]),
        forest=forest.fit(x, y),
    )


def _skops(estimator: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sio.dump(estimator, folder / "model.skops")
    return folder


def _classify(estimator: Any) -> Any:
    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"label": estimator.predict(x), "probabilities": estimator.predict_proba(x)}

    return predict


def _get(url: str, path: str) -> Any:
    status, _, body = raw_post(url, None, method="GET", path=path)
    assert status == 200, body
    return json.loads(body)


def test_a_classifier_answers_its_label_and_probabilities_over_pickle_and_oip(
    fitted: Fitted, store_dir: Path, tmp_path: Path
) -> None:
    predict = _classify(fitted.classifier)
    x = _x(6)
    add_experiment(store_dir, "lr", _skops(fitted.classifier, tmp_path / "lr"))
    with serving(store_dir, "lr") as server:
        check_pickle_answers(server.url, x, predict)
        check_oip_answers(server.url, "lr", {"input": x}, predict(x))
        status, out = post(server.url, {"ints": np.arange(FEATURES)})  # int64 rows as float64
        assert status == 200, out
        assert_close(out["ints"], {k: v[0] for k, v in predict(np.arange(4.0)[None]).items()})
        meta = _get(server.url, "/v2/models/lr")
        config = _get(server.url, "/v2/models/lr/config")
        kind = server.service.model.kind if server.service else None
    assert meta["platform"] == config["platform"] == "sklearn"
    assert kind == "sklearn"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, FEATURES]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]},
    ]


def test_concurrent_clients_share_batches(fitted: Fitted, store_dir: Path, tmp_path: Path) -> None:
    add_experiment(store_dir, "lr", _skops(fitted.classifier, tmp_path / "lr"))
    with serving(store_dir, "lr") as server:
        check_batches_shared(server, _x(16))


def test_a_wrong_feature_count_is_422_naming_the_input(
    fitted: Fitted, store_dir: Path, tmp_path: Path
) -> None:
    add_experiment(store_dir, "lr", _skops(fitted.classifier, tmp_path / "lr"))
    with serving(store_dir, "lr") as server:
        check_422(server.url, np.zeros(FEATURES + 1), "input")
        check_422(server.url, np.zeros((2, FEATURES - 1)), "input")
        check_422(server.url, np.ones(FEATURES, bool), "input")


def test_a_regressor_answers_its_prediction(
    fitted: Fitted, store_dir: Path, tmp_path: Path
) -> None:
    x = _x(5)
    add_experiment(store_dir, "ridge", _skops(fitted.regressor, tmp_path / "ridge"))
    with serving(store_dir, "ridge") as server:
        check_pickle_answers(server.url, x, fitted.regressor.predict)
        check_oip_answers(
            server.url, "ridge", {"input": x}, {"prediction": fitted.regressor.predict(x)}
        )
        meta = _get(server.url, "/v2/models/ridge")
    assert meta["outputs"] == [{"name": "prediction", "datatype": "FP64", "shape": [-1]}]


def test_string_labels_stay_strings_and_travel_as_bytes_over_oip(
    fitted: Fitted, store_dir: Path, tmp_path: Path
) -> None:
    x = _x(8)
    want = fitted.words.predict(x)
    assert set(want) == {"cat", "dog"}
    add_experiment(store_dir, "words", _skops(fitted.words, tmp_path / "words"))
    with serving(store_dir, "words") as server:
        check_pickle_answers(server.url, x, _classify(fitted.words))
        status, out = post_oip(server.url, "words", {"input": x})
        meta = _get(server.url, "/v2/models/words")
    assert status == 200, out
    assert [bytes(v) for v in out["outputs"]["label"]] == [w.encode() for w in want]
    assert meta["outputs"][0] == {"name": "label", "datatype": "BYTES", "shape": [-1]}


def test_feature_names_keep_one_input_whose_columns_are_in_their_order(
    fitted: Fitted, tmp_path: Path
) -> None:
    x = _x(300, seed=0)
    named = LogisticRegression().fit(x, (x[:, 3] > 0).astype(int))
    named.feature_names_in_ = np.array(["age", "height", "weight", "score"], dtype=object)
    model = load_model(_skops(named, tmp_path / "named"))
    try:
        model.start()
        # pytest turns warnings into errors: the served call must not warn about the names
        got = model.predict({"k": _x(3)}, timeout=30)["k"]
        assert model.inputs == [TensorSpec("input", (FEATURES,), "float64")]
        assert "input columns: age, height, weight, score" in model.describe()
    finally:
        model.close()
    assert_close(got["probabilities"], named.predict_proba(_x(3)))


def test_untrusted_skops_types_are_refused_listing_them_and_served_with_trust(
    fitted: Fitted, store_dir: Path, tmp_path: Path
) -> None:
    folder = _skops(fitted.forest, tmp_path / "forest")
    untrusted = sio.get_untrusted_types(file=folder / "model.skops")
    assert f"{__name__}.double" in untrusted
    with pytest.raises(ModelLoadError) as refused:
        load_model(folder)
    message = str(refused.value)
    assert all(t in message for t in untrusted), message
    assert "--trust-artifact" in message
    assert "trust = true" in message
    add_experiment(store_dir, "forest", folder)
    x = _x(7)
    with serving(store_dir, "forest", trust_artifact=True) as server:
        check_pickle_answers(server.url, x, _classify(fitted.forest))


@pytest.mark.parametrize("name", ["model.joblib", "model.pkl"])
def test_a_pickled_estimator_is_refused_by_default_and_served_with_trust(
    fitted: Fitted, store_dir: Path, tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    if name.endswith(".joblib"):
        joblib.dump(fitted.classifier, folder / name)
    else:
        (folder / name).write_bytes(pickle.dumps(fitted.classifier))
    with pytest.raises(ModelLoadError, match="--trust-artifact"):
        load_model(folder)
    add_experiment(store_dir, "pickled", folder)
    with serving(store_dir, "pickled", trust_artifact=True) as server:
        check_pickle_answers(server.url, _x(4), _classify(fitted.classifier))


def test_a_pickle_of_something_else_points_to_the_wrapper(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(
        ModelLoadError, match=r"holds a builtins\.dict, not a scikit-learn .*wrapper"
    ):
        load_model(folder, trust=True)


def test_serving_toml_renames_the_outputs_and_instances_share_the_estimator(
    fitted: Fitted, tmp_path: Path
) -> None:
    folder = _skops(fitted.classifier, tmp_path / "lr")
    outputs = [TensorSpec("class", (), "int64"), TensorSpec("scores", (3,), "float64")]
    model = load_model(folder, outputs=outputs, instances=2)
    try:
        model.start()
        assert model.devices == ("CPU", "CPU")
        got = model.predict({"k": _x(3)}, timeout=30)["k"]
    finally:
        model.close()
    assert_close(
        got,
        {
            "class": fitted.classifier.predict(_x(3)),
            "scores": fitted.classifier.predict_proba(_x(3)),
        },
    )
    with pytest.raises(ModelLoadError, match=r"lists 1 output\(s\) \(y\) but the model computes 2"):
        load_model(folder, outputs=[TensorSpec("y", (), "int64")])


def test_importing_the_runtime_imports_no_sklearn() -> None:
    code = (
        "import sys, studioserve, studioserve.models.sklearn\n"
        "assert not {'sklearn', 'skops', 'joblib'} & set(sys.modules), sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_scikit_learn_names_the_extra(
    fitted: Fitted, store_dir: Path, tmp_path: Path
) -> None:
    add_experiment(
        store_dir, "lr", _skops(fitted.classifier, tmp_path / "lr"), serving="instances = 1\n"
    )
    check_missing_extra(tmp_path, store_dir, "lr", "sklearn", "sklearn")


def test_cli_adds_and_serves_a_skops_model(fitted: Fitted, store_dir: Path, tmp_path: Path) -> None:
    folder = _skops(fitted.classifier, tmp_path / "lr")
    with cli_served(store_dir, "sk-lr", folder, "sklearn") as url:
        x = _x(4)
        want = _classify(fitted.classifier)(x)
        status, out = post(url, {"k": x})
        assert status == 200, out
        assert_close(out["k"], want)
        check_oip_answers(url, "sk-lr", {"input": x}, want)
