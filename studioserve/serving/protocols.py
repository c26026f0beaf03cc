"""The wire protocols of the request path, each with its error table.

- :class:`PickleProtocol`: ``POST /`` (Studio.ML's contract): a pickle, JSON or npz dict in,
  the same format (or the one ``Accept`` names) out. Errors are
  ``{"error": {"type", "message", "keys"}}`` with the error's own HTTP status.
- :class:`OipProtocol`: the Open Inference Protocol's infer (KServe v2, JSON or binary
  tensors, or Triton's raw binary request for a single-input model). Errors are
  ``{"error": "message"}``; statuses the protocol does not use for a bad request (406, 415,
  422) become 400.

Both add ``Retry-After`` to an error that carries ``retry_after`` (overloaded, not ready).
"""

from __future__ import annotations

import json
from typing import Any, Final

import numpy as np

from .. import wire
from ..errors import ModelNotFound, RequestFailed, StudioServeError
from ..tensors import TensorSpec
from ..wire.budget import DecodeLimits
from ..wire.oip_codec import (
    HEADER_LENGTH,
    InferRequest,
    bad_request,
    decode_infer_request,
    decode_raw_request,
    encode_infer_response,
)
from .inference import InferenceRequest, Protocol, Reply
from .repository import ModelRepository, ServedVersion
from .service import ModelService

__all__ = ["OipProtocol", "PickleProtocol", "error_message", "retry_after_header"]

#: OIP answers a request it cannot use with 400, whatever our finer status says.
_OIP_STATUS: Final[dict[int, int]] = {415: 400, 422: 400, 406: 400}
_JSON: Final = ("Content-Type", "application/json")


def retry_after_header(e: BaseException) -> list[tuple[str, str]]:
    """``[("Retry-After", seconds)]`` for an error that says when to retry, else ``[]``."""
    retry = getattr(e, "retry_after", None)
    return [("Retry-After", f"{max(1, round(retry))}")] if retry else []


class PickleProtocol(Protocol):
    """``POST /``: the Content-Type picks pickle, JSON or npz (see :mod:`studioserve.wire`)."""

    route = "/"

    def __init__(self, limits: DecodeLimits | None = None) -> None:
        #: what a decoded body may build (``--max-body``, ``--max-keys``)
        self.limits = limits or DecodeLimits()

    def decode(self, body: bytes, request: InferenceRequest) -> tuple[dict[str, Any], Any]:
        return wire.decode_request(body, request.header("Content-Type"), limits=self.limits)

    def encode(
        self, result: dict[str, Any], context: Any, request: InferenceRequest
    ) -> tuple[bytes, list[tuple[str, str]]]:
        fmt = wire.response_format(request.header("Accept"), context)
        payload, out_type = wire.encode_response(result, fmt)
        return payload, [("Content-Type", out_type)]

    def error(self, e: StudioServeError) -> Reply:
        keys = e.keys if isinstance(e, RequestFailed) else None
        headers = [_JSON, *retry_after_header(e)]
        return Reply(e.http_status, headers, wire.error_body(e.error_type, str(e), keys))


