"""What hot reload needs from every store: fingerprint, serving.toml, put_file and refetching.

Each test runs against the three stores: a local folder, S3 (moto's server) and GCS (the
fake), through the same :class:`Backend` adapter; the tests after them check what only one
kind of store does (the local folder's in-place modeldir and atomic writes, the remote
stores' single listing, partial downloads and mtimes).
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from studioserve.errors import ExperimentNotFound, InvalidKey, StoreError, UnsafePath
from studioserve.store import MAX_SERVING_CONFIG, SERVING_FILE, Store
from studioserve.store.local import LocalStore
from tests.fakes.gcs_fake import FaultPlan
from tests.fakes.stores import *  # noqa: F403 - the fixtures
from tests.fakes.stores import GCS_BUCKET, read_tree

FILES = {
    "ckpt-0001.keras": b"K" * 20_000,
    "variables/part-0": os.urandom(5_000),
    "notes.txt": b"trained for 3 epochs\n",
}
CONFIG = b'max_batch_size = 32\nmax_delay = "5ms"\n'


@dataclasses.dataclass
class Backend:
    """One store under test and the few raw operations a test needs beside its API."""

    kind: str
    store: Store
    put_raw: Callable[[str, bytes], None]  # an object/file under the store root, bypassing it
    plan: FaultPlan | None = None  # the remote fake's request log

    def downloads(self, name: str = "/modeldir/") -> int:
        """Object downloads so far whose name contains ``name`` (remote stores only)."""
        assert self.plan is not None
        return self.plan.count("get", name)

    def reset(self) -> None:
        if self.plan is not None:
            self.plan.reset()

    @property
    def remote(self) -> bool:
        return self.plan is not None


@pytest.fixture(params=["local", "s3", "gcs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        store = LocalStore(tmp_path / "store")

        def put_local(name: str, data: bytes) -> None:
            path = store.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        yield Backend("local", store, put_local)
    elif request.param == "s3":
        moto = request.getfixturevalue("moto_s3")
        bucket = request.getfixturevalue("s3_bucket")
        s3 = request.getfixturevalue("s3_store")
        client = moto.client()

        def put_s3(name: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"experiments/{name}", Body=data)

        try:
            yield Backend("s3", s3, put_s3, moto.plan)
        finally:
            client.close()
    else:
        fake = request.getfixturevalue("gcs_fake")
        gcs = request.getfixturevalue("gcs_store")

        def put_gcs(name: str, data: bytes) -> None:
            fake.put(GCS_BUCKET, f"experiments/{name}", data)

        yield Backend("gcs", gcs, put_gcs, fake.plan)


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "uploads" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable(backend: Backend, make_modeldir: Callable[..., Path]) -> None:
    store = backend.store
    store.add("mnist", make_modeldir(FILES))
    first = store.fingerprint("mnist")
    assert isinstance(first, str)
    assert first
    store.fetch("mnist")
    store.files("mnist")
    store.serving_config("mnist")
    assert store.fingerprint("mnist") == first
    assert store.fingerprint("mnist") == first


def test_fingerprint_changes_with_modeldir_files(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    store = backend.store
    store.add("mnist", make_modeldir(FILES))
    store.add("other", make_modeldir({"a.h5": b"a"}))
    other = store.fingerprint("other")
    seen = [store.fingerprint("mnist")]

    def changed() -> str:
        now = store.fingerprint("mnist")
        assert now not in seen
        assert store.fingerprint("mnist") == now  # and stable again
        seen.append(now)
        return now

    store.put_file("mnist", "ckpt-0002.keras", _file(tmp_path, "c2", b"new checkpoint"))
    changed()
    store.put_file("mnist", "ckpt-0002.keras", _file(tmp_path, "c2b", b"NEW checkpoint"))
    changed()  # rewritten, same size
    store.put_file("mnist", "deep/er/ckpt.h5", _file(tmp_path, "c3", b"h5"))
    changed()
    assert store.remove_file("mnist", "ckpt-0001.keras") is True
    changed()
    assert store.remove_file("mnist", "ckpt-0001.keras") is False
    assert store.fingerprint("mnist") == seen[-1]
    # a file written into the store by other means (a training run, aws s3 cp, gsutil)
    backend.put_raw("mnist/modeldir/ckpt-0003.keras", b"from outside")
    changed()
    assert store.fingerprint("other") == other  # other experiments are not affected


def test_fingerprint_changes_with_serving_config(
    backend: Backend, make_modeldir: Callable[..., Path]
) -> None:
    store = backend.store
    store.add("mnist", make_modeldir(FILES))
    seen = [store.fingerprint("mnist")]
    store.put_serving_config("mnist", CONFIG)
    seen.append(store.fingerprint("mnist"))
    store.put_serving_config("mnist", CONFIG.replace(b"32", b"64"))
    seen.append(store.fingerprint("mnist"))
    assert store.remove_serving_config("mnist") is True
    seen.append(store.fingerprint("mnist"))
    assert len(set(seen[:3])) == 3
    assert seen[3] == seen[0]  # back to no config
    assert store.remove_serving_config("mnist") is False
    assert store.fingerprint("mnist") == seen[-1]


def test_fingerprint_of_unknown_key(backend: Backend, make_modeldir: Callable[..., Path]) -> None:
    store = backend.store
    with pytest.raises(ExperimentNotFound, match="no experiment 'mnist'"):
        store.fingerprint("mnist")
    store.add("mnist-7", make_modeldir(FILES))
    with pytest.raises(ExperimentNotFound, match="mnist-7"):  # the closest keys are named
        store.fingerprint("mnist")
    with pytest.raises(InvalidKey):
        store.fingerprint("../mnist-7")
    store.remove("mnist-7")
    with pytest.raises(ExperimentNotFound):
        store.fingerprint("mnist-7")


def test_fingerprint_of_an_incomplete_experiment_is_not_found(
    backend: Backend, make_modeldir: Callable[..., Path]
) -> None:
    """While ``add --force`` replaces an experiment (no experiment.json), polling says so."""
    backend.put_raw("half/modeldir/ckpt.keras", b"uploading")
    with pytest.raises(ExperimentNotFound):
        backend.store.fingerprint("half")


# --------------------------------------------------------------------------------------------
# serving.toml


def _where(backend: Backend, key: str) -> str:
    store = backend.store
    if isinstance(store, LocalStore):
        return str(store.root / key / SERVING_FILE)
    return f"{store.url}/{key}/{SERVING_FILE}"


def test_serving_config_absent_then_added(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    store = backend.store
    store.add("plain", make_modeldir(FILES))
    assert store.serving_config("plain") is None

    store.add("tuned", make_modeldir(FILES), serving_config=CONFIG)
    assert store.serving_config("tuned") == (CONFIG, _where(backend, "tuned"))
    if backend.kind == "s3":
        assert store.serving_config("tuned")[1].startswith("s3://studio-")  # type: ignore[index]
        assert store.serving_config("tuned")[1].endswith("/experiments/tuned/serving.toml")  # type: ignore[index]
    if backend.kind == "gcs":
        assert _where(backend, "tuned") == f"gs://{GCS_BUCKET}/experiments/tuned/serving.toml"
    # the config is part of the experiment, not of its modeldir
    assert SERVING_FILE not in dict(store.files("tuned"))
    assert SERVING_FILE not in read_tree(store.fetch("tuned"))

    path = _file(tmp_path, "serving.toml", CONFIG + b"instances = 2\n")
    store.add("from-file", make_modeldir(FILES), serving_config=path)
    assert store.serving_config("from-file") == (path.read_bytes(), _where(backend, "from-file"))

    with pytest.raises(ExperimentNotFound):
        store.serving_config("nope")


def test_add_force_replaces_or_drops_the_serving_config(
    backend: Backend, make_modeldir: Callable[..., Path]
) -> None:
    store = backend.store
    store.add("exp", make_modeldir(FILES), serving_config=CONFIG)
    store.add("exp", make_modeldir(FILES), serving_config=b"instances = 3\n", force=True)
    assert store.serving_config("exp") == (b"instances = 3\n", _where(backend, "exp"))
    store.add("exp", make_modeldir(FILES), force=True)  # replaced by one without a config
    assert store.serving_config("exp") is None


def test_put_and_remove_serving_config(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    store = backend.store
    with pytest.raises(ExperimentNotFound):
        store.put_serving_config("exp", CONFIG)
    with pytest.raises(ExperimentNotFound):
        store.remove_serving_config("exp")
    store.add("exp", make_modeldir(FILES))
    store.put_serving_config("exp", CONFIG)
    assert store.serving_config("exp") == (CONFIG, _where(backend, "exp"))
    store.put_serving_config("exp", _file(tmp_path, "s.toml", b"instances = 4\n"))
    assert store.serving_config("exp") == (b"instances = 4\n", _where(backend, "exp"))
    assert store.remove_serving_config("exp") is True
    assert store.serving_config("exp") is None
    assert store.keys() == ["exp"]  # the experiment itself stays
    assert read_tree(store.fetch("exp")) == FILES
    # an empty config is a config
    store.put_serving_config("exp", b"")
    assert store.serving_config("exp") == (b"", _where(backend, "exp"))


def test_serving_config_size_bound(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    store = backend.store
    big = b"#" * (MAX_SERVING_CONFIG + 1)
    with pytest.raises(StoreError, match="over the 1024 KiB limit"):
        store.add("exp", make_modeldir(FILES), serving_config=big)
    assert store.keys() == []  # refused before anything was written
    big_file = _file(tmp_path, "big.toml", big)
    with pytest.raises(StoreError, match=f"{big_file}.*over the 1024 KiB limit"):
        store.add("exp", make_modeldir(FILES), serving_config=big_file)
    assert store.keys() == []

    store.add("exp", make_modeldir(FILES), serving_config=b"#" * MAX_SERVING_CONFIG)  # at the limit
    assert len(store.serving_config("exp")[0]) == MAX_SERVING_CONFIG  # type: ignore[index]
    with pytest.raises(StoreError, match="over the 1024 KiB limit"):
        store.put_serving_config("exp", big)
    assert len(store.serving_config("exp")[0]) == MAX_SERVING_CONFIG  # type: ignore[index]

    # one written into the store by other means is refused when read, naming it
    backend.put_raw(f"exp/{SERVING_FILE}", big)
    backend.reset()
    with pytest.raises(StoreError) as err:
        store.serving_config("exp")
    assert _where(backend, "exp") in str(err.value)
    assert "over the 1024 KiB limit" in str(err.value)
    if backend.remote:
        assert backend.downloads(SERVING_FILE) == 0  # refused from the listing's size


def test_serving_config_bad_argument(backend: Backend, make_modeldir: Callable[..., Path]) -> None:
    store = backend.store
    store.add("exp", make_modeldir(FILES))
    with pytest.raises(TypeError, match="bytes or a Path"):
        store.put_serving_config("exp", "max_batch_size = 3")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="cannot read"):
        store.put_serving_config("exp", Path("/does/not/exist.toml"))


# --------------------------------------------------------------------------------------------
# put_file, remove_file and fetching again


def test_put_file_then_fetch_sees_the_new_file(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    store = backend.store
    store.add("mnist", make_modeldir(FILES))
    before = store.fetch("mnist")
    assert read_tree(before) == FILES
    store.put_file("mnist", "ckpt-0002.keras", _file(tmp_path, "c2", b"second" * 1000))
    want = dict(FILES, **{"ckpt-0002.keras": b"second" * 1000})
    assert store.files("mnist") == sorted((k, len(v)) for k, v in want.items())
    backend.reset()
    after = store.fetch("mnist")
    assert read_tree(after) == want
    if backend.remote:
        assert backend.downloads() == 1  # only the new file; the rest came from the cache
        assert after != before
    else:
        assert after == before  # the local modeldir is used in place
    backend.reset()
    assert store.fetch("mnist") == after  # unchanged now: nothing to download
    if backend.remote:
        assert backend.downloads() == 0

    # replacing a file downloads only that one
    store.put_file("mnist", "notes.txt", _file(tmp_path, "n", b"retrained\n"))
    want["notes.txt"] = b"retrained\n"
    backend.reset()
    assert read_tree(store.fetch("mnist")) == want
    if backend.remote:
        assert backend.downloads() == 1
        assert backend.downloads("notes.txt") == 1

    store.remove_file("mnist", "variables/part-0")
    del want["variables/part-0"]
    backend.reset()
    assert read_tree(store.fetch("mnist")) == want
    if backend.remote:
        assert backend.downloads() == 0


def test_refresh_after_a_change_is_correct(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    """``fetch(refresh=True)`` also sees the change, downloading everything again."""
    store = backend.store
    store.add("mnist", make_modeldir(FILES))
    store.fetch("mnist")
    store.put_file("mnist", "ckpt-0002.keras", _file(tmp_path, "c2", b"second"))
    backend.reset()
    after = store.fetch("mnist", refresh=True)
    assert read_tree(after) == dict(FILES, **{"ckpt-0002.keras": b"second"})
    if backend.remote:
        assert backend.downloads() == len(FILES) + 1


def test_hot_reload_poll_loop(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    """The watcher's loop: poll fingerprint; when it changed, fetch and read the config."""
    store = backend.store
    store.add("mnist", make_modeldir(FILES), serving_config=CONFIG)
    token = store.fingerprint("mnist")
    modeldir = store.fetch("mnist")

    def poll() -> tuple[bool, Path]:
        nonlocal token, modeldir
        now = store.fingerprint("mnist")
        if now == token:
            return False, modeldir
        token = now
        modeldir = store.fetch("mnist")
        return True, modeldir

    assert poll() == (False, modeldir)
    store.put_file("mnist", "ckpt-0002.keras", _file(tmp_path, "c2", b"second"))
    reloaded, folder = poll()
    assert reloaded
    assert (folder / "ckpt-0002.keras").read_bytes() == b"second"
    assert poll() == (False, folder)
    store.put_serving_config("mnist", b"max_batch_size = 8\n")
    reloaded, folder = poll()
    assert reloaded
    assert store.serving_config("mnist") == (b"max_batch_size = 8\n", _where(backend, "mnist"))
    assert poll() == (False, folder)


