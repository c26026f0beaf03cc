"""The Open Inference Protocol (KServe v2) bodies: inference requests and responses.

A body is JSON (``{"inputs": [{"name", "datatype", "shape", "data"}, ...]}``; responses carry
``"outputs"``), optionally followed by binary tensor data (the binary tensor data extension):
when the ``Inference-Header-Content-Length`` header (:data:`HEADER_LENGTH`) says how long the
JSON part is, any tensor may be sent as raw little-endian bytes after it, its JSON entry saying
``"parameters": {"binary_data_size": N}`` instead of ``"data"``. Binary tensors follow one another
in the order of their JSON entries. A request asks for binary outputs with
``"parameters": {"binary_data_output": true}``, or ``"binary_data": true`` on a requested output;
otherwise outputs come back as JSON lists. ``BYTES`` elements in binary form are each a 4-byte
little-endian length and the bytes (:func:`serialize_bytes`); in JSON they are strings.
``Content-Encoding: gzip`` or ``deflate`` request bodies are read with :func:`decompress`.

Triton's raw binary request (:func:`decode_raw_request`) has no JSON part at all: with
``Inference-Header-Content-Length: 0`` the body is the raw bytes of a single-input model's one
input, its datatype and shape taken from the model's signature (the one variable dimension,
usually the batch, deduced from the body's length); a model with several inputs, or a shape
with more than one variable dimension, cannot be sent that way (400). Its outputs all come back
as binary data.

A request is decoded within one decode budget (:mod:`studioserve.wire.budget`), the budget of
its body as it came over the wire: the decompressed body, what its JSON part will build and
every tensor are charged before they are made (413 past it), a request may name at most
``max_keys`` inputs and ``max_keys`` outputs, and its JSON may hold at most
``8 * max_keys`` keys. A shape whose dimensions (zeros counted as 1) span more elements than
the budget holds bytes is refused (400), empty or not.

Both sides are here: the server's (:func:`decode_infer_request`, :func:`encode_infer_response`)
and the client's (:func:`encode_infer_request`, :func:`decode_infer_response`, used by
``studio bench`` and the tests). Nothing here does IO or knows Flask; every malformed body is a
:class:`~studioserve.errors.RequestFailed` (400, type ``bad_request``) whose message says what
is wrong; an output no protocol datatype fits is one with status 500.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ..errors import DecodedTooLarge, RequestFailed, TooLarge, TooManyKeys, UnsafePickle
from ..tensors import TensorSpec
from ._checks import check_extent, short_repr
from ._json import charge_json
from .budget import Budget, DecodeLimits

__all__ = [
    "CONFIG_TYPES",
    "DATATYPES",
    "HEADER_LENGTH",
    "VERSION",
    "InferRequest",
    "RequestedOutput",
    "bad_request",
    "check_shape",
    "datatype_of",
    "decode_infer_request",
    "decode_infer_response",
    "decode_raw_request",
    "decompress",
    "encode_infer_request",
    "encode_infer_response",
    "output_array",
    "serialize_bytes",
    "spec_datatype",
    "tensor_from_raw",
    "tensor_to_raw",
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
_LENGTH: Final = struct.Struct("<I")
#: How many JSON keys a request may hold per ``max_keys`` (each input takes a handful).
JSON_KEYS_PER_INPUT: Final = 8
_ARRAY: Final = 112  # a numpy array object without its data
_BYTES_ELEMENT: Final = 56  # a bytes object's header, its list slot and its object-array slot
_ZLIB_SCRATCH: Final = 1 << 16  # a decompressor's window and state


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


def spec_datatype(spec: TensorSpec) -> str:
    """The protocol datatype of a signature entry (``FP32`` when its dtype is unknown)."""
    try:
        return datatype_of(np.dtype(spec.dtype))
    except (TypeError, ValueError):
        return "BYTES" if spec.dtype in ("string", "str", "object") else "FP32"


def bad_request(message: str, status: int = 400) -> RequestFailed:
    """The error for a malformed body (or request): :class:`RequestFailed`, type ``bad_request``."""
    return RequestFailed(message, status=status, error_type="bad_request")


# -- tensors -------------------------------------------------------------------------------------


def check_shape(name: str, shape: Any, budget: Budget) -> tuple[int, ...]:
    """``shape`` as a tuple, checked: a list of at most 64 non-negative integers that spans no
    more elements than ``budget`` holds bytes.

    :raises RequestFailed: (400) otherwise.
    """
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad_request(
            f"input {name!r}: 'shape' must be a list of at most 64 non-negative integers, "
            f"not {_short(shape)}"
        )
    try:
        check_extent(tuple(shape), budget.limit)
    except UnsafePickle as e:
        raise bad_request(f"input {name!r}: {e}") from None
    return tuple(shape)


def _short(value: Any, limit: int = 80) -> str:
    return short_repr(value, limit)


def _bytes_elements(name: str, raw: memoryview | bytes) -> list[bytes]:
    """``BYTES`` elements from their binary form (4-byte little-endian length, then bytes)."""
    out: list[bytes] = []
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + 4 > end:
            raise bad_request(f"input {name!r}: BYTES data ends inside a 4-byte length prefix")
        (n,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise bad_request(
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


def tensor_to_raw(arr: np.ndarray[Any, Any], datatype: str) -> bytes:
    """The binary form of a tensor of ``datatype`` (:func:`output_array` gives both)."""
    if datatype == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()


def tensor_from_raw(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    raw: memoryview | bytes,
    budget: Budget | None = None,
) -> np.ndarray:
    """One input tensor from its binary form (the binary data extension, gRPC's
    ``raw_input_contents``), charged to ``budget`` first; a view of ``raw`` when no byte order
    changes.

    :raises RequestFailed: (400) when the bytes do not hold ``shape`` of ``datatype``.
    """
    count = math.prod(shape)
    if budget is not None:
        elements = len(raw) // 4 + 1 if datatype == "BYTES" else 0
        budget.charge(_ARRAY + len(raw) + elements * _BYTES_ELEMENT, f"input {name!r}")
    if datatype == "BYTES":
        items = _bytes_elements(name, raw)
        if len(items) != count:
            raise bad_request(
                f"input {name!r}: shape {list(shape)} has {count} elements but the binary "
                f"data holds {len(items)} BYTES elements"
            )
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = DATATYPES[datatype]
    if len(raw) != count * dt.itemsize:
        raise bad_request(
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


def _from_json(
    name: str, datatype: str, shape: tuple[int, ...], data: Any, budget: Budget | None = None
) -> np.ndarray:
    values = _flatten(data)
    count = math.prod(shape)
    if budget is not None:
        # the flat list, and the array (or, for BYTES, a bytes object per string)
        per = 8 + (_BYTES_ELEMENT if datatype == "BYTES" else DATATYPES[datatype].itemsize)
        budget.charge(_ARRAY + per * len(values), f"input {name!r}")
    if len(values) != count:
        raise bad_request(
            f"input {name!r}: shape {list(shape)} has {count} elements but 'data' has {len(values)}"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise bad_request(f"input {name!r}: BYTES data in JSON must be strings")
        if budget is not None:
            budget.charge(4 * sum(map(len, values)), f"input {name!r}")
        arr = np.empty(count, dtype=object)
        arr[:] = [v.encode("utf-8") for v in values]
        return arr.reshape(shape)
    dt = DATATYPES[datatype]
    if dt.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise bad_request(f"input {name!r}: BOOL data must be true or false")
    elif dt.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise bad_request(f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dt)
        if values and (min(values) < info.min or max(values) > info.max):
            raise bad_request(f"input {name!r}: a value is out of the range of {datatype}")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise bad_request(f"input {name!r}: {datatype} data must be numbers")
    try:
        with np.errstate(over="ignore"):  # a float beyond FP16/FP32 is inf, as in IEEE 754
            arr = np.array(values, dtype=dt.newbyteorder("="))
    except (ValueError, TypeError, OverflowError) as e:
        raise bad_request(f"input {name!r}: cannot read the data as {datatype}: {e}") from None
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
        raise bad_request(f"{HEADER_LENGTH} must be an integer, not {value!r}") from None
    if not 0 < n <= body_len:
        raise bad_request(f"{HEADER_LENGTH} is {n} but the body has {body_len} bytes")
    return n


def _params(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"{where}: 'parameters' must be an object")
    return params


def decode_infer_request(
    body: bytes,
    header_length: str | None = None,
    *,
    limits: DecodeLimits | None = None,
    content_encoding: str | None = None,
) -> InferRequest:
    """Decode an inference request body (JSON, or JSON followed by binary tensor data).

    :param body: the whole request body, as it came over the wire.
    :param header_length: the ``Inference-Header-Content-Length`` header, if any (the length
        of the JSON part of the decompressed body).
    :param limits: the server's limits (``--max-body``, ``--max-keys``); None: the defaults.
        The budget is that of ``len(body)``; a decompressed body may not exceed
        ``limits.max_body`` either.
    :param content_encoding: the ``Content-Encoding`` header: ``gzip``, ``deflate``,
        ``identity`` or None.
    :raises RequestFailed: (400) for anything malformed; the message says what.
    :raises TooLarge: (413) for a decompressed body over ``limits.max_body``.
    :raises DecodedTooLarge: (413) for a body that would build more than its budget.
    :raises TooManyKeys: (413) for more inputs or outputs than ``limits.max_keys``, or a JSON
        part with more than ``8 * limits.max_keys`` keys.
    """
    limits = limits or DecodeLimits()
    budget = limits.budget(len(body))
    encoding = (content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        body = decompress(body, encoding, limits.max_body, budget=budget)
    n = _header_length(header_length, len(body))
    head = body if n == len(body) else body[:n]
    if head is not body:
        budget.charge(n, "the request's JSON part")
    try:
        charge_json(
            head, budget, max_keys=JSON_KEYS_PER_INPUT * limits.max_keys, what="the request"
        )
        doc = json.loads(head)
    except (DecodedTooLarge, TooManyKeys):
        raise
    except (ValueError, RecursionError) as e:
        hint = "" if header_length else f" (a body with binary tensors needs {HEADER_LENGTH})"
        raise bad_request(f"the request is not valid JSON: {_short(e, 200)}{hint}") from None
    del head
    if not isinstance(doc, dict):
        raise bad_request("the request must be a JSON object with an 'inputs' list")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("the request must have a non-empty 'inputs' list")
    if len(raw_inputs) > limits.max_keys:
        raise TooManyKeys(limits.max_keys, len(raw_inputs), what="the request's 'inputs'")
    params = _params(doc, "the request")
    binary = memoryview(body)[n:]
    offset = 0
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad_request(f"inputs[{i}] must be an object with a string 'name'")
        name = t["name"]
        if name in inputs:
            raise bad_request(f"input {_short(name)} appears twice")
        datatype = t.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise bad_request(
                f"input {_short(name)}: unsupported datatype {_short(datatype)}; use one of "
                f"{', '.join(DATATYPES)}"
            )
        shape = check_shape(name, t.get("shape"), budget)
        tparams = _params(t, f"input {name!r}")
        if "shared_memory_region" in tparams:
            raise bad_request(f"input {name!r}: shared memory is not supported; send the data")
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(
                    f"input {name!r}: binary_data_size must be a non-negative integer"
                )
            if offset + size > len(binary):
                raise bad_request(
                    f"input {name!r}: binary_data_size is {size} but only "
                    f"{len(binary) - offset} bytes of binary data are left"
                )
            inputs[name] = tensor_from_raw(
                name, datatype, shape, binary[offset : offset + size], budget
            )
            offset += size
        elif "data" in t:
            inputs[name] = _from_json(name, datatype, shape, t["data"], budget)
        else:
            raise bad_request(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise bad_request(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims "
            "(check binary_data_size)"
        )
    outputs: list[RequestedOutput] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise bad_request("'outputs' must be a list")
        if len(raw_outputs) > limits.max_keys:
            raise TooManyKeys(limits.max_keys, len(raw_outputs), what="the request's 'outputs'")
        outputs = []
        for i, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise bad_request(f"outputs[{i}] must be an object with a string 'name'")
            oparams = _params(o, f"output {o['name']!r}")
            if oparams.get("classification"):
                raise bad_request(f"output {o['name']!r}: classification is not supported")
            if "shared_memory_region" in oparams:
                raise bad_request(f"output {o['name']!r}: shared memory is not supported")
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


def decode_raw_request(
    body: bytes,
    spec: TensorSpec,
    *,
    batched: bool,
    limits: DecodeLimits | None = None,
    content_encoding: str | None = None,
) -> InferRequest:
    """Decode Triton's raw binary request: the whole body is the one input's raw bytes
    (``Inference-Header-Content-Length: 0``), for a model whose only input is ``spec``.

    The datatype is the signature's; the shape is ``[n, *spec.shape]`` for a ``batched``
    model (else ``spec.shape``), and its one variable dimension (the batch, or a ``None`` in
    ``spec.shape``) is deduced from the body's length. A ``BYTES`` input must take one element
    per request (the body is that element, without a length prefix). Every output is asked
    for as binary data.

    :raises RequestFailed: (400) for an empty body, a shape with more than one variable
        dimension, or a length that is not a whole number of elements of the shape.
    :raises TooLarge: (413) for a decompressed body over ``limits.max_body``.
    :raises DecodedTooLarge: (413) for a body over its decode budget.
    """
    limits = limits or DecodeLimits()
    budget = limits.budget(len(body))
    encoding = (content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        body = decompress(body, encoding, limits.max_body, budget=budget)
    name = spec.name
    dims: list[int | None] = [None] if batched else []
    dims += spec.shape
    shown = [-1 if d is None else d for d in dims]
    if not body:
        raise bad_request(
            f"a raw binary request ({HEADER_LENGTH}: 0) needs a body: the raw bytes of input "
            f"{name!r}"
        )
    datatype = spec_datatype(spec)
    variable = [i for i, d in enumerate(dims) if d is None]
    fixed = math.prod(d for d in dims if d is not None)
    if datatype == "BYTES":
        if fixed != 1:
            raise bad_request(
                f"input {name!r} is BYTES with shape {shown}: a raw binary request "
                f"({HEADER_LENGTH}: 0) carries one BYTES element, so the input must take one "
                "element per request (shape [1]); send the JSON header instead"
            )
        shape = tuple(1 if d is None else d for d in dims)
        budget.charge(_ARRAY + len(body) + _BYTES_ELEMENT, f"input {name!r}")
        arr = np.empty(1, dtype=object)
        arr[0] = bytes(body)
        return InferRequest(inputs={name: arr.reshape(shape)}, binary_output=True)
    if len(variable) > 1:
        raise bad_request(
            f"the shape of raw input {name!r} cannot be deduced: {shown} has more than one "
            f"variable dimension; send the JSON header ({HEADER_LENGTH} > 0) with the shape"
        )
    per = fixed * DATATYPES[datatype].itemsize
    if per == 0 or len(body) % per or (not variable and len(body) != per):
        want = f"a multiple of {per}" if variable else f"exactly {per}"
        raise bad_request(
            f"raw input {name!r} is {datatype} of shape {shown}: its body must be {want} "
            f"bytes, not {len(body)}"
        )
    shape = tuple(len(body) // per if d is None else d for d in dims)
    check_shape(name, list(shape), budget)
    arr = tensor_from_raw(name, datatype, shape, memoryview(body), budget)
    return InferRequest(inputs={name: arr}, binary_output=True)


def output_array(name: str, value: Any) -> tuple[np.ndarray[Any, Any], str]:
    """An output value as an array the protocol carries, and its datatype (strings become
    ``BYTES`` elements).

    :raises RequestFailed: (500) for a value no protocol datatype fits.
    """
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
        arr, datatype = output_array(name, value)
        as_binary = binary if isinstance(binary, bool) else binary.get(name, False)
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if as_binary:
            raw = tensor_to_raw(arr, datatype)
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            try:
                t["data"] = [v.decode("utf-8") for v in arr.reshape(-1).tolist()]
            except UnicodeDecodeError:
                raise bad_request(
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
        arr, datatype = output_array(name, value)
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = tensor_to_raw(arr, datatype)
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
        raise bad_request(f"the response is not valid JSON: {e}") from None
    binary = memoryview(body)[n:]
    offset = 0
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for t in doc.get("outputs", []):
        name, datatype, shape = t["name"], t["datatype"], tuple(t["shape"])
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[name] = tensor_from_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            arrays[name] = _from_json(name, datatype, shape, t.get("data", []))
    doc["outputs"] = arrays
    return dict(doc)


# -- compressed bodies ---------------------------------------------------------------------------


def decompress(
    body: bytes, encoding: str, limit: int | None, *, budget: Budget | None = None
) -> bytes:
    """A ``Content-Encoding: gzip`` or ``deflate`` body, decompressed.

    :param limit: the most bytes it may expand to (None: no limit).
    :param budget: the request's decode budget: the output is charged to it as it is made,
        and decompression stops at the first byte it cannot pay for.
    :raises RequestFailed: (400) for another encoding or damaged data.
    :raises TooLarge: (413) when it expands past ``limit``.
    :raises DecodedTooLarge: (413) when it expands past the budget.
    """
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise bad_request(
            f"unsupported Content-Encoding {_short(encoding)}; send gzip, deflate or none"
        )
    cap = limit or 0
    by_budget = False
    if budget is not None:
        budget.charge(_ZLIB_SCRATCH, "decompressing the request")
        if not cap or budget.left < cap:
            cap, by_budget = max(budget.left, 1), True
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, cap)
    except zlib.error as e:
        raise bad_request(f"cannot decompress the {encoding} body: {e}") from None
    if d.unconsumed_tail or (cap and len(out) == cap and not d.eof):
        if by_budget and budget is not None:
            raise budget.error(f"the {encoding} body")
        raise TooLarge(limit or 0, what="the decompressed request")
    if budget is not None:
        budget.refund(_ZLIB_SCRATCH)
        budget.charge(len(out), "the decompressed request")
    return out
