"""The model repository through the real server: several models, versions, reloads, ensembles.

Every test serves real Keras checkpoints from a real local store on an ephemeral loopback port
and talks to it over HTTP (raw requests and tritonclient).
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.config import ServeConfig
from studioserve.errors import ConfigError, StudioServeError
from studioserve.runtime import ModelServer
from studioserve.store import open_store
from tests.helpers import raw_post

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _mlp(in_dim: int, out_dim: int, seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(in_dim,), dtype="float32", name="x")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(out_dim, name="y")(hidden)
    return keras.Model(inputs, outputs)


class Checkpoints:
    """Small real Keras checkpoints saved once per module, and their expected outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}

    def make(self, name: str, in_dim: int, out_dim: int, seed: int) -> Path:
        model = _mlp(in_dim, out_dim, seed)
        path = self.root / f"{name}.keras"
        model.save(path)
        self.models[name] = model
        self.paths[name] = path
        return path

    def predict(self, name: str, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.models[name].predict_on_batch(x))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    c = Checkpoints(tmp_path_factory.mktemp("ckpt"))
    c.make("a1", 4, 3, seed=1)
    c.make("a2", 4, 3, seed=2)
    c.make("a3", 4, 3, seed=3)
    c.make("b", 8, 2, seed=4)
    c.make("c", 3, 5, seed=5)
    return c


def _folder(tmp: Path, files: dict[str, Path], *, spaced: bool = True) -> Path:
    """A modeldir holding ``files`` (relative name -> checkpoint), mtimes in the given order."""
    tmp.mkdir(parents=True, exist_ok=True)
    t = time.time() - 1000
    for i, (rel, src) in enumerate(files.items()):
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        if spaced:
            os.utime(dst, (t + 10 * i, t + 10 * i))
    return tmp


def _add(store_dir: Path, key: str, folder: Path, serving: str | None = None) -> None:
    with open_store(str(store_dir)) as store:
        store.add(key, folder, serving_config=serving.encode() if serving else None)


@pytest.fixture
def serve(store_dir: Path) -> Iterator[Callable[..., ModelServer]]:
    servers: list[ModelServer] = []

    def start(*keys: str, **config: Any) -> ModelServer:
        cfg = ServeConfig(
            keys=keys, store=str(store_dir), port=0, killafter=config.pop("killafter", 0), **config
        )
        server = ModelServer(cfg)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()


def _post(url: str, data: dict[str, Any], path: str = "/") -> tuple[int, Any]:
    status, _, body = raw_post(url, pickle.dumps(data), path=path)
    if status != 200:
        return status, json.loads(body)
    return status, pickle.loads(body)  # noqa: S301 - our own server's answer, in a test


