"""The SDK-free cache machinery: safe names, retries, progress, the verified cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from pathlib import Path

import pytest

from studioserve.errors import ChecksumMismatch, StoreError, UnsafePath
from studioserve.store._names import check_layout, local_files, safe_join, safe_relpath
from studioserve.store._transfer import (
    Cancelled,
    Progress,
    RetryPolicy,
    Sink,
    md5_from_etag,
    retry_call,
)
from studioserve.store.cache import (
    MANIFEST_FILE,
    ModelCache,
    RemoteObject,
    listing_digest,
    store_cache_id,
)

FAST = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.002)


class FakeRemote:
    """An in-memory remote: objects by relative path, a download function, a call count."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.downloads: list[str] = []
        self.gate: threading.Event | None = None
        self.fail: dict[str, list[BaseException | bytes]] = {}
        self._lock = threading.Lock()

    def listing(self) -> list[RemoteObject]:
        return [
            RemoteObject(
                rel=rel,
                name=f"prefix/key/modeldir/{rel}",
                size=len(data),
                etag=hashlib.md5(data).hexdigest(),
                md5=hashlib.md5(data).hexdigest(),
            )
            for rel, data in sorted(self.files.items())
        ]

    def download(self, obj: RemoteObject, sink: Sink) -> str | None:
        with self._lock:
            self.downloads.append(obj.rel)
            planned = self.fail.get(obj.rel)
            action = planned.pop(0) if planned else None
        if self.gate is not None:
            assert self.gate.wait(30)
        if isinstance(action, BaseException):
            raise action
        data = action if isinstance(action, bytes) else self.files[obj.rel]
        half = len(data) // 2
        sink.write(data[:half])
        sink.write(data[half:])
        return obj.md5


FILES = {"model.keras": b"k" * 1000, "sub/dir/w.bin": os.urandom(3000), "empty": b""}


@pytest.fixture
def cache(tmp_path: Path) -> ModelCache:
    return ModelCache("s3://bucket/prefix", root=tmp_path / "cache")


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "a/b/c.h5", "variables/variables.index", "x..y", ".hidden"])
def test_safe_names_pass(name: str) -> None:
    assert safe_relpath(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "../x", "a/../../x", "a/./b", ".", "/abs", "a//b", "a/", "C:x", "a\\b", "a\x00b"],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePath, match="refusing object name"):
        safe_relpath(name)
    with pytest.raises(UnsafePath):
        RemoteObject(rel=name, name=name, size=1)


def test_safe_join_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert safe_join(root, "a/b") == root / "a" / "b"
    with pytest.raises(UnsafePath, match="outside"):
        safe_join(root, "link/x")


def test_file_and_folder_clash() -> None:
    check_layout(["a/b", "a/c", "b"])
    with pytest.raises(UnsafePath, match="clash"):
        check_layout(["a", "a/b"])


def test_local_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"x")
    (tmp_path / "target").write_bytes(b"t")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "target")
    assert [rel for rel, _ in local_files(tmp_path / "d")] == ["link", "x"]
    (tmp_path / "d" / "bad\\name").write_bytes(b"")
    with pytest.raises(UnsafePath, match="backslash"):
        local_files(tmp_path / "d")


# -- retries -----------------------------------------------------------------------------------


def test_retry_policy() -> None:
    policy = RetryPolicy(attempts=5, backoff=1.0, max_backoff=4.0)
    assert [round(policy.delay(n) / b, 2) <= 1.25 for n, b in [(1, 1), (2, 2), (3, 4), (4, 4)]]
    assert 0.75 <= policy.delay(1) <= 1.25
    assert 3.0 <= policy.delay(10) <= 5.0  # capped
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_retry_call() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert retry_call(flaky, policy=FAST, is_transient=lambda e: True, what="x") == "ok"
    assert len(calls) == 3

    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry_call(
            flaky, policy=RetryPolicy(attempts=2, backoff=0), is_transient=lambda e: True, what="x"
        )
    assert len(calls) == 2

    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry_call(flaky, policy=FAST, is_transient=lambda e: False, what="x")
    assert len(calls) == 1

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        retry_call(flaky, policy=FAST, is_transient=lambda e: True, what="x", cancel=cancel)


# -- identities --------------------------------------------------------------------------------


def test_listing_digest_and_identity() -> None:
    a = RemoteObject(rel="a", name="p/a", size=1, etag="e1")
    b = RemoteObject(rel="b", name="p/b", size=2, etag="e2")
    assert listing_digest([a, b]) == listing_digest([b, a])
    assert listing_digest([a, b]) != listing_digest([a, RemoteObject("b", "p/b", 2, etag="e3")])
    # with an MD5, the content decides: a new generation of the same bytes is the same file
    x1 = RemoteObject(rel="x", name="p/x", size=1, etag="g1", md5="0" * 32, version="1")
    x2 = RemoteObject(rel="x", name="p/x", size=1, etag="g2", md5="0" * 32, version="2")
    assert x1.identity() == x2.identity()
    assert md5_from_etag('"9DD4E461268C8034F5C8564E155C67A6"') == "9dd4e461268c8034f5c8564e155c67a6"
    assert md5_from_etag('"9dd4e461268c8034f5c8564e155c67a6-3"') == ""


def test_store_cache_id() -> None:
    one = store_cache_id("s3://bucket/prefix")
    assert one == store_cache_id("s3://bucket/prefix/")
    assert one != store_cache_id("s3://bucket/prefix", "http://127.0.0.1:9000")
    assert one != store_cache_id("gs://bucket/prefix")
    assert all(c.isalnum() or c in "._-" for c in store_cache_id("s3://b/../../x y"))


