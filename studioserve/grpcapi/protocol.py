"""The gRPC ``ModelInfer`` as a protocol of the one request path, and its error table.

:class:`GrpcProtocol` plugs into :class:`~studioserve.serving.inference.RequestHandler` like
the HTTP protocols do, so a gRPC inference goes through the same ready check, lease, size
limit, admission, decode budget, predict, activity count and observers, and batches with HTTP
and pickle requests. gRPC names the model inside the message, so :meth:`GrpcProtocol.resolve`
parses it (protobuf's parser, on a message gRPC has already held to ``--max-body``); decoding
its tensors into arrays waits for admission, in :meth:`GrpcProtocol.decode`.

A :class:`~studioserve.serving.inference.Reply` keeps the HTTP status of the outcome (what
metrics, the status page and Triton's statistics count); :func:`grpc_code` maps it to the
gRPC status the transport sends (:data:`GRPC_CODES`), and :func:`retry_trailers` turns a
``Retry-After`` into gRPC's ways of saying when to retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError

from ..errors import ModelNotFound, StudioServeError
from ..serving.inference import InferenceRequest, Protocol, Reply
from ..serving.protocols import OipProtocol, error_message, retry_after_header
from ..serving.repository import ModelRepository, ServedVersion
from ..wire.budget import DecodeLimits
from ..wire.oip_codec import InferRequest, bad_request
from .codec import decode_infer, encode_infer
from .proto import grpc_service_pb2 as pb

__all__ = [
    "GRPC_CODES",
    "GrpcProtocol",
    "GrpcRequest",
    "grpc_code",
    "length_field",
    "retry_trailers",
]

#: the gRPC status for each HTTP status an error carries (others: 4xx INVALID_ARGUMENT,
#: 5xx INTERNAL)
GRPC_CODES: Final[dict[int, grpc.StatusCode]] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    406: grpc.StatusCode.INVALID_ARGUMENT,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: the ``type_url`` of google.rpc.RetryInfo in a google.rpc.Status's details
_RETRY_INFO: Final = "type.googleapis.com/google.rpc.RetryInfo"
#: the trailer of gRPC's rich error model (a serialized google.rpc.Status)
STATUS_DETAILS: Final = "grpc-status-details-bin"


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status code for an HTTP status."""
    code = GRPC_CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _status_with_retry(code: grpc.StatusCode, message: str, seconds: int) -> bytes:
    """A serialized google.rpc.Status (code 1, message 2, details 3) whose one detail is a
    google.rpc.RetryInfo (retry_delay 1): what clients of the rich error model read."""
    retry_info = length_field(1, duration_pb2.Duration(seconds=seconds).SerializeToString())
    detail = any_pb2.Any(type_url=_RETRY_INFO, value=retry_info).SerializeToString()
    number = code.value[0]
    return (
        _varint(1 << 3)
        + _varint(number)
        + length_field(2, message.encode())
        + length_field(3, detail)
    )


def retry_trailers(reply: Reply, code: grpc.StatusCode, message: str) -> list[tuple[str, Any]]:
    """The trailing metadata that says when to retry a refused call (empty without a
    ``Retry-After``): ``retry-after`` (seconds, as over HTTP), ``grpc-retry-pushback-ms`` (what
    gRPC's own retry policy obeys) and ``grpc-status-details-bin`` with a google.rpc.RetryInfo.
    """
    for key, value in reply.headers:
        if key.lower() == "retry-after":
            seconds = max(1, int(value))
            return [
                ("retry-after", str(seconds)),
                ("grpc-retry-pushback-ms", str(seconds * 1000)),
                (STATUS_DETAILS, _status_with_retry(code, message, seconds)),
            ]
    return []


@dataclass(slots=True)
class GrpcRequest(InferenceRequest):
    """A gRPC inference request: the message's bytes (``read`` returns them) and, once
    resolved, the parsed message.

    :param raw: the serialized ``ModelInferRequest``.
    :param deadline: seconds left before the call's deadline when that is sooner than the
        server's request timeout, else None.
    """

    raw: bytes = b""
    deadline: float | None = None
    message: Any = None


class GrpcProtocol(Protocol):
    """The gRPC ``ModelInfer`` of the KServe v2 / Triton service.

    :param limits: what a decoded message may build (``--max-body``, ``--max-keys``).
    """

    route = "grpc"

    def __init__(self, limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits()

    def resolve(self, request: InferenceRequest, repository: ModelRepository) -> ServedVersion:
        """Parse the message and lease the model it names.

        :raises RequestFailed: (400) for bytes that are not a ModelInferRequest.
        :raises ModelNotFound: for a model or version not served.
        """
        assert isinstance(request, GrpcRequest)
        msg = pb.ModelInferRequest()
        try:
            msg.ParseFromString(request.raw)
        except DecodeError as e:
            raise bad_request(f"the message is not an inference.ModelInferRequest: {e}") from None
        request.message = msg
        if not msg.model_name:
            raise ModelNotFound("the request names no model: set model_name")
        return repository.lease(msg.model_name, msg.model_version or None)

    def decode(self, body: bytes, request: InferenceRequest) -> tuple[dict[str, Any], Any]:
        assert isinstance(request, GrpcRequest)
        assert request.target is not None
        req = decode_infer(request.message, len(body), self.limits)
        request.message = None  # the arrays view its bytes; the rest is not needed again
        deadline = request.deadline
        if deadline is not None and (req.timeout is None or deadline < req.timeout):
            req.timeout = max(deadline, 0.0)
        return OipProtocol.to_service(req, request.target), req

    def encode(
        self, result: dict[str, Any], context: Any, request: InferenceRequest
    ) -> tuple[bytes, list[tuple[str, str]]]:
        req: InferRequest = context
        target = request.target
        assert target is not None
        outputs, _ = OipProtocol.select(req, OipProtocol.from_service(result, target), target.name)
        return encode_infer(target.name, str(target.version), req.id, outputs), []

    def error(self, e: StudioServeError) -> Reply:
        return Reply(e.http_status, retry_after_header(e), error_message(e).encode())
