"""The wire protocols of the request path, each with its error table.

- :class:`PickleProtocol`: ``POST /`` (Studio.ML's contract): a pickle, JSON or npz dict in,
  the same format (or the one ``Accept`` names) out. Errors are
  ``{"error": {"type", "message", "keys"}}`` with the error's own HTTP status.
- :class:`OipProtocol`: the Open Inference Protocol's infer (KServe v2, JSON or binary
  tensors). Errors are ``{"error": "message"}``; statuses the protocol does not use for a bad
  request (406, 415, 422) become 400.

Both add ``Retry-After`` to an error that carries ``retry_after`` (overloaded, not ready).
"""

from __future__ import annotations

import json
from typing import Any, Final

import numpy as np

from .. import wire
from ..errors import ModelNotFound, RequestFailed, StudioServeError
from ..wire.budget import DecodeLimits
from ..wire.oip_codec import (
    HEADER_LENGTH,
    VERSION,
    InferRequest,
    bad_request,
    decode_infer_request,
    encode_infer_response,
)
from .inference import InferenceRequest, Protocol, Reply
from .service import ModelService

__all__ = ["OipProtocol", "PickleProtocol", "retry_after_header"]

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
    """The Open Inference Protocol's infer for the model ``name``.

    Models without an input signature (the identity model, ``dict -> dict`` wrappers) take
    each input as one key and answer with one output per input, named like it (or with the
    keys of the dict they return for it).

    :param service: the model service (its signature maps tensors to request keys).
    :param name: the model's name in URLs (the experiment key).
    :param max_body: the most bytes a compressed body may expand to.
    :param limits: what a decoded body may build (default: from ``max_body``).
    """

    route = "/v2/models/infer"

    def __init__(
        self,
        service: ModelService,
        name: str,
        max_body: int | None,
        *,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.service = service
        self.name = name
        self.max_body = max_body
        self.limits = limits or (
            DecodeLimits(max_body=max_body) if max_body is not None else DecodeLimits()
        )

    def check_model(self, name: str, version: str | None) -> None:
        """:raises ModelNotFound: unless ``name`` (and ``version``, if given) is served."""
        if name != self.name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.name!r}")
        if version is not None and version != VERSION:
            raise ModelNotFound(
                f"unknown version {version!r} of model {name!r}; the only version is {VERSION!r}"
            )

    def resolve(self, request: InferenceRequest) -> None:
        self.check_model(request.model or "", request.version)

    def decode(self, body: bytes, request: InferenceRequest) -> tuple[dict[str, Any], Any]:
        req = decode_infer_request(
            body,
            request.header(HEADER_LENGTH),
            limits=self.limits,
            content_encoding=request.header("Content-Encoding"),
        )
        return self.to_service(req), req

    def encode(
        self, result: dict[str, Any], context: Any, request: InferenceRequest
    ) -> tuple[bytes, list[tuple[str, str]]]:
        req: InferRequest = context
        outputs, binary = self.select(req, self.from_service(result))
        payload, headers = encode_infer_response(
            self.name, outputs, binary=binary, request_id=req.id
        )
        return payload, list(headers.items())

    def error(self, e: StudioServeError) -> Reply:
        status = _OIP_STATUS.get(e.http_status, e.http_status)
        body = json.dumps({"error": _message(e)}, separators=(",", ":")).encode()
        return Reply(status, [_JSON, *retry_after_header(e)], body)

    # -- tensors <-> request keys ------------------------------------------------------------
    def to_service(self, req: InferRequest) -> dict[str, Any]:
        specs = self.service.inputs
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
                f"{'; '.join(parts)}: model {self.name!r} takes {', '.join(map(repr, names))}"
            )
        if len(specs) == 1:
            return {names[0]: req.inputs[names[0]]}
        return {"request": {n: req.inputs[n] for n in names}}

    def from_service(self, result: dict[str, Any]) -> dict[str, Any]:
        service = self.service
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
                raise bad_request(
                    f"unknown output {o.name!r}: model {self.name!r} returns "
                    f"{', '.join(map(repr, outputs)) or 'no outputs'}"
                )
            chosen[o.name] = outputs[o.name]
            binary[o.name] = req.binary_output if o.binary is None else o.binary
        return chosen, binary


def _message(e: StudioServeError) -> str:
    """The error message with the per-key details the service gave (keys are input names)."""
    msg = str(e)
    if not isinstance(e, RequestFailed):
        return msg
    extra = [m for m in e.keys.values() if m not in msg]
    return "; ".join([msg, *extra]) if extra else msg
