"""The Open Inference Protocol (KServe v2) REST API, beside ``POST /``.

Routes (``{name}`` is the experiment key; the only version is ``"1"``)::

    GET  /v2                                        server metadata
    GET  /v2/health/live                            200 while the process serves HTTP
    GET  /v2/health/ready                           200 once the model is loaded and warm, else 503
    GET  /v2/models/{name}[/versions/1]             model metadata (names, datatypes, shapes)
    GET  /v2/models/{name}[/versions/1]/ready       200 / 503
    POST /v2/models/{name}[/versions/1]/infer       inference, JSON or binary tensors
    GET  /v2/models/{name}[/versions/1]/config      Triton's model configuration extension
    GET  /v2/models[/{name}[/versions/1]]/stats     Triton's statistics extension

Inference requests become one :meth:`ModelService.predict` call, so they go through the same
:class:`~studioserve.pipelines.ModelPipe` as ``POST /`` and batch together with pickle
requests. Shapes in metadata carry the batch dimension first (``-1``), as Triton's do for
models with ``max_batch_size > 0``; a request may send ``n`` examples (``[n, *shape]``) or,
leniently, one example without the batch dimension.

The binary tensor data extension is supported both ways: a request whose
``Inference-Header-Content-Length`` header says how long its JSON part is may carry any input
as raw little-endian bytes after it (``"parameters": {"binary_data_size": N}``); outputs come
back binary when the request asks (``"parameters": {"binary_data_output": true}``, or
``"binary_data": true`` on a requested output), JSON otherwise. ``BYTES`` elements in binary
form are each a 4-byte little-endian length and the bytes. ``Content-Encoding: gzip`` or
``deflate`` request bodies are accepted.

Models without an input signature (the identity model, ``dict -> dict`` wrappers) take each
input as one key and answer with one output per input, named like it (or with the keys of the
dict they return for it).

Errors are ``{"error": "message"}`` with 400 (a bad request), 404 (no such model or version),
413 (too large), 500 (the model raised), 503 (not ready or overloaded) and 504 (deadline).
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from .errors import RequestFailed, StudioServeError

if TYPE_CHECKING:
    from flask import Flask, Response

    from .loader import TensorSpec
    from .server import AppState

logger = logging.getLogger(__name__)

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "InferRequest",
    "RequestedOutput",
    "datatype_of",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "register",
]

#: The header that gives the length of the JSON part of a body with binary tensors.
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
#: The only model version this server has.
VERSION: Final = "1"
#: Protocol datatypes and the numpy dtype of each (little-endian; ``BYTES``: object arrays of
#: ``bytes``).
DATATYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_NUMPY: Final[dict[tuple[str, int], str]] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"
}
#: Triton model-configuration names of the datatypes (``TYPE_STRING`` is ``BYTES``).
CONFIG_TYPES: Final[dict[str, str]] = {
    name: ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}") for name in DATATYPES
}
_EXTENSIONS: Final = ["binary_tensor_data", "model_configuration", "statistics"]
_STATUS_FOR: Final[dict[int, int]] = {415: 400, 422: 400, 406: 400}
_LENGTH: Final = struct.Struct("<I")


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol datatype of a numpy dtype.

    :raises ValueError: for a dtype the protocol cannot carry (complex numbers, records, ...).
    """
    if dtype.kind in "OSU":
        return "BYTES"
    name = _BY_NUMPY.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise ValueError(f"the Open Inference Protocol has no datatype for numpy {dtype}")
    return name


def _bad(message: str, status: int = 400) -> RequestFailed:
    return RequestFailed(message, status=status, error_type="bad_request")


# -- tensors -------------------------------------------------------------------------------------


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(
            f"input {name!r}: 'shape' must be a list of non-negative integers, not {shape!r}"
        )
    return tuple(shape)


