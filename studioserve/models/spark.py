"""PySpark ``PipelineModel`` folders, served through one local SparkSession per process.

A folder saved with ``pipeline_model.save(path)`` (``metadata/`` naming
``org.apache.spark.ml.PipelineModel`` and ``stages/``) is loaded with ``PipelineModel.load``
into a local SparkSession that this module starts on first use (``local[*]``, the UI off, the
driver on 127.0.0.1, ``SPARK_LOCAL_IP`` too unless set, log level WARN, the JVM's stdout
discarded) and shares between every Spark model of the process; the last model to close stops
it and its JVM. A process that already runs a SparkContext (a wrapper's) has it reused, and
never stopped here.

The signature, without ``[[input]]`` in serving.toml, is one input ``features``: float64 of
shape ``(n_columns,)``, one number per input column of the pipeline's first stage, in the
stage's order (``VectorAssembler.getInputCols()``, or ``getInputCol()``); a request sends an
array of ``n_columns`` numbers per example (or ``(n, n_columns)`` for n). A pipeline whose
first stage is a fitted predictor reads the vector of its ``featuresCol`` instead, of
``numFeatures`` numbers. With ``[[input]]`` tables, each names one DataFrame column: shape
``[]`` is a column of that dtype (a string dtype is a string column), shape ``[k]`` an ML
vector column. The outputs are ``prediction`` (float64) and ``probability`` (float64, one per
class) when the pipeline makes them, or the columns ``[[output]]`` names (vectors as arrays).

One batch is one Spark job: the rows become a one-partition DataFrame with a row index, the
pipeline transforms it and the output columns are collected in the index's order. A job costs
tens to hundreds of milliseconds whatever its size (0.4 s on a busy two-core machine), so a
Spark model takes up to :data:`DEFAULT_BATCH_ROWS` rows per call unless ``--max-batch-size``
or serving.toml asks for another limit (the server's default of 128 reads as "not set").
Spark needs a Java runtime (17 or newer for PySpark 4): its absence is a load error that says
how to install one. ``SPARK_DRIVER_MEMORY`` sets the driver's memory (default
:data:`DRIVER_MEMORY`).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np

from ..config import DEFAULT_MAX_BATCH_SIZE
from ..errors import ModelLoadError
from ..tensors import TensorSpec
from .artifacts import Artifact
from .batched import (
    BatchFunction,
    BatchFunctionModel,
    LoadOptions,
    example_batch,
    missing_framework,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DRIVER_MEMORY",
    "SparkModel",
    "acquire_session",
    "find_java",
    "load",
    "release_session",
    "session_users",
]

#: rows per Spark job when the server's max_batch_size is its default (see the docstring)
DEFAULT_BATCH_ROWS: Final = 1024
#: the local driver's memory unless SPARK_DRIVER_MEMORY says otherwise
DRIVER_MEMORY: Final = "512m"
#: the row index column added to each batch (rows are collected in its order)
ROW_COLUMN: Final = "__studioserve_row"
DEFAULT_INPUT: Final = "features"
_JAVA_HINT: Final = (
    "PySpark needs a Java 17+ runtime: install one (apt-get install -y default-jre-headless) "
    "or point JAVA_HOME at one"
)

_lock = threading.Lock()
_session: Any = None  # the process's SparkSession while any Spark model uses it
_owned = False  # this module started it (and so stops it)
_users = 0


class SparkModel(BatchFunctionModel):
    """A PySpark PipelineModel behind the model stage; :meth:`close` lets go of the session.

    :param columns: the DataFrame columns the inputs fill, for :meth:`describe`.
    """

    kind: ClassVar[str] = "spark"

    def __init__(self, calls: Sequence[BatchFunction], *, columns: str, **kwargs: Any) -> None:
        super().__init__(calls, **kwargs)
        self._columns = columns
        self._close_lock = threading.Lock()
        self._released = False

    def describe(self) -> str:
        return f"{super().describe()}; input columns: {self._columns}"

    def close(self) -> None:
        """Join the pipe, then release the SparkSession (the last model stops it)."""
        try:
            super().close()
        finally:
            with self._close_lock:
                release, self._released = not self._released, True
            if release:
                release_session()


# -- the session ---------------------------------------------------------------------------------


def find_java() -> str | None:
    """The java that Spark will run: ``$JAVA_HOME/bin/java`` when JAVA_HOME is set, else
    ``java`` on PATH; None when there is none."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        return str(java) if java.is_file() and os.access(java, os.X_OK) else None
    return shutil.which("java")


