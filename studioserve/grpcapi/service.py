"""``inference.GRPCInferenceService``: the KServe v2 gRPC calls and Triton's extensions.

Calls (the ``inference`` package of :mod:`studioserve.grpcapi.proto`)::

    ServerLive, ServerReady                     the probes (no token needed)
    ModelReady, ServerMetadata, ModelMetadata   health and metadata
    ModelInfer                                  inference, through the one request path
    ModelStreamInfer                            Triton's streaming inference: the same, per
                                                message of a bidirectional stream
    ModelConfig, ModelStatistics                Triton's configuration and statistics
    RepositoryIndex, RepositoryModelLoad,       Triton's model repository extension
    RepositoryModelUnload

Any other call of the service (shared memory, trace and log settings) is answered
UNIMPLEMENTED by gRPC itself. Like the HTTP views these adapt and delegate: ``ModelInfer``
hands its bytes to :class:`~studioserve.serving.inference.RequestHandler` with
:class:`~.protocol.GrpcProtocol` (registered without a deserializer, so the message is parsed
once, by the protocol, and the answer is sent as the bytes it encodes); the documents come
from :mod:`.documents`. When auth is on, every call but the probes needs ``authorization:
Bearer <token>`` in its metadata (UNAUTHENTICATED otherwise, before anything else is done).
Errors of every call map through one table (:func:`~.protocol.grpc_code`).

``ModelStreamInfer`` answers each request message of the stream with one
``ModelStreamInferResponse``, in the order they complete (match them by ``id``), as Triton
does: the same request path as ``ModelInfer``, and a request's failure is that answer's
``error_message`` (its ``infer_response`` keeps the request's model, version and id) while
the stream goes on. At most :data:`STREAM_WINDOW` requests of one stream are in flight or
answered but not yet written; the next message is read when an answer has been written, so a
client that sends faster than the model answers, or reads no answers, is held back by HTTP/2's
flow control, not queued here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from ..errors import ModelNotFound, StudioServeError
from ..http.state import AppState
from ..serving.inference import Reply, RequestHandler
from ..serving.repository import READY, ServedModel, ServedVersion
from . import documents
from .proto import grpc_service_pb2 as pb
from .protocol import GrpcProtocol, GrpcRequest, grpc_code, length_field, retry_trailers

__all__ = ["SERVICE", "STREAM_WINDOW", "InferenceService"]

#: the full name of the service, as in every call's path
SERVICE: Final = "inference.GRPCInferenceService"

_UNAUTHENTICATED: Final = (
    "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'"
)
#: the most requests of one ModelStreamInfer stream answered at once
STREAM_WINDOW: Final = 64

#: the HTTP statuses the repository calls keep (the others are a bad request, as over HTTP)
_CONTROL_STATUSES: Final = (400, 404, 409, 503)

#: grpc.aio.ServicerContext (grpcio ships no type hints)
_Context: TypeAlias = Any


class InferenceService:
    """The service's calls over one app's state.

    :param state: the app's state (service, token, telemetry, admission, limits).
    """

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.repository = state.service.repository
        self.protocol = GrpcProtocol(state.oip_protocol.limits)
        #: the server's request timeout (``--request-timeout``)
        self.timeout = state.service.request_timeout
        #: the one request path, sharing the HTTP paths' admission control and observers
        self.handler = RequestHandler(
            state.service,
            self.protocol,
            max_body=state.max_body,
            observers=state.telemetry.observers,
            admission=state.admission,
        )

    # -- registration ---------------------------------------------------------------------------

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The service's calls, for ``server.add_generic_rpc_handlers``."""

        def typed(behaviour: Callable[..., Awaitable[Any]], request: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=request.FromString,
                response_serializer=_serialize,
            )

        methods = {
            "ServerLive": typed(self.server_live, pb.ServerLiveRequest),
            "ServerReady": typed(self.server_ready, pb.ServerReadyRequest),
            "ModelReady": typed(self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": typed(self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": typed(self.model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": typed(self.model_config, pb.ModelConfigRequest),
            "ModelStatistics": typed(self.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": typed(self.repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": typed(self.repository_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": typed(self.repository_unload, pb.RepositoryModelUnloadRequest),
            # bytes in, bytes out: the protocol parses and encodes
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    # -- auth and errors ------------------------------------------------------------------------

    def _authorized(self, context: _Context) -> bool:
        if self.state.token is None:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return self.state.authorized(value if isinstance(value, str) else None)
        return False

    async def _check_token(self, context: _Context) -> None:
        if not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    async def _abort(self, context: _Context, reply: Reply) -> NoReturn:
        """End the call with the gRPC status of ``reply`` (its message; retry trailers)."""
        code = grpc_code(reply.status)
        message = reply.body.decode("utf-8", "replace")
        await context.abort(code, message, tuple(retry_trailers(reply, code, message)))
        raise AssertionError("unreachable: abort raises")

    async def _fail(self, context: _Context, e: StudioServeError) -> NoReturn:
        await self._abort(context, self.protocol.error(e))

    # -- inference ------------------------------------------------------------------------------

    async def model_infer(self, raw: bytes, context: _Context) -> bytes:
        await self._check_token(context)
        # the call's deadline shortens the request's time (never past the server's bound)
        remaining = context.time_remaining()
        deadline = remaining if remaining is not None and remaining < self.timeout else None
        reply = await self.handler.handle_async(
            GrpcRequest(len(raw), functools.partial(_same, raw), raw=raw, deadline=deadline)
        )
        if reply.status != 200:
            await self._abort(context, reply)
        return reply.body

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: _Context) -> None:
        """Answer every request message of the stream (see the module docstring)."""
        await self._check_token(context)
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: set[asyncio.Task[None]] = set()

        async def answer(raw: bytes) -> None:
            try:
                reply = await self.handler.handle_async(
                    GrpcRequest(len(raw), functools.partial(_same, raw), raw=raw)
                )
            except BaseException:
                window.release()
                raise
            answers.put_nowait(_stream_answer(reply, raw))  # its slot is freed once written

        async def read() -> None:
            try:
                async for raw in requests:
                    await window.acquire()
                    task = asyncio.create_task(answer(raw))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.wait(list(pending))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await answers.get()) is not None:
                await context.write(message)  # waits while the client reads no answers
                window.release()
            await reader  # the client's end of the stream, or its error
        finally:
            for task in (reader, *pending):
                task.cancel()

    # -- health and metadata --------------------------------------------------------------------

    async def server_live(self, request: Any, context: _Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: _Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.service.ready)

    async def model_ready(self, request: Any, context: _Context) -> pb.ModelReadyResponse:
        await self._check_token(context)
        try:
            self.repository.resolve(request.name, request.version or None)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.state.service.ready)

    async def server_metadata(self, request: Any, context: _Context) -> pb.ServerMetadataResponse:
        await self._check_token(context)
        return documents.server_metadata()

    async def _model(self, request: Any, context: _Context) -> tuple[ServedModel, ServedVersion]:
        """The model ``request.name`` and its version ``request.version`` (empty: the one
        served by default); NOT_FOUND ends the call otherwise."""
        try:
            entry = self.repository.get(request.name)
            served = self.repository.resolve(request.name, request.version or None)
        except ModelNotFound as e:
            await self._fail(context, e)
        return entry, served

    async def model_metadata(self, request: Any, context: _Context) -> pb.ModelMetadataResponse:
        await self._check_token(context)
        return documents.model_metadata(*await self._model(request, context))

    async def model_config(self, request: Any, context: _Context) -> pb.ModelConfigResponse:
        await self._check_token(context)
        return documents.model_config(*await self._model(request, context))

    async def model_statistics(self, request: Any, context: _Context) -> pb.ModelStatisticsResponse:
        await self._check_token(context)
        repository = self.repository
        if not request.name:
            versions = [v for m in repository.models() for v in m.versions.values()]
        else:
            entry, served = await self._model(request, context)
            versions = [served] if request.version else list(entry.versions.values())
        telemetry = self.state.telemetry
        return documents.model_statistics([telemetry.statistics(v).json(v.name) for v in versions])

    # -- the model repository extension ---------------------------------------------------------

    async def repository_index(self, request: Any, context: _Context) -> pb.RepositoryIndexResponse:
        await self._check_token(context)
        index = self.repository.index()
        if request.ready:
            index = [m for m in index if m.get("state") == READY]
        return documents.repository_index(index)

    async def repository_load(
        self, request: Any, context: _Context
    ) -> pb.RepositoryModelLoadResponse:
        await self._control(context, request.model_name, self.repository.request_load)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: Any, context: _Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control(context, request.model_name, self.repository.request_unload)
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, context: _Context, name: str, act: Callable[[str], None]) -> None:
        """Load or unload ``name`` in the loop's executor (a load fetches and warms)."""
        await self._check_token(context)
        try:
            await asyncio.get_running_loop().run_in_executor(None, act, name)
        except StudioServeError as e:
            reply = self.protocol.error(e)
            if reply.status not in _CONTROL_STATUSES:
                reply.status = 400
            await self._abort(context, reply)


def _same(raw: bytes) -> bytes:
    return raw


def _stream_answer(reply: Reply, raw: bytes) -> bytes:
    """A serialized ModelStreamInferResponse for one request of a stream: its answer, or
    its error with the request's model, version and id (when the message parses)."""
    if reply.status == 200:
        return length_field(2, reply.body)  # ModelStreamInferResponse.infer_response
    request = pb.ModelInferRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError:
        request.Clear()
    about = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    data: bytes = pb.ModelStreamInferResponse(
        error_message=reply.body.decode("utf-8", "replace"), infer_response=about
    ).SerializeToString()
    return data


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
