"""The detection table: which file or folder is which framework, newest first, ambiguity."""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest

from studioserve.errors import ModelLoadError
from studioserve.models.artifacts import FRAMEWORKS, artifact_at, choose, scan
from studioserve.models.loader import load_model


def _touch(path: Path, data: bytes = b"", age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - 1000 + age
    os.utime(path, (t, t))
    return path


def _torchscript_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/code/__torch__.py", "")
        z.writestr("model/constants.pkl", b"")
        z.writestr("model/data.pkl", b"")
    return path


def test_each_row_of_the_table_is_recognized(tmp_path: Path) -> None:
    _touch(tmp_path / "a.keras")
    _touch(tmp_path / "b.h5")
    (tmp_path / "sm").mkdir()
    _touch(tmp_path / "sm" / "saved_model.pb")
    _touch(tmp_path / "sm" / "variables" / "variables.index")
    _torchscript_zip(tmp_path / "ts.pt")
    _touch(tmp_path / "pickled.pt", b"\x80\x02}q\x00.")
    _touch(tmp_path / "prog.pt2")
    _touch(tmp_path / "m.onnx")
    _touch(tmp_path / "m.skops")
    _touch(tmp_path / "m.ubj")
    _touch(
        tmp_path / "xgb.json", json.dumps({"learner": {"attributes": {}}, "version": [2]}).encode()
    )
    _touch(tmp_path / "other.json", b'{"not": "a model"}')
    _touch(tmp_path / "lgb.txt", b"tree\nversion=v4\nnum_class=1\n")
    _touch(tmp_path / "notes.txt", b"some notes\n")
    _touch(tmp_path / "f.cloudpickle")
    _touch(tmp_path / "m.joblib")
    spark = tmp_path / "spark"
    _touch(spark / "metadata" / "part-00000", b'{"class":"org.apache.spark.ml.PipelineModel"}')
    (spark / "stages").mkdir()
    _touch(spark / "stages" / "0_lr" / "data" / "x.parquet")
    got = {a.path.name: a.framework.name for a in scan(tmp_path)}
    assert got == {
        "a.keras": "keras",
        "b.h5": "keras",
        "sm": "savedmodel",
        "ts.pt": "torchscript",
        "pickled.pt": "torch_pickle",
        "prog.pt2": "torch_export",
        "m.onnx": "onnx",
        "m.skops": "sklearn",
        "m.ubj": "xgboost",
        "xgb.json": "xgboost",
        "lgb.txt": "lightgbm",
        "f.cloudpickle": "closure",
        "m.joblib": "pickle",
        "spark": "spark",
    }
    runs_code = {name for name, fw in FRAMEWORKS.items() if fw.runs_code}
    assert runs_code == {"torch_pickle", "closure", "pickle"}


def test_scan_is_oldest_first_and_skips_symlinks(tmp_path: Path) -> None:
    new = _touch(tmp_path / "new.onnx", age=20)
    old = _touch(tmp_path / "old.onnx", age=10)
    (tmp_path / "link.onnx").symlink_to(new)
    assert [a.path for a in scan(tmp_path)] == [old, new]
    assert artifact_at(tmp_path / "link.onnx") is None


def test_two_frameworks_are_ambiguous_naming_both_files_and_the_flag(tmp_path: Path) -> None:
    _touch(tmp_path / "model.keras", age=1)
    _touch(tmp_path / "model.onnx", age=2)
    with pytest.raises(ModelLoadError) as info:
        choose(scan(tmp_path), where=tmp_path)
    message = str(info.value)
    for word in ("model.keras", "model.onnx", "--framework"):
        assert word in message
    picked = choose(scan(tmp_path), framework="onnx")
    assert [a.path.name for a in picked] == ["model.onnx"]
    with pytest.raises(ModelLoadError, match="holds no sklearn model"):
        choose(scan(tmp_path), framework="sklearn")
    with pytest.raises(ModelLoadError, match="unknown framework 'tensorflow'"):
        choose(scan(tmp_path), framework="tensorflow")


def test_keras_and_savedmodel_are_one_family(tmp_path: Path) -> None:
    _touch(tmp_path / "a.keras", age=1)
    _touch(tmp_path / "sm" / "saved_model.pb", age=2)
    assert [a.framework.name for a in choose(scan(tmp_path))] == ["keras", "savedmodel"]


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        ("m.pkl", b"\x80\x04K\x01.", ["pickle or joblib", "--trust-artifact", "skops"]),
        ("f.cloudpickle", b"\x80\x04K\x01.", ["closure", "--trust-artifact"]),
    ],
)
def test_formats_that_run_code_are_refused_without_the_opt_in(
    tmp_path: Path, name: str, data: bytes, words: list[str]
) -> None:
    _touch(tmp_path / name, data)
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    for word in words:
        assert word in str(info.value)


def test_scanning_imports_no_framework(tmp_path: Path) -> None:
    _torchscript_zip(tmp_path / "ts.pt")
    _touch(tmp_path / "m.onnx")
    heavy = ("torch", "onnxruntime", "sklearn", "xgboost", "lightgbm", "pyspark", "cloudpickle")
    before = {m for m in heavy if m in sys.modules}
    scan(tmp_path)
    assert {m for m in heavy if m in sys.modules} == before