def acquire_session() -> Any:
    """The process's SparkSession, started on first use (or the one the process already
    runs); each call must be paired with one :func:`release_session`.

    :raises ModelLoadError: without a Java runtime, or when Spark does not start.
    """
    global _session, _owned, _users
    with _lock:
        if _session is None:
            _session, _owned = _start()
        _users += 1
        return _session


def release_session() -> None:
    """Let go of one :func:`acquire_session`; the last one stops the session and its JVM
    (only when this module started it)."""
    global _session, _users
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users or _session is None:
            return
        session, _session = _session, None
        if _owned:
            _stop(session)


def session_users() -> int:
    """How many holders the session has now (loaded Spark models and other acquirers)."""
    with _lock:
        return _users


def _start() -> tuple[Any, bool]:
    """A local session: the running one if the process has one, else a new one we own."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    if SparkContext._active_spark_context is not None:
        logger.info("Spark models use the SparkSession this process already runs")
        return SparkSession.builder.getOrCreate(), False
    running = SparkContext._gateway is not None  # a JVM left by a stopped context
    java = "the running JVM" if running else find_java()
    if java is None:
        home = os.environ.get("JAVA_HOME")
        where = f"JAVA_HOME={home} has no bin/java" if home else "no java on PATH"
        raise ModelLoadError(f"{_JAVA_HINT} ({where})")
    conf = (
        SparkConf()
        .setMaster("local[*]")
        .setAppName("studioserve")
        .set("spark.ui.enabled", "false")
        .set("spark.ui.showConsoleProgress", "false")
        .set("spark.driver.host", "127.0.0.1")
        .set("spark.driver.bindAddress", "127.0.0.1")
        .set("spark.sql.execution.arrow.pyspark.enabled", "true")
    )
    if not os.environ.get("SPARK_DRIVER_MEMORY"):
        conf.set("spark.driver.memory", DRIVER_MEMORY)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # the JVM's own address: loopback
    gateway = None
    try:
        if not running:
            launch: Any = launch_gateway  # untyped in PySpark
            gateway = launch(conf, popen_kwargs={"stdout": subprocess.DEVNULL})
        context = SparkContext(conf=conf, gateway=gateway)
        context.setLogLevel("WARN")
        session = SparkSession(context)
    except Exception as e:
        if gateway is not None:
            _shutdown_gateway(gateway)
        raise ModelLoadError(
            f"Spark did not start with {java}: {_brief(e)}; {_JAVA_HINT} (Spark's own "
            "lines above say more)"
        ) from e
    logger.info(
        "started Spark %s local[*] on the CPU (%d cores) with %s",
        session.version,
        context.defaultParallelism,
        java,
    )
    return session, True


def _stop(session: Any) -> None:
    """Stop ``session`` and its JVM, so nothing of Spark outlives the last model."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    try:
        session.stop()
    except Exception as e:  # keep closing
        logger.warning("stopping Spark: %s: %s", type(e).__name__, _brief(e))
    if gateway is not None:
        _shutdown_gateway(gateway)
    logger.info("stopped Spark")


def _shutdown_gateway(gateway: Any) -> None:
    """Close the Py4J gateway and end its JVM (``SparkContext.stop`` keeps the JVM for the
    next context; a later model starts a fresh one)."""
    from pyspark import SparkContext

    proc = getattr(gateway, "proc", None)
    try:
        gateway.shutdown()
    except Exception as e:
        logger.debug("Py4J gateway shutdown: %s", e)
    if SparkContext._gateway is gateway:
        SparkContext._gateway = None
        SparkContext._jvm = None
    if proc is None:
        return
    if proc.stdin is not None:
        proc.stdin.close()  # the gateway JVM exits when its stdin closes
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# -- the model -----------------------------------------------------------------------------------


