"""S3Store against moto's S3 server on 127.0.0.1 (with a fault-injecting layer in front)."""

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

from studioserve.errors import (
    ExperimentExists,
    ExperimentNotFound,
    InvalidKey,
    StoreError,
    UnsafePath,
)
from studioserve.store import open_store
from studioserve.store.s3 import S3Store
from tests.fakes.stores import *  # noqa: F403 - the fixtures
from tests.fakes.stores import MotoS3, fast_retry, read_tree, released

FILES = {
    "model.keras": b"K" * 50_000,
    "variables/part-0": os.urandom(20_000),
    "variables/part-1": b"",
    "notes.txt": b"trained for 3 epochs\n",
}

#: A child process that fetches through open_store (endpoint from AWS_ENDPOINT_URL only).
FETCH_CHILD = (
    "import sys\n"
    "from studioserve.store import open_store\n"
    "print(open_store(sys.argv[1]).fetch(sys.argv[2]), flush=True)\n"
)


def _child_env(moto: MotoS3) -> dict[str, str]:
    env = dict(os.environ)
    env["AWS_ENDPOINT_URL"] = moto.endpoint
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def _versions(store: S3Store, key: str) -> list[str]:
    key_dir = store._cache.key_dir(key)
    return sorted(p.name for p in key_dir.iterdir()) if key_dir.is_dir() else []


# -- add / list / show / rm --------------------------------------------------------------------


def test_add_list_show_rm(s3_store: S3Store, make_modeldir: Callable[..., Path]) -> None:
    src = make_modeldir(FILES)
    assert s3_store.keys() == []
    info = s3_store.add("mnist-7", src, description="first", framework="keras")
    s3_store.add("mnist-8", make_modeldir({"a.h5": b"x"}))
    assert info.key == "mnist-7"
    assert s3_store.keys() == ["mnist-7", "mnist-8"]
    shown = s3_store.info("mnist-7")
    assert (shown.description, shown.framework, shown.created) == (
        "first",
        "keras",
        info.created,
    )
    assert s3_store.files("mnist-7") == sorted((k, len(v)) for k, v in FILES.items())
    assert [i.key for i in s3_store.list()] == ["mnist-7", "mnist-8"]
    s3_store.remove("mnist-7")
    assert s3_store.keys() == ["mnist-8"]
    with pytest.raises(ExperimentNotFound, match="mnist-8"):
        s3_store.remove("mnist-7")


def test_add_refuses_existing_key_and_force_replaces(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir({"old.bin": b"old", "keep.bin": b"same"}))
    with pytest.raises(ExperimentExists, match="--force"):
        s3_store.add("exp", make_modeldir({"new.bin": b"new"}))
    s3_store.add("exp", make_modeldir({"new.bin": b"new", "keep.bin": b"same"}), force=True)
    assert s3_store.files("exp") == [("keep.bin", 4), ("new.bin", 3)]
    # the stale file of the old version is gone from the bucket
    client = moto_s3.client()
    try:
        names = [
            o["Key"]
            for o in client.list_objects_v2(Bucket=s3_store.bucket, Prefix="experiments/exp/")[
                "Contents"
            ]
        ]
    finally:
        client.close()
    assert sorted(names) == [
        "experiments/exp/experiment.json",
        "experiments/exp/modeldir/keep.bin",
        "experiments/exp/modeldir/new.bin",
    ]


def test_experiment_json_is_written_last(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    gate = moto_s3.plan.hold("put", name="experiment.json")
    errors: list[BaseException] = []

    def add() -> None:
        try:
            s3_store.add("exp", make_modeldir(FILES))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=add, name="studioserve-test-add")
    with released(gate):
        thread.start()
        assert gate.arrived.wait(30)
        # every modeldir file is uploaded, yet the experiment is not listed nor fetchable
        assert len(s3_store._list("experiments/exp/modeldir/")[0]) == len(FILES)
        assert s3_store.keys() == []
        with pytest.raises(ExperimentNotFound):
            s3_store.fetch("exp")
    thread.join(30)
    assert not errors
    assert s3_store.keys() == ["exp"]


