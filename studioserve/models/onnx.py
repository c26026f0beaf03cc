"""An ONNX model (``*.onnx``) served by ONNX Runtime, one ``InferenceSession`` per instance.

The only module that imports ``onnxruntime``, and only inside functions (:func:`load`), so
importing studioserve or running ``studio --help`` never loads it. (This module is
``studioserve.models.onnx``; absolute imports inside it still reach the real ``onnx`` and
``onnxruntime`` packages.)

Signature
    Read from the graph (``session.get_inputs()`` / ``get_outputs()``): names, element types
    (``tensor(float)`` is float32, and so on for every tensor type numpy has; see
    :data:`ONNX_TYPES`) and shapes. The first dimension is the batch axis; the rest is one
    example's shape, a symbolic or unknown dimension as None (any size). ``[[input]]`` /
    ``[[output]]`` tables in serving.toml override the names, dtypes and shapes: matched by name
    when they name the graph's tensors, else by position. An output ONNX Runtime cannot hand
    numpy (a sequence or map, such as a converted classifier's ZipMap) is not served, with a
    warning.

Batching
    A graph whose inputs all have a symbolic (or ``-1``) first dimension runs one
    ``session.run`` per batch of the pipe's model stage. A graph exported with its first
    dimension fixed to 1 cannot take a batch: it is still served with a batch axis (so items
    of concurrent requests still meet in one stage round and ``max_batch_size`` keeps its
    meaning), and its batch function runs the graph once per row and stacks the answers. An
    input whose first dimension is fixed to another size, or a scalar input, has no batch axis:
    its whole shape is one example, run row by row the same way.

Sessions
    Each instance's session uses ``ORT_ENABLE_ALL`` graph optimizations, one inter-op thread and
    as many intra-op threads as the physical cores this process may use (:func:`physical_cores`;
    shared between the CPU instances). It runs on the GPU (``CUDAExecutionProvider``, then the
    CPU for what CUDA lacks) when ONNX Runtime has the CUDA provider, the visible GPUs
    round-robin over the instances, else on the CPU; ``devices`` (``"cuda:N"``, ``"GPU:N"`` or
    ``"CPU"``, one per instance) places each one. The device of each session is logged at
    load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np

from ..errors import ModelLoadError
from ..tensors import TensorSpec
from .artifacts import Artifact
from .batched import BatchFunction, BatchFunctionModel, LoadOptions, missing_framework

logger = logging.getLogger(__name__)

__all__ = [
    "ONNX_TYPES",
    "OnnxModel",
    "default_devices",
    "load",
    "physical_cores",
    "providers_for",
]

#: ONNX tensor element types as numpy dtype names ("string" has no fixed-size numpy type:
#: ONNX Runtime takes and gives object arrays of str for it)
ONNX_TYPES: Final[dict[str, str]] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(complex64)": "complex64",
    "tensor(complex128)": "complex128",
    "tensor(string)": "string",
}

_CUDA: Final = "CUDAExecutionProvider"
_CPU: Final = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One graph input or output and how it is served.

    :param graph: its name in the graph (the feed or fetch name).
    :param spec: its served per-example signature.
    :param graph_dtype: its element type in the graph, as numpy's name (what it is fed as).
    :param batched: its first graph dimension is the batch axis (symbolic, or fixed to 1).
    :param dynamic: that first dimension is symbolic (takes any number of rows).
    """

    graph: str
    spec: TensorSpec
    graph_dtype: str
    batched: bool
    dynamic: bool


class OnnxModel(BatchFunctionModel):
    """An ONNX graph behind one batching stage, one ONNX Runtime session per instance."""

    kind: ClassVar[str] = "onnx"


