"""XGBoost and LightGBM boosters served from their native model files, end to end.

The models are trained here on synthetic data (no download): a 100-tree XGBClassifier (binary,
saved as ``.ubj``; three classes, saved as ``.json``), an XGBRegressor, a 100-tree
LGBMClassifier (three classes) and an LGBMRegressor. Answers are compared with the booster's
own ``predict`` on the same input.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ModelLoadError
from studioserve.models.artifacts import artifact_at, scan
from studioserve.models.loader import load_model
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

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

FEATURES = 6
ONE_INSTANCE = "instances = 1\n"


@dataclasses.dataclass(frozen=True)
class Trained:
    binary: Path  # XGBClassifier, 2 classes, model.ubj
    multi: Path  # XGBClassifier, 3 classes, model.json
    xgb_regressor: Path  # XGBRegressor, model.ubj
    lgb_multi: Path  # LGBMClassifier, 3 classes, model.txt
    lgb_regressor: Path  # LGBMRegressor, model.txt


def _x(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("tree_models")
    x = _x(400, seed=0)
    y2 = (x[:, 0] + x[:, 1] > 0).astype(int)
    y3 = y2 + (x[:, 2] > 0.5).astype(int)
    target = x @ np.linspace(-1, 1, FEATURES)
    folders = {f.name: root / f.name for f in dataclasses.fields(Trained)}
    for folder in folders.values():
        folder.mkdir()
    small = {"n_estimators": 100, "max_depth": 3}
    xgb.XGBClassifier(**small).fit(x, y2).save_model(folders["binary"] / "model.ubj")
    xgb.XGBClassifier(**small).fit(x, y3).save_model(folders["multi"] / "model.json")
    xgb.XGBRegressor(**small).fit(x, target).save_model(folders["xgb_regressor"] / "model.ubj")
    lgb_small = {"n_estimators": 100, "num_leaves": 8, "verbose": -1}
    lgb.LGBMClassifier(**lgb_small).fit(x, y3).booster_.save_model(
        str(folders["lgb_multi"] / "model.txt")
    )
    lgb.LGBMRegressor(**lgb_small).fit(x, target).booster_.save_model(
        str(folders["lgb_regressor"] / "model.txt")
    )
    return Trained(**folders)


def _xgboost(folder: Path) -> Any:
    """The booster's own answer: label and probabilities for a classifier, else prediction."""
    booster = xgb.Booster(model_file=str(next(iter(scan(folder))).path))
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]

    def predict(x: np.ndarray) -> Any:
        p = booster.predict(xgb.DMatrix(x.astype(np.float32)))
        if objective == "binary:logistic":
            return {"label": (p > 0.5).astype(np.int64), "probabilities": np.stack([1 - p, p], 1)}
        if objective == "multi:softprob":
            return {"label": p.argmax(axis=1), "probabilities": p}
        return p

    return predict


def _lightgbm(folder: Path) -> Any:
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    classes = booster.params["num_class"]

    def predict(x: np.ndarray) -> Any:
        p = booster.predict(x)
        return {"label": p.argmax(axis=1), "probabilities": p} if classes > 1 else p

    return predict


def _get(url: str, path: str) -> Any:
    status, _, body = raw_post(url, None, method="GET", path=path)
    assert status == 200, body
    return json.loads(body)


def test_xgboost_binary_answers_as_the_booster_over_pickle_and_oip(
    trained: Trained, store_dir: Path
) -> None:
    predict = _xgboost(trained.binary)
    x = _x(8)
    want = predict(x)
    assert set(want["label"]) == {0, 1}
    add_experiment(store_dir, "xgb", trained.binary)
    with serving(store_dir, "xgb") as server:
        check_pickle_answers(server.url, x, predict)
        check_oip_answers(server.url, "xgb", {"input": x.astype(np.float32)}, want)
        meta = _get(server.url, "/v2/models/xgb")
        config = _get(server.url, "/v2/models/xgb/config")
        model = server.service.model if server.service else None
        assert model is not None
        assert (model.kind, model.devices) == ("xgboost", ("CPU",))
    assert meta["platform"] == config["platform"] == "xgboost"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]


