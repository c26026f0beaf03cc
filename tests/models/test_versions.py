"""A model's versions (numbered folders, else checkpoints by mtime, else the modeldir), the
version policy that picks among them, and loading exactly one version."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ConfigError, ModelLoadError
from studioserve.models import (
    IdentityModel,
    KerasModel,
    Model,
    ModelVersionSource,
    VersionPolicy,
    find_checkpoint,
    list_versions,
    load_model,
    load_version,
)
from studioserve.models.versions import fingerprint

WRAPPER = """
def create_model(modeldir):
    return lambda data: {"modeldir": modeldir}
"""


def _touch(path: Path, mtime: float, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))
    return path


def _predict(model: Model, data: dict[str, Any]) -> dict[str, Any]:
    model.start()
    try:
        return model.predict(data, timeout=30)
    finally:
        model.close()


def test_numbered_folders_are_the_versions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    modeldir = tmp_path / "modeldir"
    for name in ("1", "2", "10", "01", "0", "latest"):
        (modeldir / name).mkdir(parents=True)
    _touch(modeldir / "2" / "model.keras", 1000)
    _touch(modeldir / "3", 1000)  # a file, not a folder
    _touch(modeldir / "stray.h5", 1000)
    with caplog.at_level(logging.WARNING, logger="studioserve.models.versions"):
        versions = list_versions(modeldir)
    assert [(v.version, v.path.name, v.kind) for v in versions] == [
        (1, "1", "folder"),
        (2, "2", "folder"),
        (10, "10", "folder"),
    ]
    assert versions[1].mtime == 1000
    assert "01" in caplog.text
    assert "leading zero" in caplog.text
    assert "checkpoints outside them are not served" in caplog.text
    # A wrapper changes nothing for numbered folders.
    assert [v.version for v in list_versions(modeldir, wrapped=True)] == [1, 2, 10]


def test_checkpoints_are_versions_in_mtime_order(tmp_path: Path) -> None:
    modeldir = tmp_path / "modeldir"
    _touch(modeldir / "newest.keras", 3000)
    _touch(modeldir / "oldest.h5", 1000)
    _touch(modeldir / "sub" / "b.hdf5", 2000)
    _touch(modeldir / "sub" / "a.hdf5", 2000)  # same time as b: ordered by path
    _touch(modeldir / "export" / "saved_model.pb", 2500)
    _touch(modeldir / "export" / "variables" / "variables.index", 2500)
    _touch(modeldir / "notes.txt", 9000)
    (modeldir / "link.keras").symlink_to(modeldir / "newest.keras")
    versions = list_versions(modeldir)
    assert [(v.version, v.path.relative_to(modeldir).as_posix()) for v in versions] == [
        (1, "oldest.h5"),
        (2, "sub/a.hdf5"),
        (3, "sub/b.hdf5"),
        (4, "export"),
        (5, "newest.keras"),
    ]
    assert {v.kind for v in versions} == {"checkpoint"}
    assert [v.mtime for v in versions] == [1000, 2000, 2000, 2500, 3000]
    # The newest version is what load_model has always served.
    assert versions[-1].path == find_checkpoint(modeldir)
    # With a wrapper the modeldir is one version.
    (wrapped,) = list_versions(modeldir, wrapped=True)
    assert (wrapped.version, wrapped.kind, wrapped.path) == (1, "modeldir", modeldir)


def test_no_checkpoint_is_one_version_the_modeldir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (only,) = list_versions(empty)
    assert (only.version, only.kind, only.path) == (1, "modeldir", empty)
    (missing,) = list_versions(tmp_path / "missing")
    assert (missing.version, missing.kind, missing.mtime) == (1, "modeldir", 0.0)
    with pytest.raises(ModelLoadError, match="not a folder"):
        list_versions(_touch(tmp_path / "file", 1000))


def test_the_fingerprint_changes_only_when_a_version_is_rewritten(tmp_path: Path) -> None:
    modeldir = tmp_path / "modeldir"
    _touch(modeldir / "1" / "model.keras", 1000)
    _touch(modeldir / "2" / "model.keras", 1000)
    first = {v.version: v.fingerprint for v in list_versions(modeldir)}
    assert all(len(f) == 16 and int(f, 16) >= 0 for f in first.values())
    assert first == {v.version: v.fingerprint for v in list_versions(modeldir)}
    _touch(modeldir / "2" / "model.keras", 1000, b"rewritten")  # same mtime, new size
    second = {v.version: v.fingerprint for v in list_versions(modeldir)}
    assert second[1] == first[1]
    assert second[2] != first[2]
    _touch(modeldir / "1" / "model.keras", 2000)  # same size, new mtime
    assert fingerprint(modeldir / "1") != first[1]
    assert fingerprint(tmp_path / "missing") == fingerprint(tmp_path / "missing")


def _sources(*versions: int) -> list[ModelVersionSource]:
    return [
        ModelVersionSource(version=v, path=Path(f"/m/{v}"), kind="folder", mtime=0, fingerprint="")
        for v in versions
    ]


def test_version_policies_select_like_triton() -> None:
    sources = _sources(3, 1, 2)
    assert [s.version for s in VersionPolicy().select(sources)] == [3]
    assert [s.version for s in VersionPolicy.latest(2).select(sources)] == [2, 3]
    assert [s.version for s in VersionPolicy.latest(5).select(sources)] == [1, 2, 3]
    assert [s.version for s in VersionPolicy.all().select(sources)] == [1, 2, 3]
    assert [s.version for s in VersionPolicy.specific(3, 1, 3).select(sources)] == [1, 3]
    with pytest.raises(ConfigError) as info:
        VersionPolicy.specific(2, 4, 7).select(sources, model="mnist")
    message = str(info.value)
    assert "model 'mnist' has no versions 4, 7" in message
    assert "its versions: 1, 2, 3" in message
    assert "'specific:2,4,7'" in message


@pytest.mark.parametrize(
    ("text", "policy", "description"),
    [
        ("latest", VersionPolicy.latest(1), "the newest version"),
        ("Latest : 3", VersionPolicy.latest(3), "the 3 newest versions"),
        ("all", VersionPolicy.all(), "all versions"),
        ("specific:3,1", VersionPolicy.specific(1, 3), "versions 1, 3"),
        ("specific: 2", VersionPolicy.specific(2), "version 2"),
    ],
)
def test_version_policy_text(text: str, policy: VersionPolicy, description: str) -> None:
    parsed = VersionPolicy.parse(text)
    assert parsed == policy
    assert parsed.describe() == description
    assert VersionPolicy.parse(parsed.text()) == parsed


@pytest.mark.parametrize(
    "text", ["", "newest", "latest:0", "latest:x", "all:2", "specific", "specific:", "specific:1,0"]
)
def test_a_bad_version_policy_names_the_grammar(text: str) -> None:
    with pytest.raises(ConfigError, match=r"in --version-policy .*write \"latest\", \"latest:N\""):
        VersionPolicy.parse(text, source="--version-policy")
    with pytest.raises(ValueError, match="count >= 1"):
        VersionPolicy.latest(0)


def test_load_version_loads_exactly_that_checkpoint(tmp_path: Path, keras_mlp_factory: Any) -> None:
    modeldir = tmp_path / "modeldir"
    modeldir.mkdir()
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    expected = []
    for seed, (name, mtime) in enumerate([("b.keras", 1000), ("a.keras", 2000)]):
        keras_model = keras_mlp_factory(seed=seed)
        keras_model.save(modeldir / name)
        os.utime(modeldir / name, (mtime, mtime))
        expected.append(np.asarray(keras_model(x[None, :]))[0])
    assert not np.allclose(expected[0], expected[1])
    versions = list_versions(modeldir)
    assert [v.path.name for v in versions] == ["b.keras", "a.keras"]
    for source, want in zip(versions, expected, strict=True):
        model = load_version(source, max_batch_size=4)
        assert type(model) is KerasModel
        assert model.source.endswith(source.path.name)
        np.testing.assert_allclose(_predict(model, {"k": x})["k"], want, rtol=1e-5, atol=1e-6)


def test_load_version_gives_a_wrapper_the_version_folder(tmp_path: Path) -> None:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    modeldir = tmp_path / "modeldir"
    (modeldir / "1").mkdir(parents=True)
    (modeldir / "2").mkdir()
    for source in list_versions(modeldir, wrapped=True):
        model = load_version(source, str(wrapper))
        assert _predict(model, {"a": 1}) == {"modeldir": str(modeldir / str(source.version))}


def test_load_version_refuses_what_it_cannot_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    modeldir = tmp_path / "modeldir"
    (modeldir / "1").mkdir(parents=True)
    (folder,) = list_versions(modeldir)
    with pytest.raises(ModelLoadError, match=r"version folder .*1 holds no model artifact"):
        load_version(folder)
    (modeldir / "1").rmdir()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_version(folder)

    checkpoint = _touch(modeldir / "model.keras", 1000)
    (source,) = list_versions(modeldir)
    with pytest.raises(ValueError, match="wrapped=True"):
        load_version(source, "wrapper.py")
    checkpoint.unlink()
    with pytest.raises(ModelLoadError, match=r"model.keras does not exist"):
        load_version(source)
    with pytest.raises(ValueError, match="not both"):
        load_model(modeldir, "wrapper.py", checkpoint=checkpoint)

    (empty,) = list_versions(modeldir)
    with caplog.at_level(logging.WARNING, logger="studioserve.models.loader"):
        identity = load_version(empty)
    assert type(identity) is IdentityModel
    assert "serving the identity model" in caplog.text