def load(artifact: Artifact, options: LoadOptions) -> OnnxModel:
    """The detection table's loader for an ``.onnx`` file.

    :raises ModelLoadError: when onnxruntime is not installed (naming ``studioserve[onnx]``),
        the file is not an ONNX model ONNX Runtime can load, its signature has a type numpy
        lacks, serving.toml's signature does not fit the graph, a device label is unknown, or
        the warm-up call fails.
    """
    path = Path(artifact.path)
    ort = _import_onnxruntime(path)
    devices = _devices(path, ort, options)
    intra = _intra_op_threads(devices)
    sessions: list[Any] = []
    labels: list[str] = []
    for i, device in enumerate(devices):
        session, label = _session(ort, path, device, intra)
        sessions.append(session)
        labels.append(label)
        where = f"GPU ({label})" if label != "CPU" else f"CPU ({intra} intra-op threads)"
        logger.info("%s: ONNX Runtime session %d of %d on %s", path, i + 1, len(devices), where)
    inputs, outputs, per_row = _signature(path, sessions[0])
    inputs = _override(path, "input", inputs, options.inputs)
    outputs = _override(path, "output", outputs, options.outputs)
    if per_row:
        logger.info(
            "%s: the first dimension of input(s) %s is fixed, so the graph cannot take a batch; "
            "each row runs in its own call",
            path,
            ", ".join(t.graph for t in inputs if not t.dynamic),
        )
    return OnnxModel(
        [_batch_function(s, inputs, outputs, per_row) for s in sessions],
        source=str(path),
        inputs=[t.spec for t in inputs],
        outputs=[t.spec for t in outputs],
        platform=artifact.framework.platform,
        max_batch_size=options.max_batch_size,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
        devices=labels,
    )


def _import_onnxruntime(path: Path) -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError as e:
        raise missing_framework(f"ONNX model {path}", "onnxruntime", "onnx") from e
    return onnxruntime


def physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads of one core counted once).

    Reads the CPU topology of the CPUs in the process's affinity mask; where that is not
    available, ``os.cpu_count()``.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus) or os.cpu_count() or 1
        cores.add((package, core))
    return len(cores) or os.cpu_count() or 1


