"""GCSStore against a fake of the GCS JSON API on 127.0.0.1 (and once against
gcp-storage-emulator, to check the fake against a third-party implementation)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from studioserve.errors import ExperimentExists, ExperimentNotFound, StoreError, UnsafePath
from studioserve.store import open_store
from studioserve.store.gcs import GCSStore
from tests.fakes.gcs_fake import FakeGCS
from tests.fakes.stores import *  # noqa: F403 - the fixtures
from tests.fakes.stores import GCS_BUCKET, fast_retry, read_tree, released

FILES = {
    "model.keras": b"K" * 50_000,
    "variables/part-0": os.urandom(20_000),
    "variables/part-1": b"",
    "notes.txt": b"trained for 3 epochs\n",
}

FETCH_CHILD = (
    "import sys\n"
    "from studioserve.store import open_store\n"
    "print(open_store(sys.argv[1]).fetch(sys.argv[2]), flush=True)\n"
)


def _versions(store: GCSStore, key: str) -> list[str]:
    key_dir = store._cache.key_dir(key)
    return sorted(p.name for p in key_dir.iterdir()) if key_dir.is_dir() else []


def test_add_list_show_rm(gcs_store: GCSStore, make_modeldir: Callable[..., Path]) -> None:
    assert gcs_store.keys() == []
    info = gcs_store.add("mnist-7", make_modeldir(FILES), description="d", framework="keras")
    gcs_store.add("mnist-8", make_modeldir({"a.h5": b"x"}))
    assert gcs_store.keys() == ["mnist-7", "mnist-8"]
    shown = gcs_store.info("mnist-7")
    assert (shown.key, shown.description, shown.framework, shown.created) == (
        "mnist-7",
        "d",
        "keras",
        info.created,
    )
    assert gcs_store.files("mnist-7") == sorted((k, len(v)) for k, v in FILES.items())
    gcs_store.remove("mnist-7")
    assert gcs_store.keys() == ["mnist-8"]
    with pytest.raises(ExperimentNotFound):
        gcs_store.remove("mnist-7")


def test_force_replaces_and_deletes_stale_files(
    gcs_store: GCSStore, gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]
) -> None:
    gcs_store.add("exp", make_modeldir({"old.bin": b"old", "keep.bin": b"same"}))
    with pytest.raises(ExperimentExists, match="--force"):
        gcs_store.add("exp", make_modeldir({"new.bin": b"new"}))
    gcs_store.add("exp", make_modeldir({"new.bin": b"new", "keep.bin": b"same"}), force=True)
    assert gcs_fake.names(GCS_BUCKET) == [
        "experiments/exp/experiment.json",
        "experiments/exp/modeldir/keep.bin",
        "experiments/exp/modeldir/new.bin",
    ]


def test_experiment_json_is_written_last(
    gcs_store: GCSStore, gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]
) -> None:
    gate = gcs_fake.plan.hold("put", name="experiment.json")
    errors: list[BaseException] = []

    def add() -> None:
        try:
            gcs_store.add("exp", make_modeldir(FILES))
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    thread = threading.Thread(target=add, name="studioserve-test-add")
    with released(gate):
        thread.start()
        assert gate.arrived.wait(30)
        assert len(gcs_fake.names(GCS_BUCKET)) == len(FILES)  # all files, no experiment.json
        assert gcs_store.keys() == []
    thread.join(30)
    assert not errors
    assert gcs_store.keys() == ["exp"]


def test_big_files_use_resumable_uploads(
    gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]
) -> None:
    big = os.urandom(9 * 1024 * 1024)  # over the SDK's 8 MiB one-request limit
    with GCSStore(
        f"gs://{GCS_BUCKET}/x",
        endpoint=gcs_fake.endpoint,
        retry=fast_retry(),
        chunk_size=1024 * 1024,
    ) as store:
        store.add("big", make_modeldir({"weights.h5": big, "small.txt": b"s"}))
        assert gcs_fake.plan.count("upload", "weights.h5") == 1  # one resumable session
        assert gcs_fake.plan.count("put", "weights.h5") == 9  # in 1 MiB chunks
        assert gcs_fake.plan.count("upload", "small.txt") == 0
        assert (store.fetch("big") / "weights.h5").read_bytes() == big


def test_fetch_cache_hit_change_and_refresh(
    gcs_store: GCSStore, gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]
) -> None:
    gcs_store.add("exp", make_modeldir(FILES))
    gcs_fake.plan.reset()
    folder = gcs_store.fetch("exp")
    assert read_tree(folder) == FILES
    assert gcs_fake.plan.count("get") == len(FILES)
    assert gcs_store.fetch("exp") == folder
    assert gcs_fake.plan.count("get") == len(FILES)  # cache hit: no download

    # re-adding identical bytes (new generations, same MD5) keeps the cache valid
    gcs_store.add("exp", make_modeldir(FILES), force=True)
    assert gcs_store.fetch("exp") == folder
    assert gcs_fake.plan.count("get") == len(FILES)

    changed = dict(FILES, **{"notes.txt": b"retrained"})
    gcs_store.add("exp", make_modeldir(changed), force=True)
    second = gcs_store.fetch("exp")
    assert second != folder
    assert read_tree(second) == changed
    assert gcs_fake.plan.count("get") == len(FILES) + 1  # only the changed file

    gcs_store.fetch("exp", refresh=True)
    assert gcs_fake.plan.count("get") == 2 * len(FILES) + 1


def test_transient_failures_are_retried(
    gcs_store: GCSStore, gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]
) -> None:
    gcs_store.add("exp", make_modeldir(FILES))
    gcs_fake.plan.reset()
    gcs_fake.plan.fail("list", status=503)
    gcs_fake.plan.fail("get", status=500, name="notes.txt")
    gcs_fake.plan.truncate("model.keras")
    gcs_fake.plan.corrupt("part-0")
    assert read_tree(gcs_store.fetch("exp")) == FILES
    assert gcs_fake.plan.count("get") == len(FILES) + 3


def test_killed_fetch_leaves_no_complete_cache(
    gcs_store: GCSStore, gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]
) -> None:
    files = dict(FILES, **{"big.ckpt": os.urandom(3 * 1024 * 1024)})
    gcs_store.add("exp", make_modeldir(files))
    gate = gcs_fake.plan.hold("get", name="big.ckpt", after_bytes=1024 * 1024)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs_fake.endpoint)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    with released(gate):
        child = subprocess.Popen(
            [sys.executable, "-c", FETCH_CHILD, gcs_store.url, "exp"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert gate.arrived.wait(60), "the child never started downloading"
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
    leftovers = _versions(gcs_store, "exp")
    assert leftovers
    assert all(name.startswith(".tmp-") for name in leftovers)
    assert gcs_store.cached("exp") is None
    folder = gcs_store.fetch("exp")
    assert read_tree(folder) == files
    assert _versions(gcs_store, "exp") == [folder.parent.name]


@pytest.mark.parametrize("bad", ["../../evil", "a/../../evil", "a//b", "a\\b", "/abs"])
def test_path_traversal_object_names_are_refused(
    gcs_store: GCSStore, gcs_fake: FakeGCS, tmp_path: Path, bad: str
) -> None:
    gcs_fake.put(GCS_BUCKET, "experiments/exp/experiment.json", b"{}")
    gcs_fake.put(GCS_BUCKET, "experiments/exp/modeldir/ok", b"ok")
    gcs_fake.put(GCS_BUCKET, f"experiments/exp/modeldir/{bad}", b"pwned")
    with pytest.raises(UnsafePath, match="refusing object name"):
        gcs_store.fetch("exp")
    assert not list(tmp_path.parent.rglob("evil"))
    assert gcs_fake.plan.count("get") == 0  # refused before any download


def test_missing_bucket(gcs_fake: FakeGCS, make_modeldir: Callable[..., Path]) -> None:
    with GCSStore("gs://no-such-bucket/p", endpoint=gcs_fake.endpoint) as store:
        for call in (
            store.keys,
            lambda: store.fetch("k"),
            lambda: store.info("k"),
            lambda: store.add("k", make_modeldir({"a": b"1"})),
        ):
            with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
                call()


def test_missing_key(gcs_store: GCSStore, make_modeldir: Callable[..., Path]) -> None:
    gcs_store.add("mnist-7", make_modeldir({"a": b"1"}))
    for call in (gcs_store.fetch, gcs_store.info, gcs_store.files):
        with pytest.raises(ExperimentNotFound, match=r"'mnist-8'.*gs://.*mnist-7"):
            call("mnist-8")


def test_permission_denied(gcs_store: GCSStore, gcs_fake: FakeGCS) -> None:
    gcs_fake.plan.deny(GCS_BUCKET)
    with pytest.raises(StoreError) as e:
        gcs_store.keys()
    assert "permission denied" in str(e.value)
    assert gcs_store.url in str(e.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(e.value)
    assert gcs_fake.plan.count("list") == 1


def test_network_failure_after_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with GCSStore("gs://bkt/p", endpoint=endpoint, retry=fast_retry()) as store:
        with pytest.raises(StoreError) as e:
            store.keys()
    assert endpoint in str(e.value)
    assert "after 3 attempts" in str(e.value)
    assert "STORAGE_EMULATOR_HOST" in str(e.value)


def test_endpoint_from_storage_emulator_host(
    gcs_fake: FakeGCS, make_modeldir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_fake.endpoint)
    store = open_store(f"gs://{GCS_BUCKET}/via-env")
    assert isinstance(store, GCSStore)
    with store:
        assert store.endpoint == gcs_fake.endpoint
        store.add("exp", make_modeldir({"a": b"1"}))
        assert store.keys() == ["exp"]
        assert read_tree(store.fetch("exp")) == {"a": b"1"}


def test_round_trip_on_gcp_storage_emulator(make_modeldir: Callable[..., Path]) -> None:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="emu-bucket")
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
        with GCSStore("gs://emu-bucket/e", endpoint=endpoint, retry=fast_retry()) as store:
            store.add("exp", make_modeldir(FILES))
            assert store.keys() == ["exp"]
            assert read_tree(store.fetch("exp")) == FILES
            assert store.cached("exp") is not None
            store.remove("exp")
            assert store.keys() == []
    finally:
        server.stop()


def test_url_parsing() -> None:
    from studioserve.errors import ConfigError

    with GCSStore("gs://bkt/a/b/", endpoint="http://127.0.0.1:9") as store:
        assert (store.bucket, store.prefix, store.url) == ("bkt", "a/b", "gs://bkt/a/b")
    with pytest.raises(ConfigError, match="gs://BUCKET"):
        GCSStore("gs:///x")
