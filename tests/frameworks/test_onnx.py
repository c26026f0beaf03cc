"""ONNX models served by ONNX Runtime, end to end through the real server and the CLI.

The models are built here, with no download: an MLP 8 -> 16 -> 3 exported from PyTorch with a
dynamic batch axis (built with ``onnx.helper`` where torch's exporter is not available), the
same MLP with its first dimension fixed to 1, and a two-input, two-output graph
(``y = 2a + b``, ``d = a - b``). Answers are compared with ONNX Runtime's own on the same input
(and the MLP's with numpy's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ModelLoadError
from studioserve.models.loader import load_model
from tests.frameworks.helpers import (
    add_experiment,
    assert_close,
    check_422,
    check_batches_shared,
    check_missing_extra,
    check_oip_answers,
    check_pickle_answers,
    cli_served,
    post,
    post_oip,
    serving,
)
from tests.helpers import raw_post

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True)
class Mlp:
    """The MLP's weights (``x @ w1 + b1``, relu, ``@ w2 + b2``) and its exported file."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    folder: Path
    exporter: str

    def numpy(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w1 + self.b1, 0)
        return np.asarray(h @ self.w2 + self.b2, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Models:
    mlp: Mlp
    fixed: Path  # the MLP with its first dimension fixed to 1
    pair: Path  # inputs a, b -> outputs y = 2a + b, d = a - b


def _save(model: Any, folder: Path) -> Path:
    folder.mkdir(parents=True)
    onnx.checker.check_model(model)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return folder


def _model(graph: Any) -> Any:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _mlp_graph(mlp: Mlp, batch: str | int) -> Any:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    weights = [
        numpy_helper.from_array(a, name)
        for name, a in (("w1", mlp.w1), ("b1", mlp.b1), ("w2", mlp.w2), ("b2", mlp.b2))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    return _model(helper.make_graph(nodes, "mlp", [x], [y], weights))


def _export_torch(folder: Path) -> tuple[list[np.ndarray], str] | None:
    """The MLP made in PyTorch and exported with a dynamic batch axis; None without torch or
    its TorchScript-based exporter (the dynamo one needs onnxscript)."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    folder.mkdir(parents=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.zeros(1, 8),),
                str(folder / "model.onnx"),
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                dynamo=False,
            )
    except Exception as e:  # no exporter here: build the graph directly
        logging.getLogger(__name__).info("torch.onnx.export failed (%s); using onnx.helper", e)
        (folder / "model.onnx").unlink(missing_ok=True)
        folder.rmdir()
        return None
    first, second = net[0], net[2]
    weights = [
        p.detach().numpy().astype(np.float32)
        for p in (first.weight.T, first.bias, second.weight.T, second.bias)
    ]
    return weights, "torch.onnx.export"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("onnx_models")
    exported = _export_torch(root / "mlp")
    if exported is None:
        rng = np.random.default_rng(0)
        weights = [rng.normal(size=s).astype(np.float32) for s in ((8, 16), (16,), (16, 3), (3,))]
        exporter = "onnx.helper"
    else:
        weights, exporter = exported
    mlp = Mlp(*weights, folder=root / "mlp", exporter=exporter)
    if exported is None:
        _save(_mlp_graph(mlp, "N"), mlp.folder)
    fixed = _save(_mlp_graph(mlp, 1), root / "fixed")

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    d = helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 4])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("Mul", ["a", "two"], ["a2"]),
        helper.make_node("Add", ["a2", "b"], ["y"]),
        helper.make_node("Sub", ["a", "b"], ["d"]),
    ]
    pair = _save(_model(helper.make_graph(nodes, "pair", [a, b], [y, d], [two])), root / "pair")
    return Models(mlp, fixed, pair)


def _ort(folder: Path) -> Any:
    """ONNX Runtime's own answer for the model in ``folder``: a function of the feeds."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=[CPU])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, feeds), strict=True))

    return run


def _x(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)


def _get(url: str, path: str) -> Any:
    status, _, body = raw_post(url, None, method="GET", path=path)
    assert status == 200, body
    return json.loads(body)


def test_mlp_answers_as_onnxruntime_over_pickle_and_oip(models: Models, store_dir: Path) -> None:
    mlp = models.mlp
    run = _ort(mlp.folder)
    x = _x()

    def predict(batch: np.ndarray) -> np.ndarray:
        return run({"x": batch})["y"]

    assert_close(predict(x), mlp.numpy(x), rtol=1e-5, atol=1e-5)  # the export is the MLP
    add_experiment(store_dir, "mlp", mlp.folder)
    with serving(store_dir, "mlp") as server:
        check_pickle_answers(server.url, x, predict)
        check_oip_answers(server.url, "mlp", {"x": x}, {"y": predict(x)})
        # an int64 array is cast to the graph's float32, one example of it unwrapped
        status, out = post(server.url, {"k": np.arange(8)})
        assert status == 200, out
        assert_close(out["k"], predict(np.arange(8, dtype=np.float32)[None])[0])


def test_oip_metadata_and_config_name_the_platform_and_a_batch_axis(
    models: Models, store_dir: Path
) -> None:
    add_experiment(store_dir, "mlp", models.mlp.folder)
    with serving(store_dir, "mlp", max_batch_size=32) as server:
        meta = _get(server.url, "/v2/models/mlp")
        config = _get(server.url, "/v2/models/mlp/config")
        kind = server.service.model.kind if server.service else None
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 32
    assert [t["dims"] for t in config["input"]] == [[8]]
    assert kind == "onnx"


def test_concurrent_clients_share_batches(models: Models, store_dir: Path) -> None:
    add_experiment(store_dir, "mlp", models.mlp.folder)
    with serving(store_dir, "mlp") as server:
        check_batches_shared(server, _x(16))


def test_wrong_shape_or_dtype_is_422_naming_the_input(models: Models, store_dir: Path) -> None:
    add_experiment(store_dir, "mlp", models.mlp.folder)
    add_experiment(store_dir, "pair", models.pair)
    with serving(store_dir, "mlp") as server:
        check_422(server.url, np.zeros(5, np.float32), "x")
        check_422(server.url, np.zeros((2, 7), np.float32), "x")
        check_422(server.url, np.ones(8, bool), "x")
    with serving(store_dir, "pair") as server:
        check_422(server.url, {"a": np.zeros(4, np.float32), "b": np.zeros(5, np.float32)}, "b")
        check_422(server.url, {"a": np.zeros(4, np.complex64), "b": np.zeros(4)}, "a")
        check_422(server.url, np.zeros(4, np.float32), "a, b")  # not a dict: names both


def test_two_inputs_take_a_dict_and_answer_both_outputs(models: Models, store_dir: Path) -> None:
    run = _ort(models.pair)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.integers(-5, 5, size=(6, 4))  # int64: cast to the graph's float32
    want = run({"a": a, "b": b.astype(np.float32)})
    assert_close(want["y"], 2 * a + b)
    add_experiment(store_dir, "pair", models.pair)
    with serving(store_dir, "pair") as server:
        status, out = post(server.url, {"one": {"a": a[0], "b": b[0]}, "many": {"a": a, "b": b}})
        assert status == 200, out
        assert_close(out["many"], want)
        assert_close(out["one"], {k: v[0] for k, v in want.items()})
        check_oip_answers(server.url, "pair", {"a": a, "b": b.astype(np.float32)}, want)
        meta = _get(server.url, "/v2/models/pair")
    assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [("a", [-1, 4]), ("b", [-1, 4])]
    assert [t["name"] for t in meta["outputs"]] == ["y", "d"]


def test_a_graph_fixed_to_one_row_runs_row_by_row(
    models: Models, store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _ort(models.fixed)
    x = _x(7)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([run({"x": row[None]})["y"] for row in batch])

    assert_close(predict(x), models.mlp.numpy(x), rtol=1e-5, atol=1e-5)
    add_experiment(store_dir, "fixed", models.fixed)
    with caplog.at_level(logging.INFO, logger="studioserve.models.onnx"):
        with serving(store_dir, "fixed") as server:
            check_pickle_answers(server.url, x, predict)
            check_oip_answers(server.url, "fixed", {"x": x}, {"y": predict(x)})
            meta = _get(server.url, "/v2/models/fixed")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert "each row runs in its own call" in caplog.text


def test_a_graph_without_a_batch_axis_runs_each_example_alone(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [8])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [8])
    two = numpy_helper.from_array(np.array(2, np.int64), "two")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two])
    folder = _save(_model(graph), tmp_path / "unbatched")
    model = load_model(folder)
    try:
        model.start()
        assert [s.shape for s in model.inputs] == [(8,)]
        rows = np.arange(24).reshape(3, 8)
        out = model.predict({"many": rows, "one": rows[1]}, timeout=30)
        assert_close(out["many"], rows * 2)
        assert_close(out["one"], rows[1] * 2)
    finally:
        model.close()