def test_half_uploaded_experiment_is_never_listed(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    moto_s3.plan.fail("put", status=403, code="AccessDenied", name="part-1", times=-1)
    with pytest.raises(StoreError, match="access denied"):
        s3_store.add("exp", make_modeldir(FILES))
    assert s3_store.keys() == []
    moto_s3.plan.reset()
    s3_store.add("exp", make_modeldir(FILES))  # a retry of the add completes it
    assert s3_store.keys() == ["exp"]


def test_large_files_are_uploaded_in_parts(
    moto_s3: MotoS3, s3_bucket: str, make_modeldir: Callable[..., Path]
) -> None:
    big = os.urandom(11 * 1024 * 1024)
    mib5 = 5 * 1024 * 1024
    with S3Store(
        f"s3://{s3_bucket}/exps",
        endpoint_url=moto_s3.endpoint,
        retry=fast_retry(),
        multipart_threshold=mib5,
        multipart_chunksize=mib5,
    ) as store:
        store.add("big", make_modeldir({"weights.h5": big, "small.txt": b"s"}))
        assert moto_s3.plan.count("upload", "weights.h5") >= 3  # create, parts, complete
        assert moto_s3.plan.count("upload", "small.txt") == 0
        folder = store.fetch("big")
        assert (folder / "weights.h5").read_bytes() == big


def test_keys_ignore_incomplete_and_foreign_folders(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("good", make_modeldir({"a": b"1"}))
    client = moto_s3.client()
    try:
        bucket = s3_store.bucket
        client.put_object(Bucket=bucket, Key="experiments/partial/modeldir/a", Body=b"1")
        client.put_object(Bucket=bucket, Key="experiments/bad key!/experiment.json", Body=b"{}")
        client.put_object(Bucket=bucket, Key="elsewhere/x/experiment.json", Body=b"{}")
    finally:
        client.close()
    assert s3_store.keys() == ["good"]
    with pytest.raises(ExperimentNotFound):
        s3_store.fetch("partial")
    s3_store.remove("partial")  # leftovers of a failed upload can be removed
    assert s3_store._list("experiments/partial/")[0] == []


# -- fetch and the cache -------------------------------------------------------------------


def test_fetch_then_cache_hit_downloads_nothing(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    moto_s3.plan.reset()
    folder = s3_store.fetch("exp")
    assert read_tree(folder) == FILES
    assert moto_s3.plan.count("get") == len(FILES)
    assert s3_store.cached("exp") == folder
    again = s3_store.fetch("exp")
    assert again == folder
    assert moto_s3.plan.count("get") == len(FILES)  # nothing downloaded the second time
    assert read_tree(again) == FILES


def test_remote_change_is_fetched_again(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    first = s3_store.fetch("exp")
    changed = dict(FILES, **{"model.keras": b"retrained" * 100})
    s3_store.add("exp", make_modeldir(changed), force=True)
    moto_s3.plan.reset()
    second = s3_store.fetch("exp")
    assert second != first
    assert read_tree(second) == changed
    # only the changed file was downloaded; the others were copied from the older version
    assert moto_s3.plan.count("get") == 1
    assert not first.exists()  # the old version was pruned
    assert [v for v in _versions(s3_store, "exp") if v.startswith("v-")] == [second.parent.name]


def test_refresh_ignores_the_cache(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    folder = s3_store.fetch("exp")
    (folder / "notes.txt").write_bytes(b"tampered, same size!!")  # same size: not noticed
    moto_s3.plan.reset()
    assert s3_store.fetch("exp", refresh=True) == folder
    assert moto_s3.plan.count("get") == len(FILES)
    assert read_tree(folder) == FILES


def test_damaged_cache_is_fetched_again(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    folder = s3_store.fetch("exp")
    (folder / "model.keras").write_bytes(b"short")
    moto_s3.plan.reset()
    assert read_tree(s3_store.fetch("exp")) == FILES
    assert moto_s3.plan.count("get") == 1


def test_transient_failures_are_retried(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    moto_s3.plan.reset()
    moto_s3.plan.fail("list", status=503, code="SlowDown")
    moto_s3.plan.fail("get", status=500, code="InternalError", name="notes.txt")
    moto_s3.plan.truncate("model.keras")  # the connection drops mid-body
    moto_s3.plan.corrupt("part-0")  # one byte flipped: MD5/CRC mismatch
    assert read_tree(s3_store.fetch("exp")) == FILES
    assert moto_s3.plan.count("get") == len(FILES) + 3


def test_persistent_corruption_is_an_error(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    moto_s3.plan.corrupt("part-0", times=-1)
    with pytest.raises(StoreError, match="(?i)checksum|MD5|attempts"):
        s3_store.fetch("exp")
    assert not [v for v in _versions(s3_store, "exp") if not v.startswith(".tmp")]
    moto_s3.plan.reset()
    assert read_tree(s3_store.fetch("exp")) == FILES


def test_object_changed_during_fetch(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir({"a.bin": b"v1"}))
    gate = moto_s3.plan.hold("get", name="a.bin")
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            s3_store.fetch("exp")
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    thread = threading.Thread(target=fetch, name="studioserve-test-fetch")
    with released(gate):
        thread.start()
        assert gate.arrived.wait(30)
        client = moto_s3.client()
        try:
            client.put_object(
                Bucket=s3_store.bucket, Key="experiments/exp/modeldir/a.bin", Body=b"v2"
            )
        finally:
            client.close()
    thread.join(30)
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError)
    assert "changed" in str(errors[0])
    assert read_tree(s3_store.fetch("exp")) == {"a.bin": b"v2"}


def test_killed_fetch_leaves_no_complete_cache(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    files = dict(FILES, **{"big.ckpt": os.urandom(3 * 1024 * 1024)})
    s3_store.add("exp", make_modeldir(files))
    gate = moto_s3.plan.hold("get", name="big.ckpt", after_bytes=1024 * 1024)
    with released(gate):
        child = subprocess.Popen(
            [sys.executable, "-c", FETCH_CHILD, s3_store.url, "exp"],
            env=_child_env(moto_s3),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert gate.arrived.wait(60), "the child never started downloading"
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    leftovers = _versions(s3_store, "exp")
    assert leftovers, "the child should have started a temp folder"
    assert all(name.startswith(".tmp-") for name in leftovers)  # nothing looks complete
    assert s3_store.cached("exp") is None
    folder = s3_store.fetch("exp")
    assert read_tree(folder) == files
    assert _versions(s3_store, "exp") == [folder.parent.name]  # the temp folder is gone


def test_concurrent_fetches_download_once(
    s3_store: S3Store, make_modeldir: Callable[..., Path], moto_s3: MotoS3
) -> None:
    s3_store.add("exp", make_modeldir(FILES))
    moto_s3.plan.reset()
    gate = moto_s3.plan.hold("get")  # no download starts before both processes listed
    children = []
    with released(gate):
        for _ in range(2):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", FETCH_CHILD, s3_store.url, "exp"],
                    env=_child_env(moto_s3),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        try:
            both_listed = moto_s3.plan.wait_for(
                lambda: moto_s3.plan.count("list", "experiments/exp/") >= 2, timeout=60
            )
        finally:
            gate.release()
        outputs = [c.communicate(timeout=60) for c in children]
    assert both_listed
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    paths = {Path(out.strip()) for out, _ in outputs}
    assert len(paths) == 1
    assert read_tree(paths.pop()) == FILES
    assert moto_s3.plan.count("get") == len(FILES)  # downloaded once, not twice


# -- untrusted names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["../../evil", "a/../../../evil", "a//b", "a\\..\\b", "/etc/evil", "./x", "a/\x1b[2Jb"],
)
def test_path_traversal_object_names_are_refused(
    s3_store: S3Store, moto_s3: MotoS3, tmp_path: Path, bad: str
) -> None:
    client = moto_s3.client()
    try:
        for key, body in [
            ("experiments/exp/experiment.json", b'{"key": "exp"}'),
            ("experiments/exp/modeldir/ok.bin", b"ok"),
            (f"experiments/exp/modeldir/{bad}", b"pwned"),
        ]:
            client.put_object(Bucket=s3_store.bucket, Key=key, Body=body)
    finally:
        client.close()
    with pytest.raises(UnsafePath, match="refusing object name"):
        s3_store.fetch("exp")
    with pytest.raises(UnsafePath):
        s3_store.files("exp")
    assert not any(p.name == "evil" for p in tmp_path.parent.rglob("evil"))
    assert s3_store._cache.lookup("exp", []) is None


@pytest.mark.parametrize("key", ["../x", "a/b", "", ".."])
def test_keys_cannot_traverse(s3_store: S3Store, key: str) -> None:
    for call in (s3_store.fetch, s3_store.info, s3_store.remove):
        with pytest.raises(InvalidKey):
            call(key)


def test_object_that_is_both_file_and_folder_is_refused(s3_store: S3Store, moto_s3: MotoS3) -> None:
    client = moto_s3.client()
    try:
        for key in ("experiment.json", "modeldir/a", "modeldir/a/b"):
            client.put_object(Bucket=s3_store.bucket, Key=f"experiments/exp/{key}", Body=b"{}")
    finally:
        client.close()
    with pytest.raises(UnsafePath, match="clash"):
        s3_store.fetch("exp")


def test_upload_refuses_unsafe_local_names(
    s3_store: S3Store, make_modeldir: Callable[..., Path]
) -> None:
    with pytest.raises(UnsafePath, match="backslash"):
        s3_store.add("exp", make_modeldir({"a\\b": b"x"}))
    assert s3_store.keys() == []


# -- errors ------------------------------------------------------------------------------------


def test_missing_bucket(moto_s3: MotoS3) -> None:
    with S3Store(
        "s3://no-such-bucket-here/p", endpoint_url=moto_s3.endpoint, retry=fast_retry()
    ) as store:
        for call in (store.keys, lambda: store.fetch("k"), lambda: store.info("k")):
            with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
                call()


def test_missing_key_names_the_closest(
    s3_store: S3Store, make_modeldir: Callable[..., Path]
) -> None:
    s3_store.add("mnist-7", make_modeldir({"a": b"1"}))
    s3_store.add("cifar", make_modeldir({"a": b"1"}))
    for call in (s3_store.fetch, s3_store.info, s3_store.files, s3_store.remove):
        with pytest.raises(ExperimentNotFound, match=r"mnist-8.*s3://.*mnist-7, cifar"):
            call("mnist-8")


def test_permission_denied(s3_store: S3Store, moto_s3: MotoS3) -> None:
    moto_s3.plan.deny(s3_store.bucket)
    with pytest.raises(StoreError) as e:
        s3_store.keys()
    message = str(e.value)
    assert "access denied" in message
    assert s3_store.url in message
    assert "AWS_PROFILE" in message
    assert moto_s3.plan.count("list") == 1  # 403 is not retried


def test_network_failure_after_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # nothing listens here now
    with S3Store("s3://bkt/p", endpoint_url=endpoint, retry=fast_retry()) as store:
        with pytest.raises(StoreError) as e:
            store.fetch("k")
    message = str(e.value)
    assert endpoint in message
    assert "after 3 attempts" in message
    assert "AWS_ENDPOINT_URL_S3" in message


def test_throttling_that_persists_is_reported(s3_store: S3Store, moto_s3: MotoS3) -> None:
    moto_s3.plan.fail("list", status=503, code="SlowDown", times=-1)
    with pytest.raises(StoreError, match="after 3 attempts.*SlowDown"):
        s3_store.keys()
    assert moto_s3.plan.count("list") == 3


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_endpoint_from_the_standard_aws_settings(
    moto_s3: MotoS3,
    s3_bucket: str,
    make_modeldir: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, moto_s3.endpoint)
    store = open_store(f"s3://{s3_bucket}/via-env")
    assert isinstance(store, S3Store)
    with store:
        assert store.endpoint == moto_s3.endpoint
        store.add("exp", make_modeldir({"a": b"1"}))
        assert store.keys() == ["exp"]


def test_url_parsing() -> None:
    with S3Store("s3://bkt/a/b/", endpoint_url="http://127.0.0.1:9") as store:
        assert (store.bucket, store.prefix, store.url) == ("bkt", "a/b", "s3://bkt/a/b")
        assert store._base("k") == "a/b/k/"
    with S3Store("s3://bkt", endpoint_url="http://127.0.0.1:9") as store:
        assert store._base("k") == "k/"
    from studioserve.errors import ConfigError

    with pytest.raises(ConfigError, match="s3://BUCKET"):
        S3Store("s3:///prefix")
