"""PyTorch models (TorchScript, ``torch.export``, a trusted pickled module) end to end.

The models are built here, with no download: an MLP 8 -> 16 -> 3 saved as a scripted and a
traced TorchScript archive, as a ``torch.export`` program with a dynamic batch axis, as a
pickled module (``torch.save(model)``) and as a bare ``state_dict``; a two-input, two-output
scripted module (``(2a + b, a - b)``) whose signature comes from serving.toml. Answers are
compared with the module's own on the same input, through the real server (pickle and OIP)
and once through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from studioserve.tensors import TensorSpec
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

torch = pytest.importorskip("torch")

TRUST_HINT = "--trust-artifact"
WRAPPER_HINT = "create_model(modeldir)"
PAIR_TOML = (
    '[[input]]\nname = "a"\ndtype = "float32"\nshape = [4]\n'
    '[[input]]\nname = "b"\ndtype = "float32"\nshape = [4]\n'
)


class Mlp(torch.nn.Module):  # type: ignore[misc]
    """8 -> 16 relu -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class Pair(torch.nn.Module):  # type: ignore[misc]
    """Two inputs, two outputs, no parameters: its signature must come from serving.toml."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * a + b, a - b


@dataclasses.dataclass(frozen=True)
class Models:
    net: Any  # the MLP itself, in eval mode: what every answer is compared with
    scripted: Path
    traced: Path
    exported: Path
    pickled: Path  # torch.save of an nn.Sequential MLP (importable in any process)
    sequential: Any
    state_dict: Path
    pair: Path
    fixed: Path  # the MLP exported with a static batch of one row

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(self.net(torch.from_numpy(np.asarray(x, np.float32))).numpy())


def _folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("torch_models")
    torch.manual_seed(0)
    net = Mlp().eval()
    sequential = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).eval()
    example = (torch.zeros(2, 8),)
    with warnings.catch_warnings():  # recent torch deprecates TorchScript with a warning
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = _folder(root, "scripted") / "model.pt"
        torch.jit.save(torch.jit.script(net), str(scripted))
        traced = _folder(root, "traced") / "model.pt"
        torch.jit.save(torch.jit.trace(net, example), str(traced))
        pair = _folder(root, "pair") / "model.pt"
        torch.jit.save(torch.jit.script(Pair()), str(pair))
    batch = torch.export.Dim("batch")
    exported = _folder(root, "exported") / "model.pt2"
    program = torch.export.export(net, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(exported))
    fixed = _folder(root, "fixed") / "model.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 8),)), str(fixed))
    pickled = _folder(root, "pickled") / "model.pt"
    torch.save(sequential, str(pickled))
    state_dict = _folder(root, "state") / "weights.pt"
    torch.save(net.state_dict(), str(state_dict))
    return Models(
        net=net,
        scripted=scripted,
        traced=traced,
        exported=exported,
        pickled=pickled,
        sequential=sequential,
        state_dict=state_dict,
        pair=pair,
        fixed=fixed,
    )


def _x(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)


def _get(url: str, path: str) -> Any:
    status, _, body = raw_post(url, None, method="GET", path=path)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize(
    ("artifact", "platform"),
    [
        ("scripted", "pytorch_libtorch"),
        ("traced", "pytorch_libtorch"),
        ("exported", "pytorch_export"),
    ],
)
def test_mlp_answers_as_torch_over_pickle_and_oip(
    models: Models, store_dir: Path, artifact: str, platform: str
) -> None:
    folder = getattr(models, artifact).parent
    x = _x()
    add_experiment(store_dir, "mlp", folder)
    with serving(store_dir, "mlp", max_batch_size=32) as server:
        check_pickle_answers(server.url, x, models.predict)
        check_oip_answers(server.url, "mlp", {"x": x}, {"output_0": models.predict(x)})
        # an int64 array is cast to the model's float32, one example of it unwrapped
        status, out = post(server.url, {"k": np.arange(8)})
        assert status == 200, out
        assert_close(out["k"], models.predict(np.arange(8)[None])[0])
        meta = _get(server.url, "/v2/models/mlp")
        config = _get(server.url, "/v2/models/mlp/config")
        model = server.service.model if server.service else None
    assert meta["platform"] == platform
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}]
    assert config["platform"] == platform
    assert config["max_batch_size"] == 32
    assert model is not None
    assert model.kind == "torch"
    assert model.describe().endswith("on CPU"), model.describe()


def test_concurrent_clients_share_batches(models: Models, store_dir: Path) -> None:
    add_experiment(store_dir, "mlp", models.exported.parent)
    with serving(store_dir, "mlp") as server:
        check_batches_shared(server, _x(16))


def test_wrong_shape_or_dtype_is_422_naming_the_input(models: Models, store_dir: Path) -> None:
    add_experiment(store_dir, "mlp", models.scripted.parent)
    with serving(store_dir, "mlp") as server:
        check_422(server.url, np.zeros(5, np.float32), "x")
        check_422(server.url, np.zeros((2, 7), np.float32), "x")
        check_422(server.url, np.ones(8, bool), "x")


def test_a_pickled_module_is_refused_by_default_and_served_with_trust(
    models: Models, store_dir: Path
) -> None:
    add_experiment(store_dir, "pickled", models.pickled.parent)
    with pytest.raises(ModelLoadError, match=TRUST_HINT):
        with serving(store_dir, "pickled"):
            pass
    with torch.inference_mode():
        want = models.sequential(torch.from_numpy(_x())).numpy()
    with serving(store_dir, "pickled", trust_artifact=True) as server:
        status, out = post(server.url, {"k": _x()})
        assert status == 200, out
        assert_close(out["k"], want)
        meta = _get(server.url, "/v2/models/pickled")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["platform"] == "pytorch_libtorch"


@pytest.mark.parametrize("trust", [False, True])
def test_a_state_dict_is_refused_pointing_to_a_wrapper(
    models: Models, store_dir: Path, trust: bool
) -> None:
    add_experiment(store_dir, "weights", models.state_dict.parent)
    with pytest.raises(ModelLoadError, match="state_dict") as caught:
        with serving(store_dir, "weights", trust_artifact=trust):
            pass
    assert WRAPPER_HINT in str(caught.value)
    assert "torch.jit.save" in str(caught.value)


def test_a_wrapper_serves_a_state_dict_through_serve_module(
    models: Models, store_dir: Path, tmp_path: Path
) -> None:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import torch\n"
        "from studioserve.models.torch import serve_module\n"
        "from tests.frameworks.test_torch import Mlp\n\n"
        "def create_model(modeldir):\n"
        "    net = Mlp()\n"
        "    net.load_state_dict(torch.load(f'{modeldir}/weights.pt', weights_only=True))\n"
        "    return serve_module(net, source=modeldir)\n"
    )
    add_experiment(store_dir, "weights", models.state_dict.parent)
    with serving(store_dir, "weights", wrapper=str(wrapper)) as server:
        check_pickle_answers(server.url, _x(), models.predict)
        check_oip_answers(server.url, "weights", {"x": _x(3)}, {"output_0": models.predict(_x(3))})


def test_a_signature_it_cannot_tell_asks_for_serving_toml(models: Models, store_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"\[\[input\]\]"):
        load_model(models.pair.parent)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.integers(-5, 5, size=(6, 4))  # int64: cast to the declared float32
    want = {"output_0": 2 * a + b, "output_1": a - b}
    add_experiment(store_dir, "pair", models.pair.parent, serving=PAIR_TOML)
    with serving(store_dir, "pair") as server:
        status, out = post(server.url, {"one": {"a": a[0], "b": b[0]}, "many": {"a": a, "b": b}})
        assert status == 200, out
        assert_close(out["many"], want)
        assert_close(out["one"], {k: v[0] for k, v in want.items()})
        check_oip_answers(server.url, "pair", {"a": a, "b": b.astype(np.float32)}, want)
        check_422(server.url, {"a": a[0], "b": np.zeros(5, np.float32)}, "b")


def test_serving_toml_renames_the_outputs(models: Models) -> None:
    outputs = [TensorSpec("sum", (4,), "float32"), TensorSpec("diff", (4,), "float32")]
    inputs = [TensorSpec("a", (4,), "float32"), TensorSpec("b", (4,), "float32")]
    model = load_model(models.pair.parent, inputs=inputs, outputs=outputs)
    try:
        model.start()
        a, b = np.ones((2, 4), np.float32), np.full((2, 4), 3, np.float32)
        got = model.predict({"k": {"a": a, "b": b}}, timeout=30)["k"]
        assert_close(got, {"sum": 2 * a + b, "diff": a - b})
    finally:
        model.close()
    with pytest.raises(ModelLoadError, match="declares 1 output"):
        load_model(models.pair.parent, inputs=inputs, outputs=outputs[:1])


def test_an_export_with_a_static_batch_runs_row_by_row(
    models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="studioserve.models.torch"):
        model = load_model(models.fixed.parent)
    try:
        model.start()
        x = _x(3)
        assert_close(model.predict({"k": x}, timeout=30)["k"], models.predict(x))
    finally:
        model.close()
    assert "each row runs in its own call" in caplog.text


def test_instances_each_get_a_copy_on_the_cpu(
    models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="studioserve.models.torch"):
        model = load_model(models.exported.parent, instances=2)
    try:
        model.start()
        assert model.devices == ("CPU", "CPU")
        assert model.platform == "pytorch_export"
        modules = getattr(model, "torch_modules", ())
        assert len(modules) == 2
        assert modules[0] is not modules[1]
        x = _x(4)
        assert_close(model.predict({"k": x}, timeout=30)["k"], models.predict(x))
        assert "x 2 instances on CPU" in model.describe()
    finally:
        model.close()
    assert "on CPU" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_a_gpu_device_without_cuda_is_refused(models: Models) -> None:
    with pytest.raises(ModelLoadError, match="0 CUDA GPU"):
        load_model(models.scripted.parent, devices=["GPU:0"])
    with pytest.raises(ModelLoadError, match="not a device label"):
        load_model(models.scripted.parent, devices=["tpu:0"])


def test_importing_the_runtime_does_not_import_torch() -> None:
    # (that its own ``import torch`` gets the real package, every load here shows)
    code = (
        "import sys, studioserve, studioserve.models.torch, studioserve.models.loader\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_torch_names_the_extra(models: Models, store_dir: Path, tmp_path: Path) -> None:
    add_experiment(store_dir, "mlp", models.scripted.parent)
    check_missing_extra(tmp_path, store_dir, "mlp", "torch", "torch")


def test_cli_adds_and_serves_a_traced_model(models: Models, store_dir: Path) -> None:
    with cli_served(store_dir, "torch-mlp", models.traced.parent, "torchscript") as url:
        x = _x(4)
        status, _, body = raw_post(url, pickle.dumps({"k": x}))
        assert status == 200, body
        got = pickle.loads(body)["k"]  # noqa: S301 - our own server's answer, in a test
        assert_close(got, models.predict(x))
        status, out = post_oip(url, "torch-mlp", {"x": x})
        assert status == 200, out
        assert_close(out["outputs"]["output_0"], got)