def load(artifact: Artifact, options: LoadOptions) -> SparkModel:
    """The detection table's loader for a PySpark PipelineModel folder.

    :raises ModelLoadError: when PySpark is missing (naming the extra), Java is missing, the
        folder does not load, or the pipeline fails on a row of zeros shaped like its inputs.
    """
    path = artifact.path
    try:
        from pyspark.ml import PipelineModel
    except ImportError as e:
        raise missing_framework(f"the PySpark model {path}", "pyspark", "spark") from e
    try:
        session = acquire_session()
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot serve the PySpark model {path}: {e}") from e
    try:
        return _load(artifact, options, session, PipelineModel)
    except BaseException:
        release_session()
        raise


def _load(artifact: Artifact, options: LoadOptions, session: Any, pipeline: Any) -> SparkModel:
    path = artifact.path
    try:
        model = pipeline.load(str(path))
    except Exception as e:
        raise ModelLoadError(
            f"cannot load PySpark PipelineModel {path}: {_brief(e)}. Save it with "
            "pipeline_model.write().overwrite().save(path) from a compatible PySpark"
        ) from e
    layout = _Layout.of(model, options.inputs, path)
    probe = _probe(model, session, layout, options.outputs, path)
    call = _batch_function(model, session, layout, probe)
    try:
        call(example_batch(layout.specs, rows=2))  # the warm-up, with the index check
    except Exception as e:
        raise ModelLoadError(
            f"{path}: the pipeline failed its warm-up on zeros ({_brief(e)}); check the "
            "signature in serving.toml"
        ) from e
    rows = options.max_batch_size
    if rows == DEFAULT_MAX_BATCH_SIZE:
        rows = DEFAULT_BATCH_ROWS
    logger.info(
        "%s: PySpark PipelineModel (%s) on columns %s; up to %d rows per Spark job",
        path,
        " -> ".join(type(s).__name__ for s in model.stages),
        layout.describe(),
        rows,
    )
    return SparkModel(
        [call] * max(1, options.instances),
        columns=layout.describe(),
        source=str(path),
        inputs=layout.specs,
        outputs=probe.outputs,
        platform=artifact.framework.platform,
        max_batch_size=rows,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
        devices=options.devices,
        warm=False,
    )


class _Column:
    """One DataFrame column that an input fills.

    :param name: the column.
    :param kind: ``spread`` (one of an input's numbers), ``scalar`` (one value per example)
        or ``vector`` (an input's numbers as an ML vector).
    :param dtype: the numpy dtype of its values (None: text).
    """

    def __init__(self, name: str, kind: str, dtype: np.dtype[Any] | None) -> None:
        self.name = name
        self.kind = kind
        self.dtype = dtype


