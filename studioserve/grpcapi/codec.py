"""gRPC inference messages to and from the Open Inference Protocol's decoded form.

:func:`decode_infer` turns a parsed ``inference.ModelInferRequest`` into the same
:class:`~studioserve.wire.oip_codec.InferRequest` the HTTP routes decode, so the request dict,
the output selection and the errors are the HTTP protocol's (:mod:`studioserve.serving.protocols`
does the rest). Tensors come from ``raw_input_contents`` (the bytes of each input, in input
order: what tritonclient sends) or from each input's typed ``contents``, never both; every
tensor is charged to the request's decode budget before it is built (raw bytes become a view,
typed contents one array), after the parsed message itself (:func:`parsed_size`: protobuf's
form of at most ``--max-body`` bytes, at most about 8x them), and a narrower integer type is
range-checked as in JSON.
:func:`encode_infer` writes every output to ``raw_output_contents``, as Triton does.

Nothing here does IO; every malformed message is a
:class:`~studioserve.errors.RequestFailed` (400) whose message names the field.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from ..errors import TooManyKeys
from ..wire.budget import Budget, DecodeLimits
from ..wire.oip_codec import (
    DATATYPES,
    InferRequest,
    RequestedOutput,
    bad_request,
    check_shape,
    output_array,
    tensor_from_raw,
    tensor_to_raw,
)
from .proto import grpc_service_pb2 as pb

__all__ = ["decode_infer", "encode_infer", "parameter_value", "parsed_size"]

#: the typed contents field of each datatype, and the dtype its values arrive in
_CONTENTS: Final[dict[str, tuple[str, str]]] = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "<i4"),
    "INT16": ("int_contents", "<i4"),
    "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "<u4"),
    "UINT16": ("uint_contents", "<u4"),
    "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", "O"),
}
_ARRAY: Final = 112  # a numpy array object without its data
_BYTES_ELEMENT: Final = 56  # a bytes object's header and its object-array slot
#: what protobuf keeps per element of a typed contents field once parsed (a bytes element:
#: its view; its data is part of the message's own bytes)
_STORED: Final[dict[str, int]] = {
    "bool_contents": 1,
    "int_contents": 4,
    "uint_contents": 4,
    "fp32_contents": 4,
    "int64_contents": 8,
    "uint64_contents": 8,
    "fp64_contents": 8,
    "bytes_contents": 16,
}


def parsed_size(msg: Any, size: int) -> int:
    """About what the parsed message of ``size`` wire bytes holds: its bytes, and each typed
    contents element as protobuf stores it (up to 8 bytes for a one-byte varint, 16 for an
    empty bytes element: at most ~8x the wire size, within the decode budget's bound)."""
    total = size
    for t in msg.inputs:
        if t.HasField("contents"):
            for field, values in t.contents.ListFields():
                total += len(values) * _STORED.get(field.name, 8)
    return total


def parameter_value(param: Any) -> Any:
    """The value of an ``InferParameter`` (its one set field), or None."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def _refuse_shared_memory(params: Any, where: str) -> None:
    if "shared_memory_region" in params:
        raise bad_request(f"{where}: shared memory is not supported; send the data")


def _typed(name: str, datatype: str, shape: tuple[int, ...], contents: Any, budget: Budget) -> Any:
    """An input tensor from its typed ``contents``."""
    slot = _CONTENTS.get(datatype)
    if slot is None:
        raise bad_request(
            f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    field_name, wire_dtype = slot
    given = [f.name for f, _ in contents.ListFields()]
    if given and given != [field_name]:
        raise bad_request(
            f"input {name!r} is {datatype}: its data goes in contents.{field_name}, not "
            f"contents.{', contents.'.join(given)}"
        )
    values = getattr(contents, field_name)
    count = math.prod(shape)
    n = len(values)
    if n != count:
        raise bad_request(
            f"input {name!r}: shape {list(shape)} has {count} elements but "
            f"contents.{field_name} has {n}"
        )
    if datatype == "BYTES":
        budget.charge(_ARRAY + n * _BYTES_ELEMENT + sum(map(len, values)), f"input {name!r}")
        arr = np.empty(n, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    dt = DATATYPES[datatype]
    wide = np.dtype(wire_dtype)
    budget.charge(_ARRAY + n * (wide.itemsize + dt.itemsize), f"input {name!r}")
    arr = np.fromiter(values, dtype=wide.newbyteorder("="), count=n)
    if wide.itemsize != dt.itemsize:
        info = np.iinfo(dt)
        if n and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise bad_request(f"input {name!r}: a value is out of the range of {datatype}")
        arr = arr.astype(dt.newbyteorder("="))
    return arr.reshape(shape)


def decode_infer(msg: Any, size: int, limits: DecodeLimits) -> InferRequest:
    """The decoded form of a parsed ``ModelInferRequest`` of ``size`` bytes on the wire.

    :raises RequestFailed: (400) for a malformed request (unknown datatype, bad shape, data
        that does not fit its shape, both raw and typed data, shared memory, classification).
    :raises TooManyKeys: (413) for more inputs or outputs than ``limits.max_keys``.
    :raises DecodedTooLarge: (413) for tensors that would pass the request's decode budget.
    """
    budget = limits.budget(size)
    # the message is already parsed (gRPC held it to --max-body): pay for it before building
    budget.charge(parsed_size(msg, size), "the parsed message")
    tensors = msg.inputs
    if not tensors:
        raise bad_request("the request has no inputs")
    if len(tensors) > limits.max_keys:
        raise TooManyKeys(limits.max_keys, len(tensors), what="the request's inputs")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise bad_request(
            f"the request has {len(tensors)} inputs but {len(raw)} raw_input_contents; give "
            "one raw_input_contents entry per input, in input order"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, t in enumerate(tensors):
        name = t.name
        if name in inputs:
            raise bad_request(f"input {name!r} appears twice")
        datatype = t.datatype
        if datatype not in DATATYPES:
            raise bad_request(
                f"input {name!r}: unsupported datatype {datatype!r}; use one of "
                f"{', '.join(DATATYPES)}"
            )
        _refuse_shared_memory(t.parameters, f"input {name!r}")
        shape = check_shape(name, list(t.shape), budget)
        if raw:
            if t.HasField("contents") and t.contents.ListFields():
                raise bad_request(
                    f"input {name!r} has typed contents and the request has "
                    "raw_input_contents; send every input one way"
                )
            inputs[name] = tensor_from_raw(name, datatype, shape, raw[i], budget)
        else:
            inputs[name] = _typed(name, datatype, shape, t.contents, budget)
    outputs: list[RequestedOutput] | None = None
    if msg.outputs:
        if len(msg.outputs) > limits.max_keys:
            raise TooManyKeys(limits.max_keys, len(msg.outputs), what="the request's outputs")
        outputs = []
        for o in msg.outputs:
            if "classification" in o.parameters:
                raise bad_request(f"output {o.name!r}: classification is not supported")
            _refuse_shared_memory(o.parameters, f"output {o.name!r}")
            outputs.append(RequestedOutput(o.name, True))
    params = {k: parameter_value(v) for k, v in msg.parameters.items()}
    timeout = params.get("timeout")
    return InferRequest(
        inputs=inputs,
        id=msg.id or None,
        outputs=outputs,
        binary_output=True,
        timeout=(
            timeout / 1e6
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
            else None
        ),
        parameters=params,
    )


def encode_infer(
    model_name: str, model_version: str, request_id: str | None, outputs: dict[str, Any]
) -> bytes:
    """A serialized ``ModelInferResponse`` with every output in ``raw_output_contents``.

    :raises RequestFailed: (500) for an output the protocol cannot carry.
    """
    resp = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    tensors = resp.outputs
    raw = resp.raw_output_contents
    for name, value in outputs.items():
        arr, datatype = output_array(name, value)
        tensors.add(name=name, datatype=datatype, shape=arr.shape)
        raw.append(tensor_to_raw(arr, datatype))
    data: bytes = resp.SerializeToString()
    return data
