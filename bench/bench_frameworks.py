"""Frameworks: each framework's served items/s beside its own offline best, in one run.

What it does (about 15 minutes with the defaults on a 2-core machine; ``--duration 3`` is a
smoke run of half a minute to a minute per framework, most of it building and loading models;
Spark's JVM starts three times, once per process, and takes longest):

1. checks that importing studioserve imports no framework: ``python -c "import studioserve,
   studioserve.cli, studioserve.runtime, studioserve.models; ..."`` in a subprocess lists which
   of torch, onnxruntime, sklearn, xgboost, lightgbm, pyspark, cloudpickle and tensorflow are
   in ``sys.modules`` afterwards (the list should be empty);
2. per framework of ``--frameworks`` (keras, torch, onnx, closure, sklearn, xgboost, lightgbm,
   spark), one after the other:

   - **build**, in a worker process that imports only that framework: the MLP of
     bench_server.py (512 -> 2048 relu -> 2048 relu -> 10 softmax, float32; one set of weights
     drawn from one seed, the same for every framework) as a Keras ``mlp.keras``, a TorchScript
     ``mlp.pt`` (``torch.jit.script`` of an ``nn.Sequential``), an ``mlp.onnx`` (built with
     ``onnx.helper``: MatMul/Add/Relu, then Softmax; batch axis symbolic) and a Clipper-style
     closure ``mlp.cloudpickle`` (the same numpy matmuls in a cloudpickled function; served with
     ``--trust-artifact`` and a serving.toml ``[[input]] name = "x", dtype = "float32", shape =
     [512]``, so it gets the stacked batch); on 64 float features (2,000 synthetic rows, two
     classes): a 100-tree ``RandomForestClassifier`` (``max_depth=8``) saved with skops
     (``forest.skops``; served with ``--trust-artifact``: skops does not trust a tree's
     ``Tree`` type), a 100-tree ``XGBClassifier`` (``booster.ubj``), a 100-tree
     ``LGBMClassifier`` (its text model, ``booster.txt``) and a PySpark ``PipelineModel``
     (``VectorAssembler`` over the 64 columns, then ``LogisticRegression``; the folder
     ``spark_model/``). Each is saved as the detection table (studioserve/models/artifacts.py)
     expects, with the framework's own outputs for 64 fixed inputs (the expected answers), and
     added to a temporary local store with ``studio experiments add`` (as a user would);
   - **offline**, in another worker process: the framework's own batched predict call on the
     same inputs (tiled to the batch size) at batch sizes 1, 8, 64 and 256, ``--offline-seconds``
     (1) each after three uncounted calls, items/s at each and the best ("offline best"), and
     the latency of one batch-1 call (p50, p99). The calls: Keras ``predict_on_batch``;
     TorchScript ``module(x)`` under ``torch.inference_mode()``; ONNX Runtime ``session.run``
     (default session options, CPU); the closure itself; scikit-learn ``predict_proba`` (what
     the label is the argmax of); XGBoost ``Booster.inplace_predict``; LightGBM
     ``Booster.predict``; Spark ``createDataFrame`` (explicit schema) + ``transform`` +
     ``collect`` in a local session. Inputs are the dtype the server's signature takes (float32;
     float64 for scikit-learn, LightGBM and Spark);
   - **served**: ``studio serve KEY --store STORE --port 0 --killafter 0 --quiet`` (plus the
     flags the framework needs, ``--http-server`` and any ``--serve-arg``), waited for at
     ``/readyz``, checked with one request holding the 64 inputs as 64 keys (every answer
     against the framework's own output, rtol 1e-4, atol 1e-5), then driven at each level of
     ``--connections`` (1, 8, 64) for ``--warmup`` (2) uncounted and ``--duration`` (20)
     counted seconds: closed-loop keep-alive connections, each request ``POST /`` with one
     example (``{"x": row}`` as a pickle, a row of the 64 at random), every 200 answer checked
     (bench_repository's ``Judge``: an answer body already checked is not decoded again). At
     each level the server's ``/metrics`` give the rows per model call, the time per call and
     the model stage's busy time, ``/proc`` its CPU use (child processes included: Spark's JVM)
     and its CPU time per thread, grouped as bench_repository's replicas section groups them
     (each model-stage worker apart; granian's ``tokio-rt-worker`` threads: HTTP and the WSGI
     app; the native threads that the framework started while the model loaded: its compute
     pool). The server is started through bench_repository's ``--named-threads`` launcher so
     that its Python threads have names; nothing else about it changes. After the top level
     the frameworks' native libraries mapped into the server (``/proc/PID/maps``) are listed:
     only the framework served should be there. The server is then stopped (SIGTERM: its
     drain; SIGKILL after 30 s).

   A framework whose runtime is missing, or whose build, offline run or server fails, gets its
   row with the reason, and the others still run.
3. prints the offline sweeps, one table of every served point, the server's CPU by thread
   group at the top level, one summary row per framework and the targets with PASS/FAIL;
   ``--json FILE`` writes every figure.

The summary's columns: ``offline best`` (items/s) and ``@batch`` (the batch size of the best),
``b1 ms`` (the batch-1 call's p50), ``c1``, ``c8``, ``c64`` (served items/s at 1, 8, 64
connections: 200 answers per counted second, one item per request), ``x offline`` (served
items/s at the top level over the offline best), ``rows/call`` and ``stage busy`` at the top
level (seconds of model calls per second: 1.00 = the model stage never idle), ``srv cores``
(the server's CPU use at the top level, 1.00 = one core busy), ``errors`` (all levels: any
status but 200, any connection error), ``wrong`` (200 answers that are not the framework's
output) and ``native libs`` (the frameworks' libraries the server mapped).

The targets (issue 13), each ratio taken within one run of this script:

===============================================================  ========
per framework: served items/s at 64 connections (one item per    >= 0.70
request) / the framework's own offline best
frameworks imported by ``import studioserve, studioserve.cli,    0
studioserve.runtime, studioserve.models``
===============================================================  ========

Reading a ratio below the target: ``stage busy`` near 1.00 with ``rows/call`` well below the
offline best's batch size means the model is the bound and batches stay small (few requests
in flight per call); ``stage busy`` low with the ``tokio-rt-worker`` and Python threads taking
the cores means the per-request HTTP path is the bound (a tree model predicts tens of
thousands of rows per second, far more than one server answers requests); ``srv cores`` near
2.00 means the server had the machine (the load generator, this process, shares it).

The load generator is benchlib's asyncio HTTP/1.1 client (``AsyncHttpConnection``, through
bench_repository's ``LoadRun``) in this process: it takes part of the same two cores the
server has, while the offline sweep has the machine to itself; that is part of the ratio.

Usage::

    .venv/bin/python bench/bench_frameworks.py                         # ~15 minutes
    .venv/bin/python bench/bench_frameworks.py --json frameworks.json
    .venv/bin/python bench/bench_frameworks.py --frameworks onnx,sklearn --duration 3  # smoke
    .venv/bin/python bench/bench_frameworks.py --frameworks torch --serve-arg=--max-delay-ms=1

The exit status is 0 when every target passes, 1 otherwise (130 when interrupted). Ctrl-C or
SIGTERM stops the benchmark, its worker and the server it runs.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_repository import (  # noqa: E402
    ATOL,
    METRICS,
    RTOL,
    RUN_HEADERS,
    WARN_RE,
    Judge,
    LoadRun,
    model_stage_stats,
    run_figures,
    run_row,
    status_json,
    stop_server,
    targets_table,
    thread_cores,
)
from bench_server import MLP_HIDDEN, MLP_IN, MLP_OUT  # noqa: E402
from benchlib import (  # noqa: E402
    PICKLE,
    HttpResult,
    ServerProcess,
    Target,
    add_experiment,
    add_run_options,
    add_server_options,
    cpu_seconds,
    fmt_num,
    http_post,
    load_str,
    mapped_files,
    passed,
    python_env,
    ratio,
    scrape_labelled,
    studio_command,
    table,
    thread_cpu_seconds,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
N_INPUTS = 64
FEATURES = 64  # the tree and Spark models' columns
TRAIN_ROWS = 2000
TREES = 100
FOREST_DEPTH = 8
MLP_SEED = 512
DATA_SEED = 64
OFFLINE_BATCH_SIZES = (1, 8, 64, 256)
B1_CALLS = 300  # batch-1 latency calls (fewer when they take longer than 3 x --offline-seconds)
TARGET_RATIO = 0.70
#: the modules the import check looks for
FRAMEWORK_MODULES = (
    "torch",
    "onnxruntime",
    "sklearn",
    "xgboost",
    "lightgbm",
    "pyspark",
    "cloudpickle",
    "tensorflow",
)
IMPORT_CHECK = (
    "import studioserve, studioserve.cli, studioserve.runtime, studioserve.models; import sys; "
    f"print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))"
)
#: native libraries that show a framework is loaded in a process (/proc/PID/maps)
NATIVE_LIBS = {
    "tensorflow": ("libtensorflow_framework", "_pywrap_tensorflow"),
    "torch": ("libtorch_cpu", "libc10."),
    "onnxruntime": ("onnxruntime_pybind11_state",),
    "sklearn": ("/sklearn/",),
    "xgboost": ("libxgboost",),
    "lightgbm": ("lib_lightgbm",),
}
TF_POOL = "unnamed native, started before studioserve-http (TF's Eigen pool: matmuls)"
LATE_NATIVE = "unnamed native, started after studioserve-http"


@dataclass(frozen=True)
class Framework:
    """One framework's workload.

    :param name: ``--frameworks`` and the experiment's key.
    :param table: its row of the detection table (``studio experiments add --framework``).
    :param artifact: the file or folder saved in the modeldir.
    :param kind: ``mlp`` (512 float32 in, 10 softmax out) or ``tabular`` (64 features).
    :param dtype: what the server's signature takes (the offline inputs' dtype).
    :param flags: what ``studio serve`` needs for it.
    :param pool: what the native threads it starts while loading are.
    """

    name: str
    table: str
    artifact: str
    kind: str
    dtype: str
    flags: tuple[str, ...] = ()
    pool: str = "the framework's threads"


FRAMEWORKS: dict[str, Framework] = {
    f.name: f
    for f in (
        Framework("keras", "keras", "mlp.keras", "mlp", "float32", pool="TF's Eigen pool"),
        Framework("torch", "torchscript", "mlp.pt", "mlp", "float32", pool="torch's OpenMP pool"),
        Framework("onnx", "onnx", "mlp.onnx", "mlp", "float32", pool="ORT's intra-op pool"),
        Framework(
            "closure",
            "closure",
            "mlp.cloudpickle",
            "mlp",
            "float32",
            ("--trust-artifact",),
            pool="numpy's BLAS pool",
        ),
        Framework(
            "sklearn",
            "sklearn",
            "forest.skops",
            "tabular",
            "float64",
            ("--trust-artifact",),
            pool="BLAS/OpenMP",
        ),
        Framework(
            "xgboost", "xgboost", "booster.ubj", "tabular", "float32", pool="XGBoost's OpenMP"
        ),
        Framework(
            "lightgbm", "lightgbm", "booster.txt", "tabular", "float64", pool="LightGBM's OpenMP"
        ),
        Framework("spark", "spark", "spark_model", "tabular", "float64", pool="Py4J, Arrow"),
    )
}
CLOSURE_SIGNATURE = f'[[input]]\nname = "x"\ndtype = "float32"\nshape = [{MLP_IN}]\n'
OIP_DTYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT64": "int64"}


# -- worker processes: building and the offline sweep (each imports one framework) -------------


def mlp_weights() -> list[tuple[np.ndarray, np.ndarray]]:
    """The MLP's (kernel, bias) per layer, kernels (in, out), from one seed."""
    rng = np.random.default_rng(MLP_SEED)
    sizes = (MLP_IN, MLP_HIDDEN, MLP_HIDDEN, MLP_OUT)
    return [
        (
            (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
            (0.01 * rng.standard_normal(b)).astype(np.float32),
        )
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def tabular_training() -> tuple[np.ndarray, np.ndarray]:
    """2,000 rows of 64 float32 features, two classes from a noisy linear rule."""
    rng = np.random.default_rng(DATA_SEED)
    x = rng.standard_normal((TRAIN_ROWS, FEATURES)).astype(np.float32)
    coef = rng.standard_normal(FEATURES) * (rng.random(FEATURES) < 0.3)
    y = (x @ coef + 0.5 * rng.standard_normal(TRAIN_ROWS) > 0).astype(np.int64)
    return x, y


def make_closure(weights: Sequence[tuple[np.ndarray, np.ndarray]]) -> Callable[[Any], np.ndarray]:
    """Clipper's contract with a signature: the stacked batch in, one output row per row out.

    Defined inside a function, so cloudpickle saves the function itself (not a reference to
    this file) with the weights it closes over."""
    layers = [(np.array(w), np.array(b)) for w, b in weights]

    def predict(x: Any) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                np.maximum(h, 0.0, out=h)
        h = h - h.max(axis=1, keepdims=True)
        np.exp(h, out=h)
        h /= h.sum(axis=1, keepdims=True)
        return h

    return predict


def local_spark() -> Any:
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[*]")
        .appName("bench_frameworks")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.memory", "512m")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def spark_schema(columns: int) -> Any:
    from pyspark.sql.types import DoubleType, StructField, StructType

    return StructType([StructField(f"f{i}", DoubleType(), False) for i in range(columns)])


def spark_predict(spark: Any, model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Spark's own transform of the rows of ``x`` (one partition: the rows keep their order)."""
    frame = spark.createDataFrame(x.tolist(), spark_schema(x.shape[1]), verifySchema=False)
    got = model.transform(frame.coalesce(1)).select("prediction", "probability").collect()
    return {
        "prediction": np.array([r[0] for r in got], np.float64),
        "probability": np.array([r[1].toArray() for r in got], np.float64),
    }


def build(fw: Framework, modeldir: Path, x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """Save ``fw``'s model in ``modeldir``; return its own outputs for the rows of ``x``."""
    modeldir.mkdir(parents=True, exist_ok=True)
    path = modeldir / fw.artifact
    if fw.kind == "mlp":
        weights = mlp_weights()
        x = x.astype(np.float32)
        if fw.name == "keras":
            import bench_server

            keras = bench_server._keras()
            model = keras.Sequential(
                [
                    keras.Input((MLP_IN,), dtype="float32"),
                    keras.layers.Dense(MLP_HIDDEN, activation="relu"),
                    keras.layers.Dense(MLP_HIDDEN, activation="relu"),
                    keras.layers.Dense(MLP_OUT, activation="softmax"),
                ]
            )
            model.set_weights([a for layer in weights for a in layer])
            model.save(path)
            return np.asarray(model.predict_on_batch(x))
        if fw.name == "torch":
            import torch

            linears = []
            for w, b in weights:
                lin = torch.nn.Linear(*w.shape)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w.T.copy()))
                    lin.bias.copy_(torch.from_numpy(b))
                linears.append(lin)
            seq = torch.nn.Sequential(
                linears[0],
                torch.nn.ReLU(),
                linears[1],
                torch.nn.ReLU(),
                linears[2],
                torch.nn.Softmax(dim=-1),
            ).eval()
            scripted = torch.jit.script(seq)
            torch.jit.save(scripted, str(path))
            with torch.inference_mode():
                return np.asarray(scripted(torch.from_numpy(x)).numpy())
        if fw.name == "onnx":
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper, numpy_helper

            nodes, inits = [], []
            prev = "x"
            for i, (w, b) in enumerate(weights):
                inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
                nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
                last = i == len(weights) - 1
                nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"]))
                if last:
                    nodes.append(helper.make_node("Softmax", [f"z{i}"], ["y"], axis=-1))
                else:
                    nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"]))
                    prev = f"h{i}"
            graph = helper.make_graph(
                nodes,
                "mlp",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_IN])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", MLP_OUT])],
                inits,
            )
            model = helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench"
            )
            model.ir_version = 8
            onnx.checker.check_model(model)
            onnx.save(model, str(path))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return np.asarray(session.run(None, {"x": x})[0])
        if fw.name == "closure":
            import cloudpickle

            func = make_closure(weights)
            path.write_bytes(cloudpickle.dumps(func))
            return func(x)
    xt, yt = tabular_training()
    if fw.name == "sklearn":
        import skops.io as sio
        from sklearn.ensemble import RandomForestClassifier

        forest = RandomForestClassifier(
            n_estimators=TREES, max_depth=FOREST_DEPTH, random_state=0
        ).fit(xt.astype(np.float64), yt)
        sio.dump(forest, path)
        x64 = x.astype(np.float64)
        return {"label": forest.predict(x64), "probabilities": forest.predict_proba(x64)}
    if fw.name == "xgboost":
        from xgboost import XGBClassifier

        clf = XGBClassifier(n_estimators=TREES, random_state=0, tree_method="hist").fit(xt, yt)
        clf.save_model(path)
        proba = np.asarray(clf.predict_proba(x.astype(np.float32)))
        return {"label": proba.argmax(axis=1).astype(np.int64), "probabilities": proba}
    if fw.name == "lightgbm":
        from lightgbm import LGBMClassifier

        clf = LGBMClassifier(n_estimators=TREES, random_state=0, verbose=-1).fit(xt, yt)
        clf.booster_.save_model(str(path))
        proba = np.asarray(clf.predict_proba(x.astype(np.float64)))
        return {"label": proba.argmax(axis=1).astype(np.int64), "probabilities": proba}
    if fw.name == "spark":
        from pyspark.ml import Pipeline
        from pyspark.ml.classification import LogisticRegression
        from pyspark.ml.feature import VectorAssembler
        from pyspark.sql.types import DoubleType, StructField

        spark = local_spark()
        try:
            columns = [f"f{i}" for i in range(FEATURES)]
            schema = spark_schema(FEATURES).add(StructField("label", DoubleType(), False))
            rows = [[*map(float, r), float(c)] for r, c in zip(xt, yt, strict=True)]
            frame = spark.createDataFrame(rows, schema)
            stages = [
                VectorAssembler(inputCols=columns, outputCol="features"),
                LogisticRegression(maxIter=20),
            ]
            fitted = Pipeline(stages=stages).fit(frame)
            fitted.write().overwrite().save(str(path))
            return spark_predict(spark, fitted, x.astype(np.float64))
        finally:
            spark.stop()
    raise ValueError(f"no builder for {fw.name}")