def test_put_file_errors(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    store = backend.store
    ckpt = _file(tmp_path, "c", b"x")
    with pytest.raises(ExperimentNotFound):
        store.put_file("mnist", "a.keras", ckpt)
    store.add("mnist", make_modeldir(FILES))
    for bad in ("../a.keras", "/abs.keras", "a//b", "a\\b", "", "sub/"):
        with pytest.raises(UnsafePath):
            store.put_file("mnist", bad, ckpt)
    with pytest.raises(StoreError, match="is not a file"):
        store.put_file("mnist", "a.keras", tmp_path / "missing")
    with pytest.raises(StoreError, match="is not a file"):
        store.put_file("mnist", "a.keras", tmp_path)
    with pytest.raises(StoreError):  # a file where a folder is
        store.put_file("mnist", "variables", ckpt)
    with pytest.raises(StoreError):  # a folder where a file is
        store.put_file("mnist", "notes.txt/inner", ckpt)
    with pytest.raises(StoreError, match="is a folder"):
        store.remove_file("mnist", "variables")
    with pytest.raises(UnsafePath):
        store.remove_file("mnist", "../experiment.json")
    with pytest.raises(ExperimentNotFound):
        store.remove_file("nope", "a.keras")
    assert read_tree(store.fetch("mnist")) == FILES  # nothing changed


# --------------------------------------------------------------------------------------------
# the local folder


def test_local_fingerprint_reads_no_content(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(store_dir)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "m.keras").write_bytes(b"k")
    store.add("exp", src, serving_config=CONFIG)
    first = store.fingerprint("exp")

    def no_open(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"fingerprint opened {args[0]!r}")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(io, "open", no_open)
    assert store.fingerprint("exp") == first


def test_local_fingerprint_sees_in_place_writes(store_dir: Path, tmp_path: Path) -> None:
    """A training run writing straight into the store's modeldir is seen, without put_file."""
    store = LocalStore(store_dir)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ckpt.keras").write_bytes(b"v1")
    store.add("exp", src)
    modeldir = store.fetch("exp")
    first = store.fingerprint("exp")
    (modeldir / "ckpt.keras").write_bytes(b"v2")  # same size, same inode, in place
    st = (modeldir / "ckpt.keras").stat()
    os.utime(modeldir / "ckpt.keras", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = store.fingerprint("exp")
    assert second != first
    (modeldir / "new").mkdir()
    assert store.fingerprint("exp") == second  # an empty folder holds no file
    (modeldir / "new" / "ckpt2.h5").write_bytes(b"h5")
    assert store.fingerprint("exp") != second
    (store_dir / "exp" / "notes.md").write_bytes(b"beside modeldir: not a model file")
    third = store.fingerprint("exp")
    (store_dir / "exp" / "notes.md").write_bytes(b"changed, still not a model file")
    assert store.fingerprint("exp") == third


def test_local_fingerprint_follows_symlinked_files_not_folders(
    store_dir: Path, tmp_path: Path
) -> None:
    store = LocalStore(store_dir)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ckpt.keras").write_bytes(b"v1")
    store.add("exp", src)
    modeldir = store.fetch("exp")
    target = tmp_path / "elsewhere" / "big.h5"
    target.parent.mkdir()
    target.write_bytes(b"1")
    os.symlink(target, modeldir / "linked.h5")
    os.symlink(target.parent, modeldir / "linked-folder")
    os.symlink(tmp_path / "does-not-exist", modeldir / "broken.h5")
    assert store.files("exp") == [("ckpt.keras", 2), ("linked.h5", 1)]
    first = store.fingerprint("exp")
    target.write_bytes(b"22")  # the linked file changed
    second = store.fingerprint("exp")
    assert second != first
    (target.parent / "more.h5").write_bytes(b"inside the linked folder: not descended into")
    (tmp_path / "does-not-exist").mkdir()  # the broken link now names a folder
    assert store.fingerprint("exp") == second


def test_local_put_file_is_atomic_and_leaves_no_temporary_file(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(store_dir)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ckpt.keras").write_bytes(b"old")
    store.add("exp", src)
    exp = store_dir / "exp"
    before = sorted(p.name for p in exp.iterdir())

    seen_during_write: list[str] = []
    real_replace = os.replace

    def replace(a: Any, b: Any) -> None:
        seen_during_write.extend(sorted(p.name for p in (exp / "modeldir").iterdir()))
        assert Path(a).read_bytes() == b"new checkpoint"  # complete before the rename
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    store.put_file("exp", "ckpt.keras", _file(tmp_path, "c", b"new checkpoint"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen_during_write == ["ckpt.keras"]  # the temporary file is not in modeldir
    assert (exp / "modeldir" / "ckpt.keras").read_bytes() == b"new checkpoint"
    assert sorted(p.name for p in exp.iterdir()) == before

    def failing(a: Any, b: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(StoreError, match="No space left"):
        store.put_file("exp", "ckpt.keras", _file(tmp_path, "d", b"third"))
    with pytest.raises(StoreError, match="No space left"):
        store.put_serving_config("exp", CONFIG)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (exp / "modeldir" / "ckpt.keras").read_bytes() == b"new checkpoint"
    assert sorted(p.name for p in exp.iterdir()) == before  # temporary files removed


def test_local_put_file_across_file_systems(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the experiment folder and the target folder are on different file systems, the
    temporary copy is made beside the target instead."""
    import errno

    store = LocalStore(store_dir)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ckpt.keras").write_bytes(b"old")
    store.add("exp", src)
    real_replace = os.replace
    tried: list[Path] = []

    def replace(a: Any, b: Any) -> None:
        tried.append(Path(a).parent)
        if Path(a).parent == store_dir / "exp":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    store.put_file("exp", "sub/ckpt2.keras", _file(tmp_path, "c", b"two"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert tried == [store_dir / "exp", store_dir / "exp" / "modeldir" / "sub"]
    assert read_tree(store.fetch("exp")) == {"ckpt.keras": b"old", "sub/ckpt2.keras": b"two"}
    assert sorted(p.name for p in (store_dir / "exp").iterdir()) == ["experiment.json", "modeldir"]


def test_local_put_file_is_the_newest_file(store_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(store_dir)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ckpt-1.keras").write_bytes(b"1")
    os.utime(src / "ckpt-1.keras", (time.time() + 5, time.time() + 5))  # copied with its mtime
    store.add("exp", src)
    new = _file(tmp_path, "c2", b"2")
    os.utime(new, (1_000_000, 1_000_000))  # an old file put now is still the newest
    store.put_file("exp", "ckpt-2.keras", new)
    modeldir = store.fetch("exp")
    assert (modeldir / "ckpt-2.keras").stat().st_mtime > time.time() - 60
    assert (modeldir / "ckpt-1.keras").stat().st_mtime > time.time()  # kept from add


def test_local_serving_config_that_is_a_folder_is_absent(store_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(store_dir)
    src = tmp_path / "src"
    src.mkdir()
    store.add("exp", src)
    (store_dir / "exp" / SERVING_FILE).mkdir()
    assert store.serving_config("exp") is None


# --------------------------------------------------------------------------------------------
# the remote stores


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_remote_fingerprint_is_one_listing(
    backend: Backend, make_modeldir: Callable[..., Path]
) -> None:
    store = backend.store
    store.add("exp", make_modeldir(FILES), serving_config=CONFIG)
    assert backend.plan is not None
    backend.reset()
    store.fingerprint("exp")
    assert [c.op for c in backend.plan.calls] == ["list"]  # no HEAD, no download


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_remote_fingerprint_ignores_identical_reuploads(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    """Re-uploading the same bytes changes nothing the cache would download: same token."""
    store = backend.store
    store.add("exp", make_modeldir(FILES), serving_config=CONFIG)
    first = store.fingerprint("exp")
    store.put_file("exp", "notes.txt", _file(tmp_path, "n", FILES["notes.txt"]))
    store.put_serving_config("exp", CONFIG)
    assert store.fingerprint("exp") == first


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_remote_cache_mtimes_follow_the_store(
    backend: Backend, make_modeldir: Callable[..., Path], tmp_path: Path
) -> None:
    """A checkpoint put later is newer in the cache too, whatever the download order.

    The reused files are copied, and the new one downloaded, in the same fetch: without the
    store's times their mtimes would be the order of that fetch.
    """
    store = backend.store
    store.add("exp", make_modeldir({"ckpt-1.keras": b"1" * 100_000}))
    store.fetch("exp")
    time.sleep(1.1)  # S3's LastModified (and the GCS fake's) has a resolution of 1 s
    store.put_file("exp", "ckpt-2.keras", _file(tmp_path, "c2", b"2"))
    modeldir = store.fetch("exp")
    old, new = (modeldir / "ckpt-1.keras").stat(), (modeldir / "ckpt-2.keras").stat()
    assert new.st_mtime >= old.st_mtime + 1
    assert abs(new.st_mtime - time.time()) < 120