def test_xgboost_json_multiclass_and_a_regressor(trained: Trained, store_dir: Path) -> None:
    x = _x(5)
    for key, folder in (("multi", trained.multi), ("reg", trained.xgb_regressor)):
        add_experiment(store_dir, key, folder)
        predict = _xgboost(folder)
        with serving(store_dir, key) as server:
            check_pickle_answers(server.url, x, predict)
            want = predict(x)
            want = want if isinstance(want, dict) else {"prediction": want}
            check_oip_answers(server.url, key, {"input": x.astype(np.float32)}, want)
    assert predict(x).shape == (5,)  # the regressor's prediction: one number per example


def test_an_xgboost_json_is_detected_and_any_other_json_ignored(
    trained: Trained, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    model = folder / "model.json"
    model.write_bytes((trained.multi / "model.json").read_bytes())
    (folder / "config.json").write_text(json.dumps({"learner": "not a model", "lr": 0.1}))
    (folder / "metrics.json").write_text(json.dumps([{"learner": {}}]))
    found = scan(folder)
    assert [(a.path.name, a.framework.name) for a in found] == [("model.json", "xgboost")]
    assert artifact_at(folder / "config.json") is None
    loaded = load_model(folder)  # the newest file is metrics.json: it is not an artifact
    try:
        assert loaded.kind == "xgboost"
    finally:
        loaded.close()


def test_concurrent_clients_share_batches(trained: Trained, store_dir: Path) -> None:
    add_experiment(store_dir, "xgb", trained.binary)
    with serving(store_dir, "xgb") as server:
        check_batches_shared(server, _x(16))


def test_a_wrong_feature_count_is_422_naming_the_input(trained: Trained, store_dir: Path) -> None:
    add_experiment(store_dir, "lgb", trained.lgb_multi)
    with serving(store_dir, "lgb") as server:
        check_422(server.url, np.zeros(FEATURES - 1), "input")
        check_422(server.url, np.zeros((3, FEATURES + 2)), "input")
        check_422(server.url, np.ones(FEATURES, bool), "input")


def test_lightgbm_classifier_and_regressor_answer_as_the_booster(
    trained: Trained, store_dir: Path
) -> None:
    x = _x(7)
    for key, folder in (("lgb", trained.lgb_multi), ("lgbreg", trained.lgb_regressor)):
        predict = _lightgbm(folder)
        want = predict(x)
        add_experiment(store_dir, key, folder)
        with serving(store_dir, key) as server:
            check_pickle_answers(server.url, x, predict)
            oip_want = want if isinstance(want, dict) else {"prediction": want}
            check_oip_answers(server.url, key, {"input": x}, oip_want)
            meta = _get(server.url, f"/v2/models/{key}")
            kind = server.service.model.kind if server.service else None
        assert meta["platform"] == kind == "lightgbm"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, FEATURES]}]
    assert [o["name"] for o in meta["outputs"]] == ["prediction"]


def test_instances_each_load_their_booster(trained: Trained) -> None:
    for folder, predict in ((trained.binary, _xgboost), (trained.lgb_multi, _lightgbm)):
        model = load_model(folder, instances=2)
        try:
            model.start()
            assert model.devices == ("CPU", "CPU")
            x = _x(4)
            assert_close(model.predict({"k": x}, timeout=30)["k"], predict(folder)(x))
        finally:
            model.close()


def test_a_broken_model_file_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.ubj").write_bytes(b"\x00\xffnot ubjson" * 8)
    with pytest.raises(ModelLoadError, match=r"cannot load the XGBoost model .*model\.ubj"):
        load_model(folder)


def test_importing_the_runtime_imports_neither_booster_package() -> None:
    code = (
        "import sys, studioserve, studioserve.models.trees\n"
        "assert not {'xgboost', 'lightgbm'} & set(sys.modules), sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_xgboost_names_the_extra(trained: Trained, store_dir: Path, tmp_path: Path) -> None:
    add_experiment(store_dir, "xgb", trained.binary, serving=ONE_INSTANCE)
    check_missing_extra(tmp_path, store_dir, "xgb", "xgboost", "xgboost")


def test_cli_adds_and_serves_an_xgboost_model(trained: Trained, store_dir: Path) -> None:
    with cli_served(store_dir, "xgb-binary", trained.binary, "xgboost") as url:
        x = _x(4)
        want = _xgboost(trained.binary)(x)
        status, out = post(url, {"k": x})
        assert status == 200, out
        assert_close(out["k"], want)
        check_oip_answers(url, "xgb-binary", {"input": x.astype(np.float32)}, want)