def offline_call(
    fw: Framework, path: Path
) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """The framework's own batched predict call on the saved model, and how to let it go."""
    if fw.name == "keras":
        import bench_server

        keras = bench_server._keras()
        model = keras.models.load_model(path, compile=False)
        return model.predict_on_batch, lambda: None
    if fw.name == "torch":
        import torch

        module = torch.jit.load(str(path)).eval()

        def call(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return call, lambda: None
    if fw.name == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x}), lambda: None
    if fw.name == "closure":
        import cloudpickle

        with path.open("rb") as f:
            func = cloudpickle.load(f)
        return func, lambda: None
    if fw.name == "sklearn":
        import skops.io as sio

        forest = sio.load(path, trusted=sio.get_untrusted_types(file=path))
        return forest.predict_proba, lambda: None
    if fw.name == "xgboost":
        import xgboost

        booster = xgboost.Booster(model_file=str(path))
        return booster.inplace_predict, lambda: None
    if fw.name == "lightgbm":
        import lightgbm

        booster = lightgbm.Booster(model_file=str(path))
        return booster.predict, lambda: None
    if fw.name == "spark":
        from pyspark.ml import PipelineModel

        spark = local_spark()
        model = PipelineModel.load(str(path))
        return lambda x: spark_predict(spark, model, x), spark.stop
    raise ValueError(f"no offline call for {fw.name}")


