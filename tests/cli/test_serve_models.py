"""`studio serve` with several models, KEY@V, --all and --version-policy, as a user runs it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studioserve.store import open_store
from tests.helpers import raw_post, start_cli, stop_cli

WRAPPER = """
import os

import numpy as np


def create_model(modeldir):
    with open(os.path.join(modeldir, "scale.txt")) as f:
        scale = float(f.read())
    return lambda data: {k: np.asarray(v) * scale for k, v in data.items()}
"""


@pytest.fixture
def two_models(store_dir: Path, tmp_path: Path) -> tuple[dict[str, str], Path]:
    wrapper = tmp_path / "scale_wrapper.py"
    wrapper.write_text(WRAPPER)
    with open_store(str(store_dir)) as store:
        for key, scale in (("double", 2), ("triple", 3)):
            folder = tmp_path / key
            folder.mkdir()
            (folder / "scale.txt").write_text(str(scale))
            store.add(key, folder)
    env = {**os.environ, "STUDIO_STORE": str(store_dir), "PYTHONUNBUFFERED": "1"}
    return env, wrapper


def test_serve_two_keys_prints_each_url_and_answers_at_each_route(
    two_models: tuple[dict[str, str], Path],
) -> None:
    env, wrapper = two_models
    proc, url = start_cli(
        ["double", "triple", "--wrapper", str(wrapper), "--port", "0", "--killafter", "0"], env
    )
    try:
        body = pickle.dumps({"k": np.ones(3, np.float32)})
        for key, scale in (("double", 2), ("triple", 3)):
            status, _, raw = raw_post(url, body, path=f"/models/{key}")
            assert status == 200
            np.testing.assert_allclose(pickle.loads(raw)["k"], np.full(3, scale))  # noqa: S301
        status, _, raw = raw_post(url, body)
        assert status == 400
        assert "'double', 'triple'" in json.loads(raw)["error"]["message"]
    finally:
        assert stop_cli(proc) == 0


def test_serve_all_serves_every_experiment(two_models: tuple[dict[str, str], Path]) -> None:
    env, wrapper = two_models
    proc, url = start_cli(["--all", "--wrapper", str(wrapper), "--port", "0"], env)
    try:
        status, _, raw = raw_post(url, None, method="GET", path="/")
        assert status == 200
        assert [m["name"] for m in json.loads(raw)["models"]] == ["double", "triple"]
    finally:
        assert stop_cli(proc) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name the experiment(s) to serve"),
        (["double@x"], "the version after '@' must be a positive number"),
        (["double", "--version-policy", "newest"], "version"),
        (["double", "--instances", "0"], "--instances"),
    ],
)
def test_serve_refuses_bad_model_arguments_with_a_clear_message(
    two_models: tuple[dict[str, str], Path], args: list[str], message: str
) -> None:
    env, _ = two_models
    result = subprocess.run(
        [sys.executable, "-m", "studioserve", "serve", *args, "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


CHAIN_WRAPPER = """
import os

import numpy as np


def create_model(modeldir, models):
    if os.path.exists(os.path.join(modeldir, "scale.txt")):
        with open(os.path.join(modeldir, "scale.txt")) as f:
            scale = float(f.read())
        return lambda data: {k: np.asarray(v) * scale for k, v in data.items()}

    def chained(data):
        doubled = models.predict("double", data)
        return {k: v + 1 for k, v in doubled.items()}

    return chained
"""


def test_a_wrapper_can_chain_the_served_models(
    two_models: tuple[dict[str, str], Path], store_dir: Path, tmp_path: Path
) -> None:
    env, _ = two_models
    wrapper = tmp_path / "chain_wrapper.py"
    wrapper.write_text(CHAIN_WRAPPER)
    (tmp_path / "plus").mkdir()
    with open_store(str(store_dir)) as store:
        store.add("plus", tmp_path / "plus")
    proc, url = start_cli(["double", "plus", "--wrapper", str(wrapper), "--port", "0"], env)
    try:
        status, _, raw = raw_post(url, pickle.dumps({"k": np.ones(2)}), path="/models/plus")
        assert status == 200
        np.testing.assert_allclose(pickle.loads(raw)["k"], [3.0, 3.0])  # noqa: S301
    finally:
        assert stop_cli(proc) == 0