def _visible_gpu_count() -> int:
    """How many GPUs CUDA would show this process (CUDA_VISIBLE_DEVICES, else the driver's
    list; 1 when neither says)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        count = 0
        for v in ids:  # CUDA stops at the first invalid entry ("-1" hides them all)
            if v.startswith("-"):
                break
            count += 1
        return count
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir())) or 1
    except OSError:
        return 1


def default_devices(instances: int, available: Sequence[str], gpus: int) -> list[str]:
    """The device of each of ``instances`` sessions: with the CUDA provider in ``available``
    and ``gpus`` > 0, the GPUs round-robin ("cuda:0", "cuda:1", ...), else all "CPU"."""
    if _CUDA not in available or gpus < 1:
        return ["CPU"] * instances
    return [f"cuda:{i % gpus}" for i in range(instances)]


def providers_for(device: str, available: Sequence[str]) -> list[Any]:
    """The execution providers of a session on ``device`` ("CPU", "cuda", "cuda:N", "GPU:N").

    :raises ValueError: for an unknown label, or a GPU when ONNX Runtime has no CUDA provider
        (``available`` is ``onnxruntime.get_available_providers()``).
    """
    label = device.strip().lower()
    if label in ("cpu", "cpu:0"):
        return [_CPU]
    for prefix in ("cuda", "gpu"):
        if label == prefix or label.startswith(prefix + ":"):
            index = label[len(prefix) + 1 :] or "0"
            if not index.isdigit():
                break
            if _CUDA not in available:
                raise ValueError(
                    f"device {device!r} needs ONNX Runtime's CUDA provider, which this "
                    f"onnxruntime lacks (it has {', '.join(available)}); install "
                    "onnxruntime-gpu, or place the instance on the CPU"
                )
            return [(_CUDA, {"device_id": int(index)}), _CPU]
    raise ValueError(f'unknown device {device!r}; use "CPU", "cuda:N" or "GPU:N"')


def _devices(path: Path, ort: Any, options: LoadOptions) -> list[str]:
    available = list(ort.get_available_providers())
    if options.devices is None:
        return default_devices(options.instances, available, _visible_gpu_count())
    devices = [str(d) for d in options.devices]
    if len(devices) != options.instances:
        raise ModelLoadError(
            f"{path}: {len(devices)} devices for {options.instances} instances; give one "
            "device per instance"
        )
    for d in devices:
        try:
            providers_for(d, available)
        except ValueError as e:
            raise ModelLoadError(f"{path}: {e}") from None
    return devices


def _intra_op_threads(devices: Sequence[str]) -> int:
    """The intra-op threads of each session: the physical cores shared by the CPU sessions."""
    on_cpu = sum(1 for d in devices if d.strip().lower() in ("cpu", "cpu:0")) or 1
    return max(1, physical_cores() // on_cpu)


def _session(ort: Any, path: Path, device: str, intra: int) -> tuple[Any, str]:
    """One session of ``path`` on ``device``, and the device it really runs on."""
    available = list(ort.get_available_providers())
    providers = providers_for(device, available)
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load ONNX model {path}: {type(e).__name__}: {e}. Check that the file is a "
            "complete ONNX model (onnx.checker.check_model) with every external data file "
            "beside it"
        ) from e
    if providers[0] == _CPU:
        return session, "CPU"
    if session.get_providers()[0] != _CUDA:
        logger.warning(
            "%s: asked for %s, but ONNX Runtime could not start its CUDA provider (see its "
            "messages above); this instance runs on the CPU",
            path,
            device,
        )
        return session, "CPU"
    return session, f"cuda:{providers[0][1]['device_id']}"


def _dynamic(dim: Any) -> bool:
    return dim is None or isinstance(dim, str) or (isinstance(dim, int) and dim < 0)


def _dims(dims: Sequence[Any]) -> tuple[int | None, ...]:
    return tuple(None if _dynamic(d) else int(d) for d in dims)


def _dtype(path: Path, kind: str, arg: Any) -> str:
    name = ONNX_TYPES.get(str(arg.type))
    if name is None:
        raise ModelLoadError(
            f"{path}: {kind} {arg.name!r} has type {arg.type}, which numpy has no type for; "
            "studioserve serves tensors of "
            + ", ".join(t[len("tensor(") : -1] for t in ONNX_TYPES)
            + ". Re-export the model with such inputs, or serve it with a wrapper"
        )
    return name


def _signature(path: Path, session: Any) -> tuple[list[_Tensor], list[_Tensor], bool]:
    """The graph's inputs and outputs as served, and whether it runs row by row."""
    inputs = [_tensor(path, "input", arg, None) for arg in session.get_inputs()]
    if not inputs:
        raise ModelLoadError(
            f"{path}: the graph has no inputs, so there is nothing to batch; serve it with a "
            "wrapper"
        )
    per_row = not all(t.dynamic for t in inputs)
    any_batched = any(t.batched for t in inputs)
    outputs: list[_Tensor] = []
    skipped: list[str] = []
    for arg in session.get_outputs():
        if str(arg.type) not in ONNX_TYPES:
            skipped.append(f"{arg.name} ({arg.type})")
            continue
        # batched along with the inputs; row by row, as its first dimension says (none when
        # no input has a batch axis)
        batched = (None if any_batched else False) if per_row else True
        outputs.append(_tensor(path, "output", arg, batched))
    if skipped:
        logger.warning(
            "%s: not serving output(s) %s: ONNX Runtime gives them as Python sequences or maps, "
            "not arrays",
            path,
            ", ".join(skipped),
        )
    if not outputs:
        raise ModelLoadError(
            f"{path}: none of the graph's outputs is a tensor ({', '.join(skipped)}); serve it "
            "with a wrapper"
        )
    return inputs, outputs, per_row