class _Layout:
    """How the served inputs become a DataFrame's rows: the signature and its columns."""

    def __init__(self, specs: Sequence[TensorSpec], columns: Sequence[Sequence[_Column]]) -> None:
        self.specs = tuple(specs)
        self.columns = [list(c) for c in columns]  # per input, the columns it fills

    @classmethod
    def of(cls, model: Any, inputs: Sequence[TensorSpec] | None, path: Path) -> _Layout:
        """From serving.toml's ``[[input]]`` tables when given, else the first stage."""
        if inputs:
            return cls(inputs, [[_given_column(s, path)] for s in inputs])
        stage = model
        while hasattr(stage, "stages"):  # a PipelineModel, possibly nested
            if not stage.stages:
                raise ModelLoadError(f"{path} is a PipelineModel with no stages; nothing to serve")
            stage = stage.stages[0]
        f64 = np.dtype("float64")
        for param in ("inputCols", "inputCol"):
            if stage.hasParam(param) and stage.isDefined(param):
                value = stage.getOrDefault(param)
                names = [value] if isinstance(value, str) else list(value)
                spec = TensorSpec(DEFAULT_INPUT, (len(names),), "float64")
                return cls([spec], [[_Column(n, "spread", f64) for n in names]])
        size = getattr(stage, "numFeatures", None)
        if stage.hasParam("featuresCol") and isinstance(size, int) and size > 0:
            spec = TensorSpec(DEFAULT_INPUT, (size,), "float64")
            return cls([spec], [[_Column(stage.getOrDefault("featuresCol"), "vector", f64)]])
        raise ModelLoadError(
            f"{path}: the pipeline's first stage ({type(stage).__name__}) names no input "
            'columns; list them in serving.toml as [[input]] tables (name = "column", '
            'dtype = "float64", shape = [])'
        )

    def describe(self) -> str:
        return ", ".join(c.name for cols in self.columns for c in cols)

    def schema(self) -> Any:
        from pyspark.ml.linalg import VectorUDT
        from pyspark.sql import types

        fields = []
        for cols in self.columns:
            for c in cols:
                kind = VectorUDT() if c.kind == "vector" else _spark_type(c.dtype)
                fields.append(types.StructField(c.name, kind, False))
        fields.append(types.StructField(ROW_COLUMN, types.LongType(), False))
        return types.StructType(fields)

    def rows(self, batch: Any) -> list[tuple[Any, ...]]:
        """The batch (an array, or a dict of arrays by input name) as DataFrame rows."""
        from pyspark.ml.linalg import DenseVector

        arrays = batch if isinstance(batch, dict) else {self.specs[0].name: batch}
        parts: list[list[tuple[Any, ...]]] = []
        for spec, cols in zip(self.specs, self.columns, strict=True):
            arr = np.asarray(arrays[spec.name])
            kind = cols[0].kind
            if kind == "spread":
                parts.append([tuple(r) for r in arr.tolist()])
            elif kind == "vector":
                parts.append([(DenseVector(r),) for r in arr.astype(np.float64)])
            elif cols[0].dtype is None:
                parts.append([(_text(v),) for v in arr.tolist()])
            else:
                parts.append([(v,) for v in arr.tolist()])
        return [
            (*itertools.chain.from_iterable(row), i)
            for i, row in enumerate(zip(*parts, strict=True))
        ]


def _given_column(spec: TensorSpec, path: Path) -> _Column:
    dtype = spec.numpy_dtype
    text = dtype is None or dtype.kind in "OUS"
    if spec.shape == ():
        return _Column(spec.name, "scalar", None if text else dtype)
    if len(spec.shape) == 1 and not text and dtype is not None and dtype.kind in "fiub":
        return _Column(spec.name, "vector", np.dtype("float64"))
    raise ModelLoadError(
        f"{path}: serving.toml input {spec.describe()} cannot be a Spark column; an input is "
        "a column of one value per example (shape = []) or an ML vector of numbers "
        "(shape = [k])"
    )


def _spark_type(dtype: np.dtype[Any] | None) -> Any:
    from pyspark.sql import types

    if dtype is None:
        return types.StringType()
    table: dict[str, Any] = {
        "float64": types.DoubleType(),
        "float32": types.FloatType(),
        "float16": types.FloatType(),
        "int64": types.LongType(),
        "int32": types.IntegerType(),
        "int16": types.ShortType(),
        "int8": types.ByteType(),
        "uint32": types.LongType(),
        "uint16": types.IntegerType(),
        "uint8": types.ShortType(),
        "bool": types.BooleanType(),
    }
    kind = table.get(dtype.name)
    if kind is None:
        raise ModelLoadError(f"a Spark column cannot hold {dtype.name}; use float64 or int64")
    return kind


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Probe:
    """What the pipeline makes: the output columns to collect and their signature."""

    def __init__(self, outputs: Sequence[TensorSpec], indexed: bool) -> None:
        self.outputs = tuple(outputs)
        self.indexed = indexed  # the row index survives the pipeline


