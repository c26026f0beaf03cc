"""The local experiment store: add, list, info, remove, fetch, and key validation."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from studioserve.errors import (
    ExperimentExists,
    ExperimentNotFound,
    InvalidKey,
    StoreError,
    StudioServeError,
)
from studioserve.store import EXPERIMENT_FILE, MODELDIR, ExperimentInfo, open_store, validate_key
from studioserve.store.local import LocalStore


@pytest.fixture
def store(store_dir: Path) -> LocalStore:
    return LocalStore(store_dir)


def _modeldir(path: Path, files: dict[str, bytes] | None = None) -> Path:
    files = files if files is not None else {"model.keras": b"weights", "sub/notes.txt": b"hi"}
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------
# the happy path


def test_add_list_info_fetch_files_remove(store: LocalStore, tmp_path: Path) -> None:
    src = _modeldir(tmp_path / "run")
    info = store.add("mnist-7", src, description="first try", framework="keras")
    assert isinstance(info, ExperimentInfo)
    assert (info.key, info.description, info.framework) == ("mnist-7", "first try", "keras")
    assert info.created

    assert store.keys() == ["mnist-7"]
    assert store.list() == [store.info("mnist-7")]
    assert store.info("mnist-7") == info

    modeldir = store.fetch("mnist-7")
    assert modeldir == store.root / "mnist-7" / MODELDIR
    assert (modeldir / "model.keras").read_bytes() == b"weights"
    assert store.files("mnist-7") == [("model.keras", 7), ("sub/notes.txt", 2)]
    meta = json.loads((store.root / "mnist-7" / EXPERIMENT_FILE).read_text())
    assert meta["key"] == "mnist-7"
    assert meta["description"] == "first try"

    # the source folder is copied, not moved or linked
    (src / "model.keras").write_bytes(b"changed")
    assert (modeldir / "model.keras").read_bytes() == b"weights"

    store.remove("mnist-7")
    assert store.keys() == []
    assert _tree(store.root) == []
    with pytest.raises(ExperimentNotFound):
        store.fetch("mnist-7")


def test_store_folder_is_created_on_first_add(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "not" / "yet")
    assert store.keys() == []
    store.add("k", _modeldir(tmp_path / "run"))
    assert store.keys() == ["k"]


def test_add_onto_an_existing_key_needs_force(store: LocalStore, tmp_path: Path) -> None:
    store.add("k", _modeldir(tmp_path / "v1", {"a.h5": b"one"}), description="v1")
    with pytest.raises(ExperimentExists) as info:
        store.add("k", _modeldir(tmp_path / "v2", {"b.h5": b"two"}))
    assert "pass --force" in str(info.value)
    assert info.value.http_status == 409
    assert store.files("k") == [("a.h5", 3)]

    new = store.add("k", tmp_path / "v2", description="v2", force=True)
    assert new.description == "v2"
    assert store.files("k") == [("b.h5", 3)]  # old files gone, not merged
    assert store.keys() == ["k"]
    assert _tree(store.root) == ["k", "k/experiment.json", "k/modeldir", "k/modeldir/b.h5"]


def test_force_re_add_from_the_experiments_own_modeldir(store: LocalStore, tmp_path: Path) -> None:
    store.add("k", _modeldir(tmp_path / "run"))
    store.add("k", store.fetch("k"), force=True, description="again")
    assert store.info("k").description == "again"
    assert store.files("k") == [("model.keras", 7), ("sub/notes.txt", 2)]


def test_add_needs_a_folder(store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "file.h5").write_bytes(b"x")
    for src in (tmp_path / "file.h5", tmp_path / "missing"):
        with pytest.raises(StoreError, match="is not a folder"):
            store.add("k", src)
    assert store.keys() == []


def test_open_store_gives_a_local_store(store_dir: Path) -> None:
    for url in (str(store_dir), f"file://{store_dir}"):
        opened = open_store(url)
        assert isinstance(opened, LocalStore)
        assert opened.root == store_dir
        assert opened.url == str(store_dir)


def test_open_store_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spaced = tmp_path / "my store"
    cases = {
        "file://relative/dir": Path("relative/dir"),
        "file:relative": Path("relative"),
        f"file://localhost{tmp_path}": tmp_path,
        f"file://{tmp_path}/my%20store": spaced,
        "relative/dir": Path("relative/dir"),
    }
    for url, want in cases.items():
        opened = open_store(url)
        assert isinstance(opened, LocalStore), url
        assert opened.root.resolve() == (tmp_path / want).resolve(), url


# --------------------------------------------------------------------------------------------
# keys


GOOD_KEYS = ["a", "mnist-7", "A.b_c-9", "x" * 128, "1", "...", ".hidden", "a..b", "-", "_"]
BAD_KEYS = [
    "../x",
    "a/b",
    "a\\b",
    "/abs",
    "",
    ".",
    "..",
    "x" * 129,
    "ключ",
    "café",
    "a b",
    "a\nb",
    "abc\n",
    "a\x00b",
    "~user",
    "a:b",
    "key*",
    "１２３",  # fullwidth digits
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_valid_keys(key: str, store: LocalStore, tmp_path: Path) -> None:
    assert validate_key(key) == key
    store.add(key, _modeldir(tmp_path / "run"))
    assert store.keys() == [key]
    assert store.info(key).key == key
    assert store.fetch(key).is_dir()
    store.remove(key)
    assert store.keys() == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused_everywhere(key: str, store: LocalStore, tmp_path: Path) -> None:
    src = _modeldir(tmp_path / "run")
    outside = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidKey) as info:
        validate_key(key)
    assert repr(key) in str(info.value)
    assert "A-Z a-z 0-9 . _ -" in str(info.value)
    assert info.value.http_status == 400
    calls: list[Any] = [
        lambda: store.add(key, src),
        lambda: store.add(key, src, force=True),
        lambda: store.info(key),
        lambda: store.fetch(key),
        lambda: store.files(key),
        lambda: store.remove(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey):
            call()
    assert _tree(store.root) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == outside  # nothing written next door


@pytest.mark.parametrize("key", [None, 7, b"bytes"])
def test_non_string_keys_are_invalid(key: Any) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


def test_traversal_cannot_reach_a_neighbouring_experiment(tmp_path: Path) -> None:
    # two stores side by side: keys of one can never name folders of the other
    a, b = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    b.add("secret", _modeldir(tmp_path / "run"))
    for key in ("../b/secret", "..", "../b", "b/secret"):
        with pytest.raises(InvalidKey):
            a.fetch(key)
        with pytest.raises(InvalidKey):
            a.remove(key)
    assert b.keys() == ["secret"]


# --------------------------------------------------------------------------------------------
# not found


def test_not_found_names_the_store_and_the_closest_keys_first(
    store: LocalStore, tmp_path: Path
) -> None:
    src = _modeldir(tmp_path / "run")
    for key in ("cifar-resnet", "mnist-7", "mnist-8", "imagenet"):
        store.add(key, src)
    for call in (store.fetch, store.info, store.remove, store.files):
        with pytest.raises(ExperimentNotFound) as info:
            call("mnist7")
        message = str(info.value)
        assert "'mnist7'" in message
        assert str(store.root) in message
        listed = message.split("existing keys (closest first): ", 1)[1].split(", ")
        assert sorted(listed[:2]) == ["mnist-7", "mnist-8"]
        assert sorted(listed) == sorted(store.keys())
        assert info.value.http_status == 404


def test_not_found_in_an_empty_store_says_how_to_add(store: LocalStore) -> None:
    with pytest.raises(ExperimentNotFound) as info:
        store.fetch("anything")
    assert str(store.root) in str(info.value)
    assert "studio experiments add KEY DIR" in str(info.value)


def test_not_found_lists_at_most_ten_keys(store: LocalStore, tmp_path: Path) -> None:
    src = _modeldir(tmp_path / "run")
    for i in range(15):
        store.add(f"exp-{i:02d}", src)
    with pytest.raises(ExperimentNotFound) as info:
        store.fetch("exp-3")
    shown = str(info.value).split("existing keys (closest first): ", 1)[1]
    assert shown.endswith(" ...")
    assert len(shown.removesuffix(" ...").split(", ")) == 10


# --------------------------------------------------------------------------------------------
# half-added experiments are never listed


def test_folders_without_experiment_json_are_not_experiments(store: LocalStore) -> None:
    _modeldir(store.root / "half" / MODELDIR)
    (store.root / "loose-file").write_text("x")
    assert store.keys() == []
    for call in (store.fetch, store.info):
        with pytest.raises(ExperimentNotFound):
            call("half")


def test_temporary_and_foreign_folders_are_never_listed(store: LocalStore, tmp_path: Path) -> None:
    store.add("real", _modeldir(tmp_path / "run"))
    # what an interrupted add, replace or remove leaves behind, and folders a person made
    for name in (".real@add.1234", ".x@old.99", ".gone@rm.5", "my model", "café"):
        folder = store.root / name
        _modeldir(folder / MODELDIR)
        (folder / EXPERIMENT_FILE).write_text(json.dumps({"key": name}))
    assert store.keys() == ["real"]
    assert [i.key for i in store.list()] == ["real"]


def test_listing_during_add_never_shows_the_new_key(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add("old", _modeldir(tmp_path / "run"))
    seen: list[list[str]] = []
    real_copytree = shutil.copytree

    def observing_copytree(*args: Any, **kw: Any) -> Any:
        seen.append(store.keys())
        result = real_copytree(*args, **kw)
        seen.append(store.keys())
        return result

    monkeypatch.setattr(shutil, "copytree", observing_copytree)
    store.add("new", tmp_path / "run")
    assert len(seen) >= 2
    assert all(keys == ["old"] for keys in seen)
    assert store.keys() == ["new", "old"]


def test_a_failed_copy_leaves_nothing_behind(store: LocalStore, tmp_path: Path) -> None:
    src = _modeldir(tmp_path / "run")
    os.symlink(tmp_path / "does-not-exist", src / "broken-link.h5")
    with pytest.raises(StoreError) as info:
        store.add("k", src)
    assert "cannot copy" in str(info.value)
    assert str(src) in str(info.value)
    assert store.keys() == []
    assert _tree(store.root) == []


def test_a_failed_forced_replace_keeps_the_old_experiment(
    store: LocalStore, tmp_path: Path
) -> None:
    store.add("k", _modeldir(tmp_path / "v1", {"a.h5": b"one"}))
    src = _modeldir(tmp_path / "v2", {"b.h5": b"two"})
    os.symlink(tmp_path / "does-not-exist", src / "broken-link.h5")
    with pytest.raises(StoreError):
        store.add("k", src, force=True)
    assert store.keys() == ["k"]
    assert store.files("k") == [("a.h5", 3)]
    assert _tree(store.root) == ["k", "k/experiment.json", "k/modeldir", "k/modeldir/a.h5"]


def test_a_failed_rename_during_force_puts_the_old_experiment_back(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add("k", _modeldir(tmp_path / "v1", {"a.h5": b"one"}), description="v1")
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if "@add." in Path(src).name:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        store.add("k", _modeldir(tmp_path / "v2", {"b.h5": b"two"}), force=True)
    assert store.keys() == ["k"]
    assert store.info("k").description == "v1"
    assert store.files("k") == [("a.h5", 3)]
    assert _tree(store.root) == ["k", "k/experiment.json", "k/modeldir", "k/modeldir/a.h5"]


def test_losing_an_add_race_is_experiment_exists(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def racing_replace(src: Any, dst: Any) -> None:
        if "@add." in Path(src).name:
            # another process finishes adding the same key just before our rename
            _modeldir(Path(dst) / MODELDIR)
            (Path(dst) / EXPERIMENT_FILE).write_text(
                json.dumps({"key": "k", "description": "them"})
            )
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    with pytest.raises(ExperimentExists, match="by someone else meanwhile"):
        store.add("k", _modeldir(tmp_path / "run"), description="us")
    assert store.info("k").description == "them"
    assert [p.name for p in store.root.iterdir()] == ["k"]


def test_an_interrupted_add_leaves_nothing_listed(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _modeldir(tmp_path / "run")

    def interrupted(*args: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copytree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.add("k", src)
    assert store.keys() == []
    assert _tree(store.root) == []


def test_experiments_are_readable_by_the_group_like_any_folder(
    store: LocalStore, tmp_path: Path
) -> None:
    old = os.umask(0o022)
    try:
        store.add("shared", _modeldir(tmp_path / "run"))
    finally:
        os.umask(old)
    mode = stat.S_IMODE((store.root / "shared").stat().st_mode)
    assert mode == 0o755


# --------------------------------------------------------------------------------------------
# damaged metadata


def test_damaged_experiment_json_is_a_store_error(store: LocalStore, tmp_path: Path) -> None:
    store.add("k", _modeldir(tmp_path / "run"))
    meta = store.root / "k" / EXPERIMENT_FILE
    meta.write_text("{not json")
    with pytest.raises(StoreError, match=f"cannot read {meta}") as info:
        store.info("k")
    assert not isinstance(info.value, ExperimentNotFound)
    meta.write_text("[1, 2]")
    with pytest.raises(StoreError, match="does not hold a JSON object"):
        store.info("k")


def test_modeldir_missing_is_a_store_error(store: LocalStore, tmp_path: Path) -> None:
    store.add("k", _modeldir(tmp_path / "run"))
    shutil.rmtree(store.root / "k" / MODELDIR)
    with pytest.raises(StoreError, match="has no modeldir folder") as info:
        store.fetch("k")
    assert "--force" in str(info.value)


def test_unknown_metadata_fields_are_kept(store: LocalStore, tmp_path: Path) -> None:
    store.add("k", _modeldir(tmp_path / "run"))
    meta = store.root / "k" / EXPERIMENT_FILE
    data = json.loads(meta.read_text())
    data["accuracy"] = 0.98
    meta.write_text(json.dumps(data))
    info = store.info("k")
    assert info.extra == {"accuracy": 0.98}
    assert info.to_json()["accuracy"] == 0.98


def test_every_store_error_is_a_studioserve_error() -> None:
    for cls in (InvalidKey, ExperimentNotFound, ExperimentExists, StoreError):
        assert issubclass(cls, StudioServeError)
