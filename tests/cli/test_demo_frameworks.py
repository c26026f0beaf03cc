"""`studio demo --framework NAME`: each framework's demo model is saved, detected and served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from studioserve.config import ServeConfig
from studioserve.demo import DEMO_BUILDERS, add_demo_experiment
from studioserve.runtime import ModelServer
from studioserve.store import open_store
from tests.helpers import raw_post

DETECTED = {
    "keras": "keras",
    "torch": "torchscript",
    "onnx": "onnx",
    "sklearn": "sklearn",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "closure": "closure",
    "spark": "spark",
}


@pytest.mark.parametrize("framework", sorted(DEMO_BUILDERS))
def test_each_demo_model_is_detected_and_answers(store_dir: Path, framework: str) -> None:
    info = add_demo_experiment("demo", str(store_dir), framework=framework)
    assert info.framework == DETECTED[framework]
    with open_store(str(store_dir)) as store:
        assert store.info("demo").framework == DETECTED[framework]
    cfg = ServeConfig(
        key="demo",
        store=str(store_dir),
        port=0,
        killafter=0,
        trust_artifact=framework == "closure",
    )
    with ModelServer(cfg) as server:
        body = json.dumps({"a": [0.1, 0.2, 0.3, 0.4], "b": [[0.4, 0.3, 0.2, 0.1]] * 2}).encode()
        status, _, raw = raw_post(server.url, body, {"Content-Type": "application/json"})
        assert status == 200, raw
        out = json.loads(raw)
        assert set(out) == {"a", "b"}
        first = out["a"]
        if isinstance(first, dict):  # classifiers: label and probabilities
            assert set(first) >= {"label"} or set(first) >= {"prediction"}
        else:
            assert np.asarray(first).shape[-1] == 3


def test_an_unknown_demo_framework_names_the_choices(store_dir: Path) -> None:
    from studioserve.errors import ConfigError

    with pytest.raises(ConfigError, match="keras, torch"):
        add_demo_experiment("demo", str(store_dir), framework="mxnet")