def _bytes_elements(name: str, raw: memoryview) -> list[bytes]:
    """``BYTES`` elements from their binary form (4-byte little-endian length, then bytes)."""
    out: list[bytes] = []
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + 4 > end:
            raise _bad(f"input {name!r}: BYTES data ends inside a 4-byte length prefix")
        (n,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise _bad(
                f"input {name!r}: a BYTES element says it has {n} bytes but only "
                f"{end - pos} are left"
            )
        out.append(bytes(raw[pos : pos + n]))
        pos += n
    return out


def serialize_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    """The binary form of a ``BYTES`` tensor: each element's length (4 bytes, LE) and bytes."""
    parts: list[bytes] = []
    for v in arr.reshape(-1).tolist():
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts.append(_LENGTH.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], raw: memoryview) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _bytes_elements(name, raw)
        if len(items) != count:
            raise _bad(
                f"input {name!r}: shape {list(shape)} has {count} elements but the binary "
                f"data holds {len(items)} BYTES elements"
            )
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = DATATYPES[datatype]
    if len(raw) != count * dt.itemsize:
        raise _bad(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dt.itemsize} "
            f"bytes but binary_data_size is {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dt).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=False)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    values = _flatten(data)
    count = math.prod(shape)
    if len(values) != count:
        raise _bad(
            f"input {name!r}: shape {list(shape)} has {count} elements but 'data' has {len(values)}"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _bad(f"input {name!r}: BYTES data in JSON must be strings")
        arr = np.empty(count, dtype=object)
        arr[:] = [v.encode("utf-8") for v in values]
        return arr.reshape(shape)
    dt = DATATYPES[datatype]
    if dt.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise _bad(f"input {name!r}: BOOL data must be true or false")
    elif dt.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _bad(f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dt)
        if values and (min(values) < info.min or max(values) > info.max):
            raise _bad(f"input {name!r}: a value is out of the range of {datatype}")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise _bad(f"input {name!r}: {datatype} data must be numbers")
    try:
        arr = np.array(values, dtype=dt.newbyteorder("="))
    except (ValueError, TypeError, OverflowError) as e:
        raise _bad(f"input {name!r}: cannot read the data as {datatype}: {e}") from None
    return arr.reshape(shape)


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of an inference request's ``outputs``: a name, and whether it wants binary
    data (None: the request's default)."""

    name: str
    binary: bool | None = None


@dataclass
class InferRequest:
    """A decoded inference request.

    :ivar inputs: input name -> array, in request order.
    :ivar outputs: the requested outputs, or None for all.
    :ivar binary_output: the default for outputs without their own ``binary_data``.
    :ivar timeout: seconds, from the ``timeout`` parameter (microseconds), or None.
    """

    inputs: dict[str, np.ndarray[Any, Any]]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    timeout: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _header_length(value: str | None, body_len: int) -> int:
    if value is None:
        return body_len
    try:
        n = int(value)
    except ValueError:
        raise _bad(f"{HEADER_LENGTH} must be an integer, not {value!r}") from None
    if not 0 < n <= body_len:
        raise _bad(f"{HEADER_LENGTH} is {n} but the body has {body_len} bytes")
    return n


def _params(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    return params


def decode_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Decode an inference request body (JSON, or JSON followed by binary tensor data).

    :param body: the whole request body.
    :param header_length: the ``Inference-Header-Content-Length`` header, if any.
    :raises RequestFailed: (400) for anything malformed; the message says what.
    """
    n = _header_length(header_length, len(body))
    try:
        doc = json.loads(body[:n])
    except (ValueError, RecursionError) as e:
        hint = "" if header_length else f" (a body with binary tensors needs {HEADER_LENGTH})"
        raise _bad(f"the request is not valid JSON: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise _bad("the request must be a JSON object with an 'inputs' list")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("the request must have a non-empty 'inputs' list")
    params = _params(doc, "the request")
    binary = memoryview(body)[n:]
    offset = 0
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _bad(f"inputs[{i}] must be an object with a string 'name'")
        name = t["name"]
        if name in inputs:
            raise _bad(f"input {name!r} appears twice")
        datatype = t.get("datatype")
        if datatype not in DATATYPES:
            raise _bad(
                f"input {name!r}: unsupported datatype {datatype!r}; use one of "
                f"{', '.join(DATATYPES)}"
            )
        shape = _check_shape(name, t.get("shape"))
        tparams = _params(t, f"input {name!r}")
        if "shared_memory_region" in tparams:
            raise _bad(f"input {name!r}: shared memory is not supported; send the data")
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise _bad(
                    f"input {name!r}: binary_data_size is {size} but only "
                    f"{len(binary) - offset} bytes of binary data are left"
                )
            inputs[name] = _from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in t:
            inputs[name] = _from_json(name, datatype, shape, t["data"])
        else:
            raise _bad(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise _bad(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims "
            "(check binary_data_size)"
        )
    outputs: list[RequestedOutput] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise _bad("'outputs' must be a list")
        outputs = []
        for i, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise _bad(f"outputs[{i}] must be an object with a string 'name'")
            oparams = _params(o, f"output {o['name']!r}")
            if oparams.get("classification"):
                raise _bad(f"output {o['name']!r}: classification is not supported")
            if "shared_memory_region" in oparams:
                raise _bad(f"output {o['name']!r}: shared memory is not supported")
            want = oparams.get("binary_data")
            outputs.append(RequestedOutput(o["name"], None if want is None else bool(want)))
    timeout = params.get("timeout")
    request_id = doc.get("id")
    return InferRequest(
        inputs=inputs,
        id=str(request_id) if request_id is not None else None,
        outputs=outputs,
        binary_output=bool(params.get("binary_data_output", False)),
        timeout=(
            timeout / 1e6
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
            else None
        ),
        parameters=params,
    )


def _output_array(name: str, value: Any) -> tuple[np.ndarray[Any, Any], str]:
    arr = np.asarray(value)
    if arr.dtype.kind in "SU":
        flat = np.empty(arr.size, dtype=object)
        flat[:] = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.ravel()]
        arr = flat.reshape(arr.shape)
    elif arr.dtype.kind == "O" and not all(
        isinstance(v, (bytes, str)) for v in arr.reshape(-1).tolist()
    ):
        raise RequestFailed(
            f"output {name!r} is an object array that is not all bytes or strings; the model "
            "must return arrays of numbers, bools or strings",
            status=500,
            error_type="unencodable_response",
        )
    try:
        datatype = datatype_of(arr.dtype)
    except ValueError as e:
        raise RequestFailed(
            f"output {name!r}: {e}", status=500, error_type="unencodable_response"
        ) from None
    return arr, datatype


def encode_infer_response(
    model_name: str,
    outputs: Mapping[str, Any],
    *,
    binary: Mapping[str, bool] | bool = False,
    request_id: str | None = None,
    model_version: str = VERSION,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference response as ``(body, headers)``.

    :param outputs: output name -> array, in the order to send.
    :param binary: which outputs go as binary data (one bool for all).
    :raises RequestFailed: (500) for an output the protocol cannot carry.
    """
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in outputs.items():
        arr, datatype = _output_array(name, value)
        as_binary = binary if isinstance(binary, bool) else binary.get(name, False)
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if as_binary:
            if datatype == "BYTES":
                raw = serialize_bytes(arr)
            else:
                raw = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            try:
                t["data"] = [v.decode("utf-8") for v in arr.reshape(-1).tolist()]
            except UnicodeDecodeError:
                raise _bad(
                    f"output {name!r} holds bytes that are not UTF-8, which JSON cannot carry; "
                    "ask for it with binary_data: true"
                ) from None
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = tensors
    head = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *chunks]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
    }


def encode_infer_request(
    inputs: Mapping[str, Any],
    *,
    binary: bool = True,
    outputs: Sequence[str] | None = None,
    binary_output: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference request as ``(body, headers)`` (the client side; used by
    ``studio bench``).

    :param inputs: input name -> array (its shape is sent as is: include the batch dimension).
    :param binary: send tensors as binary data (else as JSON lists).
    :param outputs: the outputs to ask for (None: all).
    :param binary_output: ask for outputs as binary data.
    """
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in inputs.items():
        arr, datatype = _output_array(name, value)
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = (
                serialize_bytes(arr)
                if datatype == "BYTES"
                else np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            )
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            t["data"] = [v.decode("utf-8") for v in arr.reshape(-1).tolist()]
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    doc["inputs"] = tensors
    if outputs is not None:
        doc["outputs"] = [
            {"name": o, "parameters": {"binary_data": binary_output}} for o in outputs
        ]
    elif binary_output:
        doc["parameters"] = {"binary_data_output": True}
    head = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if chunks:
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


def decode_infer_response(body: bytes, header_length: str | None = None) -> dict[str, Any]:
    """Decode an inference response into ``{"outputs": {name: array}, ...}`` (client side).

    :raises RequestFailed: (400) for a malformed body.
    """
    n = _header_length(header_length, len(body))
    try:
        doc = json.loads(body[:n])
    except ValueError as e:
        raise _bad(f"the response is not valid JSON: {e}") from None
    binary = memoryview(body)[n:]
    offset = 0
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for t in doc.get("outputs", []):
        name, datatype, shape = t["name"], t["datatype"], tuple(t["shape"])
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[name] = _from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            arrays[name] = _from_json(name, datatype, shape, t.get("data", []))
    doc["outputs"] = arrays
    return dict(doc)


# -- statistics ----------------------------------------------------------------------------------


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStatistics:
    """Triton-style statistics for the model, fed by request observers and pipe batch events.

    ``success``/``fail`` count requests (every inference route, pickle and OIP alike) and their
    end-to-end time. ``queue`` and ``compute_infer`` count the items of the model stage (its
    batching stage with the largest batch bound): time in the stage's queue, and the compute
    time of the batch each ran in. ``inference_count`` is rows computed, ``execution_count``
    model calls (batches). Models without a pipe count each successful request as one
    execution whose compute time is the request's time. ``compute_input`` and
    ``compute_output`` are not measured separately (their time is 0; their counts follow
    ``compute_infer``, as perf_analyzer divides by them).
    """

    def __init__(self, model_stage: str | None) -> None:
        self.model_stage = model_stage
        self._lock = threading.Lock()
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_infer = _Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, _Duration] = {}

    def on_request(self, route: str, status: int, seconds: float) -> None:
        if status == 404:  # asked for another model: not this one's failure
            return
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            if status == 200:
                self.success.add(seconds)
                if self.model_stage is None:
                    self.inference_count += 1
                    self.execution_count += 1
                    self.compute_infer.add(seconds)
                    self.batches.setdefault(1, _Duration()).add(seconds)
            else:
                self.fail.add(seconds)

    def on_batch(self, event: Any) -> None:
        if event.stage != self.model_stage:
            return
        waits: Sequence[float] = event.queue_waits
        with self._lock:
            self.queue.add(sum(waits), len(waits))
            self.compute_infer.add(event.compute_seconds * event.size, event.size)
            self.inference_count += event.rows
            self.execution_count += 1
            self.batches.setdefault(event.rows, _Duration()).add(event.compute_seconds)

    def json(self, name: str) -> dict[str, Any]:
        with self._lock:
            infer = self.compute_infer.json()
            zero = {"count": infer["count"], "ns": 0}
            return {
                "name": name,
                "version": VERSION,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.json(),
                    "fail": self.fail.json(),
                    "queue": self.queue.json(),
                    "compute_input": dict(zero),
                    "compute_infer": infer,
                    "compute_output": dict(zero),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": {"count": d.count, "ns": 0},
                        "compute_infer": d.json(),
                        "compute_output": {"count": d.count, "ns": 0},
                    }
                    for size, d in sorted(self.batches.items())
                ],
                "memory_usage": [],
            }


def model_stage(pipe: Any) -> str | None:
    """The name of a pipe's model stage: its batching stage with the largest batch bound
    (ties: the last), else its last stage; None without a pipe or stages."""
    if pipe is None:
        return None
    try:
        stages = list(pipe.stats().stages.values())
    except Exception:  # a pipe without stats: not ours
        logger.debug("pipe %r has no stats()", pipe, exc_info=True)
        return None
    if not stages:
        return None
    best = stages[-1]
    for s in stages:
        if s.batching and (not best.batching or s.max_batch_size >= best.max_batch_size):
            best = s
    return str(best.name)


# -- routes ----------------------------------------------------------------------------------


def _dims(shape: Sequence[int | None]) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def _spec_datatype(spec: TensorSpec) -> str:
    try:
        return datatype_of(np.dtype(spec.dtype))
    except (TypeError, ValueError):
        return "BYTES" if spec.dtype in ("string", "str", "object") else "FP32"


class _Api:
    """The state of the OIP routes of one app."""

    def __init__(self, state: AppState, max_body: int | None) -> None:
        self.state = state
        self.max_body = max_body
        self.name = str(state.info.get("experiment") or "model")
        service = state.service
        self.pipe = service.model.pipe
        self.stats = ModelStatistics(model_stage(self.pipe))
        state.observers.append(self.stats.on_request)
        if self.pipe is not None and self.stats.model_stage is not None:
            self.pipe.add_listener(self.stats.on_batch)

    # -- facts -----------------------------------------------------------------------------------
    @property
    def batched(self) -> bool:
        return self.pipe is not None and bool(self.state.service.inputs)

    def max_batch_size(self) -> int:
        if not self.batched:
            return 0
        return int(getattr(self.pipe, "max_batch_size", 0) or 0)

    def _tensor_meta(self, specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        batch = [-1] if self.batched else []
        return [
            {"name": s.name, "datatype": _spec_datatype(s), "shape": batch + _dims(s.shape)}
            for s in specs
        ]

    def metadata(self) -> dict[str, Any]:
        model = self.state.service.model
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": f"studioserve_{model.kind}",
            "inputs": self._tensor_meta(model.inputs),
            "outputs": self._tensor_meta(model.outputs),
        }

    def config(self) -> dict[str, Any]:
        model = self.state.service.model
        batching = self.state.info.get("batching") or {}
        delay_ms = float(batching.get("max_delay_ms") or 0.0)
        preferred: list[int] = []
        # ModelPipe's stats do not carry these two settings; read them off the model stage's
        # queue when the pipe has one (wrapper pipes set their own, not the server's).
        for stage in getattr(self.pipe, "_stages", None) or []:
            if getattr(stage, "name", None) == self.stats.model_stage:
                queue = getattr(stage, "queue", None)
                preferred = list(getattr(queue, "preferred_batch_sizes", ()) or ())
                delay_ms = float(getattr(queue, "max_delay", delay_ms / 1000)) * 1000

        def tensors(specs: Sequence[TensorSpec], output: bool) -> list[dict[str, Any]]:
            out = []
            for s in specs:
                t: dict[str, Any] = {
                    "name": s.name,
                    "data_type": CONFIG_TYPES[_spec_datatype(s)],
                    "dims": _dims(s.shape),
                    "is_shape_tensor": False,
                }
                if output:
                    t["label_filename"] = ""
                else:
                    t.update(format="FORMAT_NONE", allow_ragged_batch=False, optional=False)
                out.append(t)
            return out

        cfg: dict[str, Any] = {
            "name": self.name,
            "platform": "",
            "backend": "studioserve",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": self.max_batch_size(),
            "input": tensors(model.inputs, False),
            "output": tensors(model.outputs, True),
            "batch_input": [],
            "batch_output": [],
            "instance_group": [{"name": f"{self.name}_0", "kind": "KIND_CPU", "count": 1}],
            "default_model_filename": model.source,
            "parameters": {"studioserve_kind": {"string_value": model.kind}},
            "model_warmup": [],
            "model_transaction_policy": {"decoupled": False},
        }
        if self.batched:
            cfg["dynamic_batching"] = {
                "preferred_batch_size": preferred,
                "max_queue_delay_microseconds": int(round(delay_ms * 1000)),
                "preserve_ordering": False,
                "priority_levels": 0,
                "default_priority_level": 0,
            }
        return cfg

    # -- inference -------------------------------------------------------------------------------
    def to_service(self, req: InferRequest) -> dict[str, Any]:
        specs = self.state.service.inputs
        if not specs:
            return dict(req.inputs)
        names = [s.name for s in specs]
        unknown = [n for n in req.inputs if n not in names]
        missing = [n for n in names if n not in req.inputs]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            raise _bad(
                f"{'; '.join(parts)}: model {self.name!r} takes {', '.join(map(repr, names))}"
            )
        if len(specs) == 1:
            return {names[0]: req.inputs[names[0]]}
        return {"request": {n: req.inputs[n] for n in names}}

    def from_service(self, result: dict[str, Any]) -> dict[str, Any]:
        service = self.state.service
        out: dict[str, Any] = {}
        if not service.inputs:
            for key, value in result.items():
                if isinstance(value, dict):
                    out.update(value)
                else:
                    out[key] = value
            return out
        names = [s.name for s in service.outputs]
        for value in result.values():
            if isinstance(value, dict):
                out.update(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
                for i, v in enumerate(value):
                    out[names[i] if i < len(names) else f"output_{i}"] = v
            else:
                out[names[0] if names else "output_0"] = value
        return out

    def select(
        self, req: InferRequest, outputs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, bool]]:
        if req.outputs is None:
            return outputs, dict.fromkeys(outputs, req.binary_output)
        chosen: dict[str, Any] = {}
        binary: dict[str, bool] = {}
        for o in req.outputs:
            if o.name not in outputs:
                raise _bad(
                    f"unknown output {o.name!r}: model {self.name!r} returns "
                    f"{', '.join(map(repr, outputs)) or 'no outputs'}"
                )
            chosen[o.name] = outputs[o.name]
            binary[o.name] = req.binary_output if o.binary is None else o.binary
        return chosen, binary


def _decompress(body: bytes, encoding: str, limit: int | None) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise _bad(f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or none")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit or 0)
    except zlib.error as e:
        raise _bad(f"cannot decompress the {encoding} body: {e}") from None
    if d.unconsumed_tail:
        raise RequestFailed(
            f"the decompressed request is larger than the limit of {limit} bytes",
            status=413,
            error_type="too_large",
        )
    return out


def register(app: Flask, state: AppState) -> None:
    """Add the Open Inference Protocol routes to ``app``."""
    from flask import Response, request
    from werkzeug.exceptions import RequestEntityTooLarge

    from . import __version__

    max_body = app.config.get("MAX_CONTENT_LENGTH")
    api = _Api(state, max_body)
    app.extensions["studioserve.oip"] = api

    def reply(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        resp = Response(
            json.dumps(doc, separators=(",", ":")), status=status, mimetype="application/json"
        )
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    def error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
        return reply({"error": message}, status, headers)

    def not_ready() -> Response:
        return error("the model is not loaded yet", 503, {"Retry-After": "1"})

    def check_model(name: str, version: str | None) -> Response | None:
        if name != api.name:
            return error(f"unknown model {name!r}; this server serves {api.name!r}", 404)
        if version is not None and version != VERSION:
            return error(
                f"unknown version {version!r} of model {name!r}; the only version is {VERSION!r}",
                404,
            )
        return None

    def route(rule: str, endpoint: str, fn: Callable[..., Response], method: str) -> None:
        app.add_url_rule(rule, f"oip_{endpoint}", fn, methods=[method])
        if "<name>" in rule:
            versioned = rule.replace("<name>", "<name>/versions/<version>", 1)
            app.add_url_rule(versioned, f"oip_{endpoint}_v", fn, methods=[method])

    def server_metadata() -> Response:
        return reply({"name": "studioserve", "version": __version__, "extensions": _EXTENSIONS})

    def live() -> Response:
        return reply({"live": True})

    def ready() -> Response:
        if not state.service.ready:
            return not_ready()
        return reply({"ready": True})

    def model_metadata(name: str, version: str | None = None) -> Response:
        return check_model(name, version) or reply(api.metadata())

    def model_ready(name: str, version: str | None = None) -> Response:
        bad = check_model(name, version)
        if bad is not None:
            return bad
        if not state.service.ready:
            return not_ready()
        return reply({"name": api.name, "ready": True})

    def model_config(name: str, version: str | None = None) -> Response:
        return check_model(name, version) or reply(api.config())

    def model_stats(name: str | None = None, version: str | None = None) -> Response:
        if name is not None:
            bad = check_model(name, version)
            if bad is not None:
                return bad
        return reply({"model_stats": [api.stats.json(api.name)]})

    def infer(name: str, version: str | None = None) -> Response:
        start = time.perf_counter()
        resp = _infer(name, version)
        state.observe("/v2/models/infer", resp.status_code, time.perf_counter() - start)
        return resp

    def _infer(name: str, version: str | None) -> Response:
        bad = check_model(name, version)
        if bad is not None:
            return bad
        service = state.service
        if not service.ready:
            return not_ready()
        length = request.content_length
        if max_body is not None and length is not None and length > max_body:
            return error(
                f"request body of {length} bytes is larger than the limit of {max_body} bytes; "
                "send fewer examples per request or start the server with a larger --max-body",
                413,
            )
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            return error(f"request body is larger than the limit of {max_body} bytes", 413)
        try:
            encoding = request.headers.get("Content-Encoding", "").strip().lower()
            if encoding and encoding != "identity":
                body = _decompress(body, encoding, max_body)
            req = decode_infer_request(body, request.headers.get(HEADER_LENGTH))
            data = api.to_service(req)
        except RequestFailed as e:
            return error(str(e), _STATUS_FOR.get(e.http_status, e.http_status))
        service.activity.begin()
        try:
            result = service.predict(data, timeout=req.timeout)
            outputs, binary = api.select(req, api.from_service(result))
            payload, headers = encode_infer_response(
                api.name, outputs, binary=binary, request_id=req.id
            )
        except RequestFailed as e:
            extra = {"Retry-After": f"{max(1, round(e.retry_after))}"} if e.retry_after else None
            return error(_message(e), _STATUS_FOR.get(e.http_status, e.http_status), extra)
        except StudioServeError as e:
            return error(str(e), _STATUS_FOR.get(e.http_status, e.http_status))
        finally:
            service.activity.end()
        resp = Response(payload, status=200)
        for k, v in headers.items():
            resp.headers[k] = v
        return resp

    route("/v2", "server_metadata", server_metadata, "GET")
    route("/v2/health/live", "live", live, "GET")
    route("/v2/health/ready", "ready", ready, "GET")
    route("/v2/models/stats", "all_stats", model_stats, "GET")
    route("/v2/models/<name>", "model_metadata", model_metadata, "GET")
    route("/v2/models/<name>/ready", "model_ready", model_ready, "GET")
    route("/v2/models/<name>/config", "model_config", model_config, "GET")
    route("/v2/models/<name>/stats", "model_stats", model_stats, "GET")
    route("/v2/models/<name>/infer", "infer", infer, "POST")


def _message(e: RequestFailed) -> str:
    """The error message with the per-key details the service gave (keys are input names)."""
    msg = str(e)
    extra = [m for m in e.keys.values() if m not in msg]
    return "; ".join([msg, *extra]) if extra else msg