def test_three_models_of_different_shapes_answer_each_at_its_own_route(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    for key, name in (("alpha", "a1"), ("beta", "b"), ("gamma", "c")):
        _add(store_dir, key, _folder(tmp_path / key, {"model.keras": ckpt.paths[name]}))
    server = serve("alpha", "beta", "gamma")
    xa = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    xb = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    xc = np.random.default_rng(2).normal(size=(3,)).astype(np.float32)
    with ThreadPoolExecutor(6) as pool:  # concurrently: each model batches on its own
        fa = pool.submit(_post, server.url, {"k": xa}, "/models/alpha")
        fb = pool.submit(_post, server.url, {"k": xb}, "/models/beta")
        fc = pool.submit(_post, server.url, {"k": xc}, "/models/gamma")
        (sa, ra), (sb, rb), (sc, rc) = fa.result(60), fb.result(60), fc.result(60)
    assert (sa, sb, sc) == (200, 200, 200)
    np.testing.assert_allclose(ra["k"], ckpt.predict("a1", xa), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rb["k"], ckpt.predict("b", xb), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rc["k"], ckpt.predict("c", xc[None])[0], rtol=1e-5, atol=1e-6)

    # POST / with several models is a 400 that lists them
    status, body = _post(server.url, {"k": xa})
    assert status == 400
    assert body["error"]["type"] == "model_required"
    for key in ("alpha", "beta", "gamma"):
        assert repr(key) in body["error"]["message"]
    # an unknown model is a 404 naming those that exist, on both protocols
    status, body = _post(server.url, {"k": xa}, "/models/delta")
    assert status == 404
    assert "'alpha'" in body["error"]["message"]
    status, _, raw = raw_post(server.url, b"{}", path="/v2/models/delta/infer")
    assert status == 404
    assert "'beta'" in json.loads(raw)["error"]
    # a shape that fits another model is a 422 from this one
    status, body = _post(server.url, {"k": xb}, "/models/alpha")
    assert status == 422
    # the status page lists every model
    status, _, raw = raw_post(server.url, None, method="GET", path="/")
    page = json.loads(raw)
    assert [m["name"] for m in page["models"]] == ["alpha", "beta", "gamma"]
    assert all(m["state"] == "READY" for m in page["models"])


def test_one_model_keeps_studio_mls_post_slash_and_answers_at_models_key(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(store_dir, "solo", _folder(tmp_path / "solo", {"m.keras": ckpt.paths["a1"]}))
    server = serve("solo")
    x = np.ones((2, 4), np.float32)
    s1, r1 = _post(server.url, {"k": x})
    s2, r2 = _post(server.url, {"k": x}, "/models/solo")
    s3, r3 = _post(server.url, {"k": x}, "/models/solo/versions/1")
    assert (s1, s2, s3) == (200, 200, 200)
    np.testing.assert_allclose(r1["k"], r2["k"])
    np.testing.assert_allclose(r1["k"], r3["k"])


def test_versions_from_checkpoints_in_mtime_order_newest_by_default_and_policies(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    files = {"old.keras": ckpt.paths["a1"], "mid.keras": ckpt.paths["a2"]}
    files["new.keras"] = ckpt.paths["a3"]
    _add(store_dir, "m", _folder(tmp_path / "m", files))
    x = np.full((1, 4), 0.5, np.float32)
    expect = {v: ckpt.predict(n, x) for v, n in ((1, "a1"), (2, "a2"), (3, "a3"))}

    server = serve("m", version_policy="all")
    assert server.repository.get("m").available == (1, 2, 3)
    assert sorted(server.repository.get("m").versions) == [1, 2, 3]
    _, newest = _post(server.url, {"k": x}, "/models/m")
    np.testing.assert_allclose(newest["k"], expect[3], rtol=1e-5, atol=1e-6)
    for v in (1, 2, 3):
        status, out = _post(server.url, {"k": x}, f"/models/m/versions/{v}")
        assert status == 200
        np.testing.assert_allclose(out["k"], expect[v], rtol=1e-5, atol=1e-6)
    status, body = _post(server.url, {"k": x}, "/models/m/versions/9")
    assert status == 404
    assert "served versions: 1, 2, 3" in body["error"]["message"]
    server.close()

    pinned = serve("m@1")
    assert list(pinned.repository.get("m").versions) == [1]
    _, out = _post(pinned.url, {"k": x}, "/models/m")
    np.testing.assert_allclose(out["k"], expect[1], rtol=1e-5, atol=1e-6)
    pinned.close()

    latest2 = serve("m", version_policy="latest:2")
    assert sorted(latest2.repository.get("m").versions) == [2, 3]


def test_numbered_folders_are_versions_and_serving_toml_sets_the_policy(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    folder = _folder(
        tmp_path / "tri", {"1/model.keras": ckpt.paths["a1"], "2/model.keras": ckpt.paths["a2"]}
    )
    _add(store_dir, "tri", folder, serving='version_policy = "specific:1"\nmax_batch_size = 16\n')
    server = serve("tri")
    entry = server.repository.get("tri")
    assert list(entry.versions) == [1]
    assert entry.available == (1, 2)
    assert entry.settings["max_batch_size"] == 16
    x = np.ones((1, 4), np.float32)
    _, out = _post(server.url, {"k": x}, "/models/tri")
    np.testing.assert_allclose(out["k"], ckpt.predict("a1", x), rtol=1e-5, atol=1e-6)
    status, _, raw = raw_post(server.url, None, method="GET", path="/v2/models/tri/config")
    config = json.loads(raw)
    assert config["max_batch_size"] == 16
    assert config["version_policy"] == {"specific": {"versions": [1]}}


def test_a_bad_serving_toml_is_a_startup_error_naming_file_and_key(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(
        store_dir,
        "bad",
        _folder(tmp_path / "bad", {"m.keras": ckpt.paths["a1"]}),
        serving="max_batch = 3\n",
    )
    with pytest.raises(ConfigError) as info:
        serve("bad")
    message = str(info.value)
    assert "serving.toml" in message
    assert "max_batch" in message
    assert "max_batch_size" in message


def test_tritonclient_repository_index_load_unload_and_infer_on_a_version(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    files = {"a.keras": ckpt.paths["a1"], "b.keras": ckpt.paths["a2"]}
    _add(store_dir, "m", _folder(tmp_path / "m", files))
    _add(store_dir, "n", _folder(tmp_path / "n", {"b.keras": ckpt.paths["b"]}))
    server = serve("m", "n", version_policy="all")
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        index = {
            (m["name"], m.get("version")): m["state"] for m in client.get_model_repository_index()
        }
        assert index == {("m", "1"): "READY", ("m", "2"): "READY", ("n", "1"): "READY"}

        x = np.full((2, 4), 0.25, np.float32)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("m", [inp], model_version="1")
        np.testing.assert_allclose(
            result.as_numpy(result.get_response()["outputs"][0]["name"]),
            ckpt.predict("a1", x),
            rtol=1e-5,
            atol=1e-6,
        )
        assert result.get_response()["model_version"] == "1"

        client.unload_model("n")
        assert not client.is_model_ready("n")
        with pytest.raises(InferenceServerException):
            client.infer("n", [inp])
        index = client.get_model_repository_index()
        assert {"name": "n", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        client.load_model("n")
        assert client.is_model_ready("n")
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            client.load_model("nope")
        stats = client.get_inference_statistics("m", "1")["model_stats"]
        assert stats[0]["version"] == "1"
        assert stats[0]["inference_count"] == 2
    finally:
        client.close()


class Load:
    """Closed-loop clients posting one input until stopped; every answer kept with its time."""

    def __init__(self, url: str, x: np.ndarray, path: str, clients: int = 8) -> None:
        self.url, self.x, self.path = url, x, path
        self.results: list[tuple[float, int, Any]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        body = pickle.dumps({"k": self.x})
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                status, _, raw = raw_post(self.url, body, path=self.path)
                out: Any = pickle.loads(raw)["k"] if status == 200 else raw  # noqa: S301
            except OSError as e:  # a connection error is a failed request too
                status, out = -1, repr(e)
            with self._lock:
                self.results.append((sent, status, out))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _wait(what: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_hot_reload_under_load_fails_no_request_and_switches_atomically(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(store_dir, "live", _folder(tmp_path / "live", {"v1.keras": ckpt.paths["a1"]}))
    server = serve("live", watch=0.2)
    x = np.full((1, 4), 0.3, np.float32)
    old, new = ckpt.predict("a1", x), ckpt.predict("a2", x)
    with Load(server.url, x, "/models/live") as load:
        _wait(lambda: len(load.results) > 20)
        with open_store(str(store_dir)) as store:
            store.put_file("live", "v2.keras", ckpt.paths["a2"])
        _wait(lambda: 2 in server.repository.get("live").versions)
        swapped = time.monotonic()
        _wait(lambda: sum(1 for r in load.results if r[0] > swapped) > 20)
        # then a broken newer checkpoint: the served one keeps serving
        broken = tmp_path / "v3.keras"
        broken.write_bytes(b"this is not a keras file")
        with open_store(str(store_dir)) as store:
            store.put_file("live", "v3.keras", broken)
        _wait(lambda: server.repository.get("live").failures >= 1)
        failed_at = time.monotonic()
        _wait(lambda: sum(1 for r in load.results if r[0] > failed_at) > 20)
    statuses = {s for _, s, _ in load.results}
    assert statuses == {200}, [r for r in load.results if r[1] != 200][:3]
    for sent, _, out in load.results:
        is_old = np.allclose(out, old, rtol=1e-5, atol=1e-6)
        is_new = np.allclose(out, new, rtol=1e-5, atol=1e-6)
        assert is_old or is_new
        if sent > swapped:
            assert is_new, "a request sent after the swap got the old model's answer"
    entry = server.repository.get("live")
    assert list(entry.versions) == [2]
    assert "v3.keras" in entry.reason or "keras" in entry.reason.lower()
    # the failure shows in the repository index, the status page and /metrics
    _, _, raw = raw_post(server.url, b"{}", path="/v2/repository/index")
    rows = [m for m in json.loads(raw) if m["name"] == "live"]
    assert rows[0]["state"] == "READY"
    assert rows[0].get("reason")
    _, _, raw = raw_post(server.url, None, method="GET", path="/metrics")
    assert 'studioserve_model_load_failures_total{model="live"} 1.0' in raw.decode()
    _, _, raw = raw_post(server.url, None, method="GET", path="/")
    assert json.loads(raw)["models"][0]["load_failures"] == 1


def test_all_with_watch_adds_and_removes_models(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(store_dir, "first", _folder(tmp_path / "first", {"m.keras": ckpt.paths["a1"]}))
    server = serve(all_models=True, watch=0.2)
    assert server.repository.names() == ["first"]
    _add(store_dir, "second", _folder(tmp_path / "second", {"m.keras": ckpt.paths["b"]}))
    _wait(lambda: "second" in server.repository and server.repository.get("second").ready)
    status, _ = _post(server.url, {"k": np.ones(8, np.float32)}, "/models/second")
    assert status == 200
    with open_store(str(store_dir)) as store:
        store.remove("first")
    _wait(lambda: "first" not in server.repository)
    status, _ = _post(server.url, {"k": np.ones(4, np.float32)}, "/models/first")
    assert status == 404


def test_an_ensemble_runs_its_steps_through_the_served_models(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(store_dir, "enc", _folder(tmp_path / "enc", {"m.keras": ckpt.paths["a1"]}))  # 4 -> 3
    _add(store_dir, "head", _folder(tmp_path / "head", {"m.keras": ckpt.paths["c"]}))  # 3 -> 5
    steps = """
[[ensemble.step]]
model = "enc"
input_map = { x = "INPUT" }
output_map = { y = "FEATURES" }

[[ensemble.step]]
model = "head"
input_map = { x = "FEATURES" }
output_map = { y = "SCORES" }
"""
    (tmp_path / "chain").mkdir()
    _add(store_dir, "chain", tmp_path / "chain", serving=steps)
    server = serve("enc", "head", "chain")
    x = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    status, out = _post(server.url, {"k": x}, "/models/chain")
    assert status == 200, out
    want = ckpt.predict("c", ckpt.predict("a1", x))
    np.testing.assert_allclose(out["k"], want, rtol=1e-4, atol=1e-5)
    # the steps ran in the step models' own pipes: their statistics count the rows
    _, _, raw = raw_post(server.url, None, method="GET", path="/v2/models/enc/stats")
    assert json.loads(raw)["model_stats"][0]["inference_count"] == 3
    _, _, raw = raw_post(server.url, None, method="GET", path="/v2/models/head/stats")
    assert json.loads(raw)["model_stats"][0]["inference_count"] == 3
    _, _, raw = raw_post(server.url, None, method="GET", path="/v2/models/chain/config")
    config = json.loads(raw)
    assert config["platform"] == "ensemble"
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["enc", "head"]


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        ('model = "nope"\ninput_map = { x = "I" }\noutput_map = { y = "O" }', ["nope", "step"]),
        ('model = "enc"\ninput_map = { x = "I" }\noutput_map = { zz = "O" }', ["zz"]),
    ],
)
def test_a_broken_ensemble_graph_is_a_startup_error_naming_the_step(
    serve: Callable[..., ModelServer],
    store_dir: Path,
    tmp_path: Path,
    ckpt: Checkpoints,
    steps: str,
    words: list[str],
) -> None:
    _add(store_dir, "enc", _folder(tmp_path / "enc", {"m.keras": ckpt.paths["a1"]}))
    (tmp_path / "chain").mkdir()
    _add(store_dir, "chain", tmp_path / "chain", serving=f"[[ensemble.step]]\n{steps}\n")
    with pytest.raises(StudioServeError) as info:
        serve("enc", "chain")
    for word in words:
        assert word in str(info.value)


def test_unloading_a_model_gives_its_memory_back(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path
) -> None:
    import keras

    from studioserve import _allocator

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(2048,), name="x")
    outputs = keras.layers.Dense(12288, name="y")(inputs)  # 2048 x 12288 float32: ~100 MB
    big = keras.Model(inputs, outputs)
    (tmp_path / "big").mkdir()
    big.save(tmp_path / "big" / "m.keras")
    del big
    _add(store_dir, "small", _folder(tmp_path / "small", {}))
    _add(store_dir, "big", tmp_path / "big")
    server = serve("small")

    def rss() -> int:
        _allocator.trim()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    server.repository.control.load("big")  # type: ignore[union-attr]
    status, _ = _post(server.url, {"k": np.ones(2048, np.float32)}, "/models/big")
    assert status == 200
    loaded = rss()
    assert loaded - before > 80 * 2**20
    server.repository.control.unload("big")  # type: ignore[union-attr]
    retired = [v for v in server.repository._retired if v.name == "big"]
    assert retired
    assert all(v.wait_closed(30) for v in retired)
    server.repository.reap()
    del retired
    import gc

    gc.collect()
    after = rss()
    assert after - before < 0.5 * (loaded - before), (before, loaded, after)


def test_killafter_counts_requests_to_any_model(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(store_dir, "p", _folder(tmp_path / "p", {"m.keras": ckpt.paths["a1"]}))
    _add(store_dir, "q", _folder(tmp_path / "q", {"m.keras": ckpt.paths["b"]}))
    server = serve("p", "q", killafter=1.5)
    for _ in range(4):
        time.sleep(0.5)
        assert _post(server.url, {"k": np.ones(8, np.float32)}, "/models/q")[0] == 200
    assert not server.wait(0.01)  # requests to q kept the server alive
    assert server.wait(10)
    assert server.stop_reason == "inactivity"


def test_instances_run_copies_of_the_model_stage_and_count_per_instance(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path, ckpt: Checkpoints
) -> None:
    _add(store_dir, "rep", _folder(tmp_path / "rep", {"m.keras": ckpt.paths["a1"]}))
    server = serve("rep", instances=2, max_batch_size=1)
    model = server.repository.get("rep").versions[1].model
    assert model.instances == 2
    x = np.random.default_rng(5).normal(size=(1, 4)).astype(np.float32)
    want = ckpt.predict("a1", x)
    # 4 clients: two rounds of the two instances' batches of one row (admission lets in no
    # more before the first batch is measured)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _post(server.url, {"k": x}, "/models/rep"), range(40)))
    for status, out in results:
        assert status == 200
        np.testing.assert_allclose(out["k"], want, rtol=1e-5, atol=1e-6)
    _, _, raw = raw_post(server.url, None, method="GET", path="/v2/models/rep/config")
    assert json.loads(raw)["instance_group"] == [{"name": "rep_0", "kind": "KIND_CPU", "count": 2}]
    _, _, raw = raw_post(server.url, None, method="GET", path="/v2/models/rep/stats")
    stats = json.loads(raw)["model_stats"][0]
    per_instance = stats["instance_stats"]
    assert sum(i["execution_count"] for i in per_instance) == stats["execution_count"]
    assert sum(i["inference_count"] for i in per_instance) == stats["inference_count"] == 40
    _, _, raw = raw_post(server.url, None, method="GET", path="/metrics")
    text = raw.decode()
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('studioserve_instance_executions_total{instance="')
    )
    assert counted == stats["execution_count"]


GATED_WRAPPER = """
import threading

from studioserve.pipelines import ModelPipe


def create_model(modeldir):
    entered = [threading.Event(), threading.Event()]
    gate = threading.Event()

    def copy(i):
        def run(batch):
            entered[i].set()
            assert gate.wait(30)
            return batch + 1
        return run

    pipe = ModelPipe(name="gated")
    pipe.add(copy(0), max_batch_size=1, instances=[copy(0), copy(1)], name="model")
    pipe.test_hooks = (entered, gate)
    return pipe
"""


def test_two_instances_have_two_batches_in_flight_at_once(
    serve: Callable[..., ModelServer], store_dir: Path, tmp_path: Path
) -> None:
    wrapper = tmp_path / "gated_two.py"
    wrapper.write_text(GATED_WRAPPER)
    (tmp_path / "g").mkdir()
    _add(store_dir, "g", tmp_path / "g")
    server = serve("g", wrapper=str(wrapper))
    pipe: Any = server.repository.get("g").versions[1].model.pipe
    entered, gate = pipe.test_hooks
    try:
        with ThreadPoolExecutor(2) as pool:
            body = {"k": np.ones(1, np.float32)}
            futures = [pool.submit(_post, server.url, body, "/models/g") for _ in range(2)]
            # both copies are inside a batch before either is let go
            assert entered[0].wait(30)
            assert entered[1].wait(30)
            gate.set()
            assert [f.result(30)[0] for f in futures] == [200, 200]
    finally:
        gate.set()
    instances = pipe.stats().stages["model"].instances
    assert [i.batches for i in instances] == [1, 1]