class OipProtocol(Protocol):
    """The Open Inference Protocol's infer for any served model (the URL names it).

    Models without an input signature (the identity model, ``dict -> dict`` wrappers) take
    each input as one key and answer with one output per input, named like it (or with the
    keys of the dict they return for it).

    :param service: unused; kept for callers that pass it (the URL names the model).
    :param name: unused; kept for callers that pass it.
    :param max_body: the most bytes a compressed body may expand to.
    :param limits: what a decoded body may build (default: from ``max_body``).
    """

    route = "/v2/models/infer"

    def __init__(
        self,
        service: ModelService | None = None,
        name: str | None = None,
        max_body: int | None = None,
        *,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.max_body = max_body
        self.limits = limits or (
            DecodeLimits(max_body=max_body) if max_body is not None else DecodeLimits()
        )

    def resolve(self, request: InferenceRequest, repository: ModelRepository) -> ServedVersion:
        if not request.model:
            raise ModelNotFound("the Open Inference Protocol names the model in the URL")
        return repository.lease(request.model, request.version)

    def decode(self, body: bytes, request: InferenceRequest) -> tuple[dict[str, Any], Any]:
        header_length = request.header(HEADER_LENGTH)
        target = _target(request)
        if header_length is not None and header_length.strip() == "0":
            req = decode_raw_request(
                body,
                self.raw_input(target),
                batched=target.model.batches,
                limits=self.limits,
                content_encoding=request.header("Content-Encoding"),
            )
        else:
            req = decode_infer_request(
                body,
                header_length,
                limits=self.limits,
                content_encoding=request.header("Content-Encoding"),
            )
        return self.to_service(req, target), req

    def encode(
        self, result: dict[str, Any], context: Any, request: InferenceRequest
    ) -> tuple[bytes, list[tuple[str, str]]]:
        req: InferRequest = context
        target = _target(request)
        outputs, binary = self.select(req, self.from_service(result, target), target.name)
        payload, headers = encode_infer_response(
            target.name,
            outputs,
            binary=binary,
            request_id=req.id,
            model_version=str(target.version),
        )
        return payload, list(headers.items())

    def error(self, e: StudioServeError) -> Reply:
        status = _OIP_STATUS.get(e.http_status, e.http_status)
        body = json.dumps({"error": error_message(e)}, separators=(",", ":")).encode()
        return Reply(status, [_JSON, *retry_after_header(e)], body)

    @staticmethod
    def raw_input(target: ServedVersion) -> TensorSpec:
        """The one input a raw binary request (``Inference-Header-Content-Length: 0``) is for.

        :raises RequestFailed: (400) unless the model declares exactly one input.
        """
        specs = target.model.inputs
        if len(specs) != 1:
            names = ", ".join(repr(s.name) for s in specs)
            takes = f"takes {len(specs)} inputs ({names})" if specs else "declares no inputs"
            raise bad_request(
                f"a raw binary request ({HEADER_LENGTH}: 0) carries exactly one input, but "
                f"model {target.name!r} {takes}; send the JSON header with every input"
            )
        return specs[0]

    # -- tensors <-> request keys ------------------------------------------------------------
    @staticmethod
    def to_service(req: InferRequest, target: ServedVersion) -> dict[str, Any]:
        """The request dict for the model: one key per input, or one ``"request"`` dict."""
        specs = target.model.inputs
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
            raise bad_request(
                f"{'; '.join(parts)}: model {target.name!r} takes {', '.join(map(repr, names))}"
            )
        if len(specs) == 1:
            return {names[0]: req.inputs[names[0]]}
        return {"request": {n: req.inputs[n] for n in names}}

    @staticmethod
    def from_service(result: dict[str, Any], target: ServedVersion) -> dict[str, Any]:
        """The output tensors, by name, of the model's result dict."""
        model = target.model
        out: dict[str, Any] = {}
        if not model.inputs:
            for key, value in result.items():
                if isinstance(value, dict):
                    out.update(value)
                else:
                    out[key] = value
            return out
        names = [s.name for s in model.outputs]
        for value in result.values():
            if isinstance(value, dict):
                out.update(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
                for i, v in enumerate(value):
                    out[names[i] if i < len(names) else f"output_{i}"] = v
            else:
                out[names[0] if names else "output_0"] = value
        return out

    @staticmethod
    def select(
        req: InferRequest, outputs: dict[str, Any], name: str
    ) -> tuple[dict[str, Any], dict[str, bool]]:
        if req.outputs is None:
            return outputs, dict.fromkeys(outputs, req.binary_output)
        chosen: dict[str, Any] = {}
        binary: dict[str, bool] = {}
        for o in req.outputs:
            if o.name not in outputs:
                raise bad_request(
                    f"unknown output {o.name!r}: model {name!r} returns "
                    f"{', '.join(map(repr, outputs)) or 'no outputs'}"
                )
            chosen[o.name] = outputs[o.name]
            binary[o.name] = req.binary_output if o.binary is None else o.binary
        return chosen, binary


def error_message(e: StudioServeError) -> str:
    """The error message with the per-key details the service gave (keys are input names)."""
    msg = str(e)
    if not isinstance(e, RequestFailed):
        return msg
    extra = [m for m in e.keys.values() if m not in msg]
    return "; ".join([msg, *extra]) if extra else msg


def _target(request: InferenceRequest) -> ServedVersion:
    target = request.target
    if target is None:  # pragma: no cover - the request path resolves before decoding
        raise ModelNotFound("the request was not resolved to a model")
    return target