def offline(fw: Framework, path: Path, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """Items/s of the framework's batched call at each batch size, and the batch-1 latency."""
    call, close = offline_call(fw, path)
    try:
        x = x.astype(fw.dtype)
        per_size: dict[int, float] = {}
        for bs in OFFLINE_BATCH_SIZES:
            batch = np.ascontiguousarray(np.resize(x, (bs, *x.shape[1:])))
            for _ in range(3):
                call(batch)
            calls = 0
            start = time.perf_counter()
            while True:
                call(batch)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds and calls >= 5:
                    break
            per_size[bs] = calls * bs / elapsed
        x1 = np.ascontiguousarray(x[:1])
        times: list[float] = []
        deadline = time.perf_counter() + 3 * seconds
        while len(times) < B1_CALLS and (len(times) < 20 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            call(x1)
            times.append(time.perf_counter() - t0)
        times.sort()
    finally:
        close()
    best = max(per_size, key=lambda b: per_size[b])
    return {
        "items_per_s": per_size,
        "best_items_per_s": per_size[best],
        "best_batch_size": best,
        "b1_p50_ms": times[len(times) // 2] * 1e3,
        "b1_p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3,
        "b1_calls": len(times),
    }


def save_expected(path: Path, out: np.ndarray | dict[str, np.ndarray]) -> None:
    if isinstance(out, dict):
        np.savez(path, **{f"out:{k}": np.asarray(v) for k, v in out.items()})
    else:
        np.savez(path, array=np.asarray(out))


def load_expected(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    with np.load(path) as data:
        if "array" in data.files:
            return np.asarray(data["array"])
        return {k[len("out:") :]: np.asarray(data[k]) for k in data.files}


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_frameworks.py --worker")
    parser.add_argument("what", choices=["build", "offline"])
    parser.add_argument("framework", choices=sorted(FRAMEWORKS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    fw = FRAMEWORKS[args.framework]
    with np.load(args.inputs) as data:
        x = np.asarray(data[fw.kind])
    if args.what == "build":
        save_expected(args.out / "expected.npz", build(fw, args.out / "model", x))
        if fw.name == "closure":
            (args.out / "serving.toml").write_text(CLOSURE_SIGNATURE)
    else:
        result = offline(fw, args.out / "model" / fw.artifact, x, args.seconds)
        print("OFFLINE " + json.dumps(result), flush=True)
    return 0


def run_worker(args: Sequence[str], timeout: float) -> str:
    """This file with ``--worker ARGS`` in its own session; killed (its group: Spark's JVM
    too) on a timeout or an interruption. Returns its stdout; raises with its output when it
    fails."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, **python_env()),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"worker {' '.join(args[:2])} ran past {timeout:g} s") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args[:2])} failed: {last_lines(err or out)}")
    return out


def last_lines(text: str, n: int = 3) -> str:
    """The last ``n`` non-empty lines of ``text``, joined with " | " (for a table's note)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


# -- checking answers ----------------------------------------------------------------------------


def close_to(got: Any, want: Any) -> bool:
    a, b = np.asarray(got), np.asarray(want)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
        return bool(np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=RTOL, atol=ATOL))
    return bool(np.array_equal(a, b))


def answer_matches(got: Any, want: np.ndarray | dict[str, np.ndarray], index: int) -> bool:
    """A key's answer is the framework's output for input ``index`` (an array, or a dict of
    them by output name)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(
            k in got and close_to(got[k], v[index]) for k, v in want.items()
        )
    return close_to(got, want[index])


class AnswerJudge(Judge):
    """bench_repository's Judge (each answer body checked once) for arrays and dicts."""

    def classify(self, route: int, index: int, res: HttpResult) -> str:
        self.decoded += 1
        try:
            got = self.decode(res.body, res.headers.get("content-type"))["x"]
        except Exception:  # noqa: BLE001 - any undecodable 200 is a wrong answer
            return "wrong"
        want = self.candidates[route]["ok"]
        return "ok" if answer_matches(got, want, index) else "wrong"


def check_answers(url: str, inputs: np.ndarray, want: Any) -> str:
    """One request holding every input as its own key; "" when all answer right, else why."""
    from studioserve import wire

    body = pickle.dumps({f"k{i}": row for i, row in enumerate(inputs)}, 5)
    got = wire.decode_response(http_post(url + "/", body), PICKLE)
    bad = [i for i in range(len(inputs)) if not answer_matches(got.get(f"k{i}"), want, i)]
    if not bad:
        return ""
    i = bad[0]
    shown = want[i] if not isinstance(want, dict) else {k: v[i] for k, v in want.items()}
    return (
        f"{len(bad)} of {len(inputs)} answers differ from the framework's own: k{i} answered "
        f"{str(got.get(f'k{i}'))[:160]}, want {str(shown)[:160]}"
    )


# -- one framework -------------------------------------------------------------------------------


@dataclass
class Env:
    args: argparse.Namespace
    studio: list[str]
    store: Path
    tmp: Path
    inputs: Path
    log: Any
    exit_codes: list[str] = field(default_factory=list)
    server_warnings: list[str] = field(default_factory=list)


def served_dtype(url: str, key: str, default: str) -> str:
    """The dtype of the model's (first) input, from its OIP metadata."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/v2/models/{key}", timeout=10) as resp:
            meta = json.loads(resp.read())
        return OIP_DTYPES.get(str(meta["inputs"][0]["datatype"]), default)
    except (OSError, ValueError, KeyError, IndexError):
        return default


def native_libs(pid: int) -> list[str]:
    """The frameworks whose native libraries process ``pid`` has mapped."""
    files = mapped_files(pid)
    return sorted(
        name
        for name, marks in NATIVE_LIBS.items()
        if any(mark in f for f in files for mark in marks)
    )


@contextlib.contextmanager
def serving(env: Env, fw: Framework, mapfile: Path) -> Iterator[ServerProcess]:
    """``studio serve`` for ``fw``'s experiment (through the named-threads launcher unless
    ``--studio-cmd`` is given); stopped, and its warnings kept, at the end."""
    args = env.args
    studio = env.studio
    if not args.studio_cmd:
        studio = [sys.executable, str(HERE / "bench_repository.py"), "--named-threads"]
        studio.append(str(mapfile))
    cmd = [
        *studio,
        "serve",
        fw.name,
        "--store",
        str(env.store),
        "--port",
        "0",
        "--killafter",
        "0",
        "--http-server",
        args.http_server,
        "--quiet",
        *fw.flags,
        *args.serve_arg,
    ]
    print(f"# {fw.name}: starting {' '.join(cmd)} ({load_str()})", file=env.log, flush=True)
    srv = ServerProcess(
        cmd,
        f"studio-{fw.name}",
        url_pattern=r" at (http://\S+)",
        env=python_env(),
        cwd=REPO,
        start_timeout=args.start_timeout,
    )
    try:
        srv.start()
        yield srv
    finally:
        code = stop_server(srv)
        if srv.proc is not None:
            env.exit_codes.append(f"{fw.name}: {code}")
            warnings = [line for line in srv.lines if WARN_RE.search(line)]
            env.server_warnings += [f"{fw.name}: {line}" for line in warnings[:20]]
            if len(warnings) > 20:
                env.server_warnings.append(f"{fw.name}: ... {len(warnings) - 20} more")


def cpu_groups(
    run: LoadRun, fw: Framework, pid: int, mapfile: Path, stage: str
) -> dict[str, tuple[float, int]]:
    """bench_repository's thread groups (CPU seconds per second, threads), the native threads
    started while loading named for ``fw``, and the rest of the server's CPU time apart: its
    child processes' (Spark's JVM) and that of threads that ended within the counted time."""
    groups = thread_cores(run, pid, mapfile, stage)
    if TF_POOL in groups:
        groups[f"native, started while the model loaded ({fw.pool})"] = groups.pop(TF_POOL)
    if LATE_NATIVE in groups:  # a pool started at the first large batch (torch's OpenMP)
        groups[f"native, started after the server listened ({fw.pool}?)"] = groups.pop(LATE_NATIVE)
    wall = run.at_end["t"] - run.at_start["t"]
    total = (run.at_end["cpu"] - run.at_start["cpu"]) / wall if wall > 0 else float("nan")
    children = total - sum(v[0] for v in groups.values())
    if children >= 0.01:
        groups["outside the live threads (child processes: Spark's JVM; ended threads)"] = (
            children,
            0,
        )
    return groups


def measure_served(env: Env, fw: Framework, expected: Any, result: dict[str, Any]) -> None:
    """Serve ``fw``'s experiment and drive it at each level; fills ``result``."""
    args = env.args
    mapfile = env.tmp / f"threads-{fw.name}.tsv"
    with np.load(env.inputs) as data:
        inputs = np.asarray(data[fw.kind])
    with serving(env, fw, mapfile) as srv:
        assert srv.url is not None
        dtype = served_dtype(srv.url, fw.name, fw.dtype)
        result["served_dtype"] = dtype
        rows = inputs.astype(dtype)
        wrong = check_answers(srv.url, rows, expected)
        if wrong:
            result["notes"].append(wrong)
            print(f"  {fw.name}: {wrong}", file=env.log, flush=True)
        doc = status_json(srv.url)
        stage = str(model_stage_stats(doc).get("stage", ""))
        result["model"] = (doc.get("models") or [{}])[0].get("versions", [{}])[-1]
        bodies = [pickle.dumps({"x": rows[j]}, 5) for j in range(len(rows))]
        pid = srv.pid
        url = srv.url

        def probe() -> dict[str, Any]:
            return {
                "cpu": cpu_seconds(pid),
                "t": time.monotonic(),
                "metrics": scrape_labelled(f"{url}/metrics", METRICS),
                "threads": thread_cpu_seconds(pid),
            }

        for conns in args.connections:
            judge = AnswerJudge([{"ok": expected}])
            run = LoadRun(url, ["/"], bodies, judge, conns, args.client_timeout)
            print(
                f"  {fw.name}: {conns} connections, {args.warmup:g} s warm-up, "
                f"{args.duration:g} s counted ({load_str()})",
                file=env.log,
                flush=True,
            )
            asyncio.run(run.run(args.warmup, args.duration, probe=probe))
            if srv.proc is not None and srv.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {srv.proc.returncode} during the run: "
                    f"{last_lines(srv.output())}"
                )
            f = run_figures(run)
            f["threads"] = cpu_groups(run, fw, pid, mapfile, stage)
            result["levels"][conns] = f
            print(f"  {'  '.join(run_row(fw.name, str(conns), f))}", file=env.log, flush=True)
        result["native_libs"] = native_libs(pid)


def bench_framework(env: Env, fw: Framework) -> dict[str, Any]:
    """Build, measure offline, serve: one framework's figures (``notes`` says what failed)."""
    args = env.args
    out = env.tmp / fw.name
    result: dict[str, Any] = {"framework": fw.name, "notes": [], "levels": {}, "offline": None}
    print(f"# {fw.name}: building ({load_str()})", file=env.log, flush=True)
    try:
        run_worker(["build", fw.name, "--out", str(out), "--inputs", str(env.inputs)], 900)
        serving_toml = out / "serving.toml"
        add_experiment(
            env.studio,
            env.store,
            fw.name,
            out / "model",
            fw.table,
            serving_config=serving_toml if serving_toml.exists() else None,
        )
    except subprocess.CalledProcessError as e:
        result["notes"].append(f"studio experiments add failed: {last_lines(e.stderr or '')}")
        return result
    except RuntimeError as e:
        result["notes"].append(f"build failed: {e}")
        return result
    expected = load_expected(out / "expected.npz")
    print(f"# {fw.name}: offline sweep ({load_str()})", file=env.log, flush=True)
    try:
        text = run_worker(
            ["offline", fw.name, "--out", str(out), "--inputs", str(env.inputs)]
            + ["--seconds", f"{args.offline_seconds:g}"],
            600,
        )
        line = next(ln for ln in text.splitlines() if ln.startswith("OFFLINE "))
        off = json.loads(line[len("OFFLINE ") :])
        off["items_per_s"] = {int(k): v for k, v in off["items_per_s"].items()}
        result["offline"] = off
        print(f"  {offline_line(fw.name, off)}", file=env.log, flush=True)
    except (RuntimeError, StopIteration) as e:
        result["notes"].append(f"offline failed: {e or 'no result line'}")
    try:
        measure_served(env, fw, expected, result)
    except RuntimeError as e:
        result["notes"].append(f"serving failed: {last_lines(str(e), 4)}")
        print(f"  {fw.name}: serving failed: {e}", file=env.log, flush=True)
    return result


# -- reporting -----------------------------------------------------------------------------------


def offline_line(name: str, off: dict[str, Any]) -> str:
    sweep = ", ".join(f"{b}: {v:.0f}" for b, v in sorted(off["items_per_s"].items()))
    return (
        f"{name} offline items/s by batch size: {sweep}; best {off['best_items_per_s']:.0f} "
        f"(batch {off['best_batch_size']}); batch-1 call p50 {off['b1_p50_ms']:.2f} ms, p99 "
        f"{off['b1_p99_ms']:.2f} ms ({off['b1_calls']} calls)"
    )


def top_ratio(r: dict[str, Any], top: int) -> float:
    level = r["levels"].get(top)
    best = (r["offline"] or {}).get("best_items_per_s", float("nan"))
    return ratio(level["req_per_s"], best) if level else float("nan")


SUMMARY_HEADERS = [
    "framework",
    "offline best",
    "@batch",
    "b1 ms",
    # the served levels' columns are inserted here
    "x offline",
    "rows/call",
    "stage busy",
    "srv cores",
    "errors",
    "wrong",
    "native libs",
]


def summary_rows(results: Sequence[dict[str, Any]], levels: Sequence[int]) -> list[list[str]]:
    top = max(levels)
    nan = float("nan")
    rows = []
    for r in results:
        off = r["offline"] or {}
        at_top = r["levels"].get(top, {})
        served = [fmt_num(r["levels"].get(c, {}).get("req_per_s", nan)) for c in levels]
        rows.append(
            [
                r["framework"],
                fmt_num(off.get("best_items_per_s", nan)),
                str(off.get("best_batch_size", "-")),
                fmt_num(off.get("b1_p50_ms", nan), ".2f"),
                *served,
                fmt_num(top_ratio(r, top), ".2f"),
                fmt_num(at_top.get("rows_per_call_all", nan), ".1f"),
                fmt_num(at_top.get("compute_s_per_s", nan), ".2f"),
                fmt_num(at_top.get("server_cores", nan), ".2f"),
                str(sum(f["errors"] for f in r["levels"].values())) if r["levels"] else "-",
                str(sum(f["wrong"] for f in r["levels"].values())) if r["levels"] else "-",
                ",".join(r.get("native_libs") or []) or "-",
            ]
        )
    return rows


def thread_lines(r: dict[str, Any], top: int) -> list[str]:
    groups = (r["levels"].get(top) or {}).get("threads") or {}
    shown = sorted(groups.items(), key=lambda kv: -kv[1][0])
    parts = [f"{g} {c:.2f} ({n})" for g, (c, n) in shown if c >= 0.01]
    return [f"{r['framework']} c{top}: " + "; ".join(parts)] if parts else []


def import_check() -> list[str] | str:
    """The frameworks ``import studioserve...`` imports (a list), or why the check failed."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        capture_output=True,
        text=True,
        env=dict(os.environ, **python_env()),
        cwd=REPO,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return f"the check failed ({proc.returncode}): {last_lines(proc.stderr)}"
    try:
        found = ast.literal_eval(lines[-1])
    except (ValueError, SyntaxError):
        return f"the check printed {lines[-1]!r}"
    return [str(m) for m in found]


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark every framework's served items/s against its own offline best.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=20.0, help="counted seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds before each")
    p.add_argument("--connections", default="1,8,64", help="client connections per level")
    p.add_argument(
        "--frameworks", default="all", help=f"comma-separated, or all: {', '.join(FRAMEWORKS)}"
    )
    p.add_argument("--offline-seconds", type=float, default=1.0, help="per offline batch size")
    p.add_argument("--client-timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument(
        "--start-timeout", type=float, default=300.0, help="seconds for a server to be ready"
    )
    add_server_options(
        p,
        serve_arg_example="--threads=64",
        every=True,
        studio_cmd_help="command that runs `studio` (default: this venv's; the server's Python "
        "threads are then not named)",
    )
    add_run_options(p)
    args = p.parse_args(argv)
    args.connections = sorted({int(c) for c in args.connections.split(",") if c})
    if not args.connections or min(args.connections) < 1:
        p.error("--connections takes positive counts, e.g. 1,8,64")
    if args.frameworks == "all":
        args.frameworks = list(FRAMEWORKS)
    else:
        args.frameworks = [f for f in args.frameworks.split(",") if f]
        unknown = set(args.frameworks) - set(FRAMEWORKS)
        if unknown:
            p.error(f"unknown frameworks {sorted(unknown)}: choose from {', '.join(FRAMEWORKS)}")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: the same clean stop as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = sys.stderr
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started ignored
    t_start = time.monotonic()
    wait_for_quiet(args.max_load, args.max_wait, log)
    print(f"# bench_frameworks: {', '.join(args.frameworks)}, {load_str()}", file=log, flush=True)
    top = max(args.connections)
    results: list[dict[str, Any]] = []
    try:
        imported = import_check()
        print(f"# frameworks imported by importing studioserve: {imported}", file=log, flush=True)
        with tempfile.TemporaryDirectory(prefix="studioserve-frameworks-") as tmp_name:
            tmp = Path(tmp_name)
            rng = np.random.default_rng(13)
            inputs = tmp / "inputs.npz"
            np.savez(
                inputs,
                mlp=rng.standard_normal((N_INPUTS, MLP_IN)).astype(np.float32),
                tabular=rng.standard_normal((N_INPUTS, FEATURES)).astype(np.float32),
            )
            env = Env(args, studio_command(args.studio_cmd), tmp / "store", tmp, inputs, log)
            for name in args.frameworks:
                results.append(bench_framework(env, FRAMEWORKS[name]))
    except KeyboardInterrupt:
        print(
            "# interrupted: no server or worker left running, temporary files removed",
            file=log,
            flush=True,
        )
        return 130
    levels = args.connections
    print(
        f"\n## bench_frameworks: one item per request, connections {levels}, {args.duration:g} s "
        f"per level, http server {args.http_server}, serve args "
        f"{' '.join(args.serve_arg) or '-'}, {load_str()}"
    )
    for r in results:
        if r["offline"]:
            print(offline_line(r["framework"], r["offline"]))
    point_rows = [
        run_row(r["framework"], str(c), f) for r in results for c, f in r["levels"].items()
    ]
    if point_rows:
        headers = ["conns" if h == "routes" else h for h in RUN_HEADERS]
        headers = ["items/s" if h == "req/s" else h for h in headers]
        headers[-2] = "CPU us/item"
        print(table(headers, point_rows))
    lines = [line for r in results for line in thread_lines(r, top)]
    if lines:
        print(f"server CPU by thread group at c{top}: CPU seconds per second (threads)")
        for line in lines:
            print(f"  {line}")
    headers = SUMMARY_HEADERS[:4] + [f"c{c}" for c in levels] + SUMMARY_HEADERS[4:]
    print(table(headers, summary_rows(results, levels), left=1))
    for r in results:
        for note in r["notes"]:
            print(f"{r['framework']}: {note}")
    if env.server_warnings:
        print("server log lines at WARNING or above:")
        for line in env.server_warnings:
            print(f"  {line}")
    tg: dict[str, Target] = {
        f"{r['framework']}: served c{top} / offline best": (
            top_ratio(r, top),
            ">=",
            TARGET_RATIO,
            "x",
        )
        for r in results
    }
    n_imported = float(len(imported)) if isinstance(imported, list) else float("nan")
    tg["frameworks imported by importing studioserve"] = (n_imported, "<=", 0, "")
    print(targets_table(tg))
    print(f"imported by importing studioserve: {imported}")
    ok = all(passed(t) for t in tg.values())
    print(
        f"server exit codes: {'; '.join(env.exit_codes) or '-'}; wall time "
        f"{time.monotonic() - t_start:.0f} s; {'PASS' if ok else 'FAIL'}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "connections": levels,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "offline_seconds": args.offline_seconds,
                    "http_server": args.http_server,
                    "serve_args": args.serve_arg,
                    "imported_by_studioserve": imported,
                    "frameworks": results,
                    "server_warnings": env.server_warnings,
                    "exit_codes": env.exit_codes,
                    "targets": {
                        n: {"value": t[0], "want": f"{t[1]} {t[2]:g}", "pass": passed(t)}
                        for n, t in tg.items()
                    },
                    "pass": ok,
                },
                indent=2,
                default=str,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