# -- the cache ---------------------------------------------------------------------------------


def test_fetch_then_hit(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    folder = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    assert _tree(folder) == FILES
    assert sorted(remote.downloads) == sorted(FILES)
    assert cache.fetch("k", remote.listing(), remote.download, retry=FAST) == folder
    assert len(remote.downloads) == len(FILES)
    assert cache.lookup("k", remote.listing()) == folder
    manifest = json.loads((folder.parent / MANIFEST_FILE).read_text())
    assert [f["path"] for f in manifest["files"]] == sorted(FILES)


def test_change_refetches_only_what_changed(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    first = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    remote.files["model.keras"] = b"new" * 10
    remote.downloads.clear()
    second = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    assert second != first
    assert remote.downloads == ["model.keras"]
    assert _tree(second) == remote.files
    assert not first.parent.exists()


def test_refresh_downloads_everything(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    folder = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    remote.downloads.clear()
    assert cache.fetch("k", remote.listing(), remote.download, refresh=True, retry=FAST) == folder
    assert sorted(remote.downloads) == sorted(FILES)


def test_bad_size_or_md5_is_retried(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    remote.fail["model.keras"] = [b"short"]  # wrong size
    remote.fail["sub/dir/w.bin"] = [b"x" * 3000]  # right size, wrong MD5
    folder = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    assert _tree(folder) == FILES
    assert len(remote.downloads) == len(FILES) + 2


def test_persistent_mismatch_fails_and_leaves_nothing(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    remote.fail["model.keras"] = [b"short"] * 3
    with pytest.raises(ChecksumMismatch, match="got 5 bytes"):
        cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    assert list(cache.key_dir("k").iterdir()) == []


def test_a_failed_download_fails_the_fetch_and_leaves_nothing(cache: ModelCache) -> None:
    files = {f"f{i}": bytes([i]) * 100 for i in range(20)}
    remote = FakeRemote(files)
    remote.fail["f0"] = [PermissionError("denied")]  # not transient: no retry
    with pytest.raises(PermissionError):
        cache.fetch("k", remote.listing(), remote.download, retry=FAST, workers=2)
    assert remote.downloads.count("f0") == 1
    assert list(cache.key_dir("k").iterdir()) == []
    assert _tree(cache.fetch("k", remote.listing(), remote.download, retry=FAST)) == files


def test_leftovers_of_a_killed_fetch(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    stale = cache.key_dir("k") / ".tmp-killed"
    (stale / "modeldir").mkdir(parents=True)
    (stale / "modeldir" / "model.keras").write_bytes(b"half")
    assert cache.lookup("k", remote.listing()) is None
    folder = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    assert _tree(folder) == FILES
    assert not stale.exists()


def test_damaged_or_foreign_cache_is_not_trusted(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    folder = cache.fetch("k", remote.listing(), remote.download, retry=FAST)
    (folder / "model.keras").unlink()
    (folder / "model.keras").symlink_to(folder / "empty")
    assert cache.lookup("k", remote.listing()) is None
    assert _tree(cache.fetch("k", remote.listing(), remote.download, retry=FAST)) == FILES
    (folder.parent / MANIFEST_FILE).write_text("not json")
    assert cache.lookup("k", remote.listing()) is None


def test_empty_modeldir(cache: ModelCache) -> None:
    remote = FakeRemote({})
    folder = cache.fetch("k", [], remote.download)
    assert folder.is_dir()
    assert list(folder.iterdir()) == []
    assert cache.fetch("k", [], remote.download) == folder


def test_concurrent_fetches_in_one_process_download_once(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    remote.gate = threading.Event()
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(cache.fetch("k", remote.listing(), remote.download, retry=FAST))
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    threads = [threading.Thread(target=fetch, name=f"studioserve-test-{i}") for i in range(3)]
    for t in threads:
        t.start()
    remote.gate.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(set(results)) == 1
    assert sorted(remote.downloads) == sorted(FILES)


def test_lock_timeout_is_explained(tmp_path: Path) -> None:
    import filelock

    cache = ModelCache("s3://b/p", root=tmp_path, lock_timeout=0.05)
    cache.folder.mkdir(parents=True)
    holder = filelock.FileLock(str(cache.folder / "k.lock"))
    remote = FakeRemote(FILES)
    with holder, pytest.raises(StoreError, match="delete that file"):
        cache.fetch("k", remote.listing(), remote.download)


# -- progress ----------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal(cache: ModelCache) -> None:
    remote = FakeRemote(FILES)
    tty = _Tty()
    cache.fetch("k", remote.listing(), remote.download, quiet=False, stream=tty)
    out = tty.getvalue()
    assert out.startswith("\r")
    assert out.endswith("\n")
    total = sum(len(v) for v in FILES.values())
    assert f"fetching s3://bucket/prefix/k: 3/3 files, 4.0 kB/{total / 1000:.1f} kB (100%)" in out

    quiet, plain = _Tty(), io.StringIO()
    cache.fetch("k2", remote.listing(), remote.download, quiet=True, stream=quiet)
    cache.fetch("k3", remote.listing(), remote.download, quiet=False, stream=plain)
    assert quiet.getvalue() == plain.getvalue() == ""


def test_progress_counts_back_a_failed_attempt() -> None:
    progress = Progress("x", 1, 100, stream=io.StringIO())
    progress.add(60)
    progress.add(-60)
    progress.add(100)
    progress.file_done()
    assert (progress.files, progress.bytes) == (1, 100)
    assert progress.line() == "x: 1/1 files, 100 B/100 B (100%)"
