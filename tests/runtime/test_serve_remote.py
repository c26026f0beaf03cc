"""`studio serve KEY --store s3://...` and `gs://...`: fetch from the store, serve, predict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.client import Client
from tests.fakes.stores import *  # noqa: F403
from tests.helpers import start_cli, stop_cli


@pytest.fixture
def keras_src(tmp_path: Path, keras_mlp_factory: Any) -> tuple[Path, Any]:
    model = keras_mlp_factory(in_dim=8, hidden=16, out_dim=3, seed=5)
    src = tmp_path / "ckpt"
    src.mkdir()
    model.save(src / "model.keras")
    return src, model


def _predict_and_check(url: str, model: Any) -> None:
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with Client(url) as client:
        out = client.predict({"x": x, "one": x[0]})
    want = np.asarray(model.predict_on_batch(x))
    np.testing.assert_allclose(out["x"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["one"], want[0], rtol=1e-5, atol=1e-6)


def test_serve_from_s3(
    s3_store: Any, moto_s3: Any, keras_src: tuple[Path, Any], tmp_path: Path
) -> None:
    src, model = keras_src
    s3_store.add("remote-mlp", src)
    env = dict(os.environ, AWS_ENDPOINT_URL=moto_s3.endpoint, STUDIO_CACHE=str(tmp_path / "cache"))
    proc, url = start_cli(["remote-mlp", "--store", s3_store.url, "--port", "0", "-q"], env)
    try:
        _predict_and_check(url, model)
    finally:
        assert stop_cli(proc) == 0
    assert any((tmp_path / "cache").rglob("model.keras"))


def test_serve_from_gcs(
    gcs_store: Any, gcs_fake: Any, keras_src: tuple[Path, Any], tmp_path: Path
) -> None:
    src, model = keras_src
    gcs_store.add("remote-mlp", src)
    env = dict(
        os.environ,
        STORAGE_EMULATOR_HOST=gcs_fake.endpoint,
        STUDIO_CACHE=str(tmp_path / "cache"),
    )
    proc, url = start_cli(["remote-mlp", "--store", gcs_store.url, "--port", "0", "-q"], env)
    try:
        _predict_and_check(url, model)
    finally:
        assert stop_cli(proc) == 0