def test_serving_toml_renames_the_signature(models: Models, store_dir: Path) -> None:
    toml = (
        '[[input]]\nname = "features"\ndtype = "float32"\nshape = [8]\n'
        '[[output]]\nname = "scores"\ndtype = "float32"\nshape = [3]\n'
    )
    run = _ort(models.mlp.folder)
    x = _x(3)
    add_experiment(store_dir, "renamed", models.mlp.folder, serving=toml)
    with serving(store_dir, "renamed") as server:
        check_oip_answers(server.url, "renamed", {"features": x}, {"scores": run({"x": x})["y"]})
        assert post(server.url, {"k": x})[0] == 200


def test_a_signature_that_does_not_fit_the_graph_is_refused(models: Models) -> None:
    from studioserve.tensors import TensorSpec

    with pytest.raises(ModelLoadError, match=r"does not fit the graph's input x: float32\[8\]"):
        load_model(models.mlp.folder, inputs=[TensorSpec("x", (9,), "float32")])


def test_instances_each_get_a_session_on_the_cpu(
    models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="studioserve.models.onnx"):
        model = load_model(models.mlp.folder, instances=2)
    try:
        model.start()
        assert model.kind == "onnx"
        assert model.platform == "onnxruntime_onnx"
        assert model.devices == ("CPU", "CPU")
        x = _x(4)
        assert_close(model.predict({"k": x}, timeout=30)["k"], models.mlp.numpy(x), 1e-5, 1e-5)
    finally:
        model.close()
    assert caplog.text.count("ONNX Runtime session") == 2, caplog.text
    assert caplog.text.count(" of 2 on CPU") == 2, caplog.text


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA provider present")
def test_a_gpu_device_without_the_cuda_provider_is_refused(models: Models) -> None:
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        load_model(models.mlp.folder, devices=["cuda:0"])