def _tensor(path: Path, kind: str, arg: Any, batched: bool | None) -> _Tensor:
    """One graph input or output (an ONNX Runtime ``NodeArg``) as served.

    :param batched: whether its first dimension is the batch axis; None: when that dimension
        is symbolic or 1. A batched tensor's per-example shape drops that dimension.
    """
    shape = list(arg.shape or [])
    dynamic = bool(shape) and _dynamic(shape[0])
    if batched is None:
        batched = dynamic or (bool(shape) and shape[0] == 1)
    batched = batched and bool(shape)
    dtype = _dtype(path, kind, arg)
    dims = _dims(shape[1:] if batched else shape)
    return _Tensor(arg.name, TensorSpec(arg.name, dims, dtype), dtype, batched, dynamic)


def _override(
    path: Path, kind: str, graph: list[_Tensor], specs: Sequence[TensorSpec] | None
) -> list[_Tensor]:
    """``graph``'s tensors with serving.toml's ``[[input]]`` / ``[[output]]`` signature laid
    over them: by name when the tables name the graph's tensors, else by position."""
    if specs is None:
        return graph
    names = ", ".join(t.spec.describe() for t in graph)
    if len(specs) != len(graph):
        raise ModelLoadError(
            f"{path}: serving.toml gives {len(specs)} [[{kind}]] table(s), the graph has "
            f"{len(graph)} {kind}(s) ({names}); give one table per {kind}"
        )
    by_name = {t.graph: t for t in graph}
    if {s.name for s in specs} == set(by_name):
        matched = [(by_name[s.name], s) for s in specs]
    else:
        matched = list(zip(graph, specs, strict=True))
    out: list[_Tensor] = []
    for tensor, spec in matched:
        have = tensor.spec.shape
        fits = len(spec.shape) == len(have) and all(
            a is None or b is None or a == b for a, b in zip(spec.shape, have, strict=True)
        )
        if not fits:
            raise ModelLoadError(
                f"{path}: serving.toml's [[{kind}]] {spec.describe()} does not fit the graph's "
                f"{kind} {tensor.spec.describe()} (one example's shape, without the batch "
                "axis); fix the shape or remove the table"
            )
        out.append(dataclasses.replace(tensor, spec=spec))
    return out


def _feed(value: Any, dtype: np.dtype[Any] | None) -> Any:
    """``value`` as the graph's type, C-contiguous (what ONNX Runtime reads without a copy)."""
    arr = np.asarray(value)
    if dtype is None:  # strings: ONNX Runtime takes an object array of str
        return arr.astype(object, copy=False)
    return np.ascontiguousarray(arr, dtype=dtype)


def _batch_function(
    session: Any, inputs: list[_Tensor], outputs: list[_Tensor], per_row: bool
) -> BatchFunction:
    """The batch function of one session: served inputs (one array or a dict by input name)
    in, one array (one output) or a dict by output name out."""
    graph_types = {
        t.graph: None if t.graph_dtype == "string" else np.dtype(t.graph_dtype) for t in inputs
    }
    fetch = [t.graph for t in outputs]
    single = inputs[0].spec.name if len(inputs) == 1 else None

    def call(batch: Any) -> Any:
        arrays = {single: batch} if single is not None else batch
        feeds = {t.graph: _feed(arrays[t.spec.name], graph_types[t.graph]) for t in inputs}
        results = (
            _run_rows(session, feeds, inputs, outputs) if per_row else session.run(fetch, feeds)
        )
        if len(outputs) == 1:
            return results[0]
        return {t.spec.name: r for t, r in zip(outputs, results, strict=True)}

    return call


def _run_rows(
    session: Any, feeds: dict[str, Any], inputs: list[_Tensor], outputs: list[_Tensor]
) -> list[Any]:
    """Run a graph that takes one example per call on each row of ``feeds``, and stack."""
    fetch = [t.graph for t in outputs]
    rows = int(next(iter(feeds.values())).shape[0])
    answers: list[list[Any]] = [[] for _ in outputs]
    for i in range(rows):
        row = {
            t.graph: feeds[t.graph][i : i + 1] if t.batched else feeds[t.graph][i] for t in inputs
        }
        for acc, t, r in zip(answers, outputs, session.run(fetch, row), strict=True):
            acc.append(r if t.batched else np.asarray(r)[np.newaxis])
    return [np.concatenate(acc) for acc in answers]