def _probe(
    model: Any,
    session: Any,
    layout: _Layout,
    outputs: Sequence[TensorSpec] | None,
    path: Path,
) -> _Probe:
    """Transform one row of zeros: which columns come out, and how wide the vectors are."""
    try:
        frame = session.createDataFrame(layout.rows(example_batch(layout.specs)), layout.schema())
        out = model.transform(frame)
        fields = {f.name: f for f in out.schema.fields}
        wanted = (
            [s.name for s in outputs]
            if outputs
            else [n for n in ("prediction", "probability") if n in fields]
        )
        if not wanted:
            raise ModelLoadError(
                f"{path}: the pipeline makes no prediction or probability column (it makes "
                f"{', '.join(fields)}); name the columns to answer in serving.toml as "
                '[[output]] tables (name = "column", dtype = "float64", shape = [])'
            )
        missing = [n for n in wanted if n not in fields]
        if missing:
            raise ModelLoadError(
                f"{path}: serving.toml names output column(s) {', '.join(missing)}, but the "
                f"pipeline makes {', '.join(fields)}"
            )
        row = out.select(*wanted).collect()[0]
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"{path}: the pipeline failed on a row of zeros shaped like its inputs "
            f"({', '.join(s.describe() for s in layout.specs)}): {_brief(e)}; check the input "
            "columns, or list them in serving.toml as [[input]] tables"
        ) from e
    if outputs:
        specs = list(outputs)
    else:
        specs = []
        for name, value in zip(wanted, row, strict=True):
            if hasattr(value, "toArray"):
                specs.append(TensorSpec(name, (len(value.toArray()),), "float64"))
            else:
                specs.append(TensorSpec(name, (), "float64"))
    return _Probe(specs, ROW_COLUMN in fields)


def _batch_function(model: Any, session: Any, layout: _Layout, probe: _Probe) -> BatchFunction:
    """One Spark job per batch: rows in, a dict of output arrays (by output name) out."""
    schema = layout.schema()
    names = [s.name for s in probe.outputs]
    columns = [ROW_COLUMN, *names] if probe.indexed else names
    first = 1 if probe.indexed else 0
    converters = [_converter(s) for s in probe.outputs]

    def call(batch: Any) -> dict[str, Any]:
        rows = layout.rows(batch)
        frame = session.createDataFrame(rows, schema, verifySchema=False).coalesce(1)
        try:
            got = model.transform(frame).select(*columns).collect()
        except Exception as e:
            raise RuntimeError(f"Spark: {_brief(e)}") from e
        if len(got) != len(rows):
            raise RuntimeError(
                f"the pipeline returned {len(got)} rows for {len(rows)} (does a stage drop "
                "rows, such as handleInvalid = 'skip'?); a served pipeline must keep every row"
            )
        if probe.indexed and any(r[0] != i for i, r in enumerate(got)):
            got = sorted(got, key=lambda r: r[0])
        return {
            name: convert([r[first + j] for r in got])
            for j, (name, convert) in enumerate(zip(names, converters, strict=True))
        }

    return call


def _converter(spec: TensorSpec) -> Callable[[list[Any]], np.ndarray[Any, Any]]:
    """Collected values (numbers, text or ML vectors) as an array of the output's dtype."""
    dtype = spec.numpy_dtype
    text = dtype is None or dtype.kind in "OUS"

    def convert(values: list[Any]) -> np.ndarray[Any, Any]:
        if values and hasattr(values[0], "toArray"):
            values = [v.toArray() for v in values]
        if text:
            return np.asarray(values, dtype=object)
        return np.asarray(values, dtype=dtype)

    return convert


def _brief(e: BaseException) -> str:
    """An exception's message without the Java stack trace Py4J appends."""
    text = str(e)
    if text.startswith("An error occurred while calling") and "\n: " in text:
        text = text.split("\n: ", 1)[1]
    text = text.split("\n\tat ", 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:597] + "..."