def test_device_labels_choose_the_providers() -> None:
    from studioserve.models.onnx import default_devices, physical_cores, providers_for

    both = [CUDA, CPU]
    assert providers_for("CPU", both) == [CPU]
    assert providers_for("cuda:1", both) == [(CUDA, {"device_id": 1}), CPU]
    assert providers_for("GPU:0", both) == [(CUDA, {"device_id": 0}), CPU]
    with pytest.raises(ValueError, match="unknown device"):
        providers_for("tpu:0", both)
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        providers_for("cuda", [CPU])
    assert default_devices(3, both, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert default_devices(2, [CPU], 2) == ["CPU", "CPU"]
    assert default_devices(1, both, 0) == ["CPU"]
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_a_file_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken.onnx").write_bytes(b"not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelLoadError, match=r"cannot load ONNX model .*broken\.onnx"):
        load_model(folder)


def test_importing_the_runtime_imports_neither_onnx_package() -> None:
    code = (
        "import sys, studioserve, studioserve.models.onnx as m\n"
        "assert 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules\n"
        "import onnx\n"  # the real package, not studioserve.models.onnx
        "assert onnx.__name__ == 'onnx' and hasattr(onnx, 'helper'), onnx.__file__\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_onnxruntime_names_the_extra(
    models: Models, store_dir: Path, tmp_path: Path
) -> None:
    add_experiment(store_dir, "mlp", models.mlp.folder)
    check_missing_extra(tmp_path, store_dir, "mlp", "onnxruntime", "onnx")


def test_cli_adds_and_serves_an_onnx_model(models: Models, store_dir: Path) -> None:
    with cli_served(store_dir, "onnx-mlp", models.mlp.folder, "onnx") as url:
        x = _x(4)
        status, _, body = raw_post(url, pickle.dumps({"k": x}))
        assert status == 200, body
        got = pickle.loads(body)["k"]  # noqa: S301 - our own server's answer, in a test
        assert_close(got, models.mlp.numpy(x), rtol=1e-5, atol=1e-5)
        status, out = post_oip(url, "onnx-mlp", {"x": x})
        assert status == 200, out
        assert_close(out["outputs"]["y"], got, rtol=1e-5, atol=1e-6)
