"""``studio bench --protocol grpc``: load over the KServe v2 gRPC ``ModelInfer``.

The parent builds the message once (:func:`grpc_target`): the model's inputs from the
ModelMetadata call (the model is ``--model``, else the one the repository index lists),
random tensors of ``--batch`` rows in ``raw_input_contents``, serialized; one probe call must
succeed before any load. The generator processes (:class:`GrpcWorker`) send those bytes as is,
over one HTTP/2 channel per process (gRPC multiplexes concurrent calls on it): the closed loop
with one thread per concurrent call on the blocking API, the open loop on ``grpc.aio``. A call
that fails counts under the HTTP status its gRPC code stands for (UNAVAILABLE: 503, ...), a
deadline as a timeout, any other code by its name.
"""

from __future__ import annotations

import functools
import itertools
import time
from multiprocessing.connection import Connection
from typing import Any, Final
from urllib.parse import urlsplit

import grpc

from ..config import DEFAULT_GRPC_PORT, host_port
from ..errors import ClientError, ConfigError
from ..grpcapi.proto import grpc_service_pb2 as pb
from ..wire.oip_codec import output_array, tensor_to_raw
from .config import BenchConfig
from .target import Target, oip_inputs, tensors_text
from .worker import Spec, Tally, Worker, run_on_schedule, run_per_connection

__all__ = ["INFER", "GrpcWorker", "grpc_target"]

_SERVICE: Final = "/inference.GRPCInferenceService/"
#: the path of the inference call
INFER: Final = _SERVICE + "ModelInfer"
#: Triton's (and KServe's) usual gRPC port, when the address names none
DEFAULT_PORT: Final = DEFAULT_GRPC_PORT
_OPTIONS: Final = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]

#: the HTTP status a failed call counts under, by gRPC code
_STATUS: Final[dict[grpc.StatusCode, int]] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    if parts.scheme not in ("grpc", "http") or not parts.hostname:
        raise ConfigError(f"cannot benchmark {url!r} over gRPC: give host:port or grpc://host:port")
    return parts.hostname, parts.port or DEFAULT_PORT


def _unary(channel: grpc.Channel, method: str, response: Any) -> Any:
    return channel.unary_unary(
        _SERVICE + method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


def _failure(what: str, e: grpc.RpcError, cfg: BenchConfig) -> ClientError:
    code = e.code()
    hint = " (pass --token)" if code == grpc.StatusCode.UNAUTHENTICATED else ""
    status = _STATUS.get(code, 500)
    return ClientError(f"{what} answered {code.name}{hint}: {e.details()}", status=status)


def _model_name(cfg: BenchConfig, channel: grpc.Channel, metadata: Any) -> str:
    if cfg.model is not None:
        return cfg.model
    index = _unary(channel, "RepositoryIndex", pb.RepositoryIndexResponse)(
        pb.RepositoryIndexRequest(ready=True), timeout=cfg.timeout, metadata=metadata
    )
    names: list[str] = sorted({str(m.name) for m in index.models})
    if len(names) != 1:
        raise ConfigError(
            f"{cfg.url} serves {len(names)} models ({', '.join(names) or 'none ready'}); pass "
            "--model NAME"
        )
    return names[0]


def grpc_target(cfg: BenchConfig) -> Target:
    """The ``ModelInfer`` every call sends, checked by one probe call.

    :raises ClientError: when the server cannot be reached or a call fails.
    :raises ConfigError: for a bad address, body file or model name.
    """
    host, port = _address(cfg.url)
    address = host_port(host, port)
    metadata = cfg.auth_metadata + tuple((k.lower(), v) for k, v in cfg.headers)
    with grpc.insecure_channel(address, options=_OPTIONS) as channel:
        try:
            name = _model_name(cfg, channel, metadata)
            if cfg.body_file is not None:
                try:
                    body = cfg.body_file.read_bytes()
                except OSError as e:
                    raise ConfigError(f"cannot read --body {cfg.body_file}: {e}") from e
                description = f"gRPC ModelInfer, message from {cfg.body_file} ({len(body):,} bytes)"
            else:
                meta = _unary(channel, "ModelMetadata", pb.ModelMetadataResponse)(
                    pb.ModelMetadataRequest(name=name), timeout=cfg.timeout, metadata=metadata
                )
                doc = {
                    "inputs": [
                        {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in meta.inputs
                    ]
                }
                inputs = oip_inputs(cfg, doc)
                request = pb.ModelInferRequest(model_name=name)
                for key, value in inputs.items():
                    arr, datatype = output_array(key, value)
                    request.inputs.add(name=key, datatype=datatype, shape=arr.shape)
                    request.raw_input_contents.append(tensor_to_raw(arr, datatype))
                body = request.SerializeToString()
                description = f"gRPC ModelInfer {name!r}, raw tensors {tensors_text(inputs)}"
        except grpc.RpcError as e:
            raise _failure(f"{address}", e, cfg) from None
        try:
            channel.unary_unary(INFER)(body, timeout=cfg.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise ClientError(
                f"the probe call ({description}) answered {e.code().name}: {e.details()}; fix "
                "the request before measuring",
                status=_STATUS.get(e.code(), 500),
            ) from None
    return Target("grpc", host, port, INFER, body, dict(metadata), description, cfg.batch)


class GrpcWorker(Worker):
    """A generator process's phases over gRPC (see the module docstring)."""

    def __init__(self, target: Target, timeout: float, report: Connection) -> None:
        self.target = target
        self.timeout = timeout
        self.report = report
        self.metadata = tuple(target.headers.items())

    @staticmethod
    def _failed(tally: Tally, e: grpc.RpcError) -> None:
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.error("timeout")
        elif code in _STATUS:
            tally.done(_STATUS[code], 0.0)
        else:
            tally.error(f"grpc {code.name}")

    def _closed_loop(self, spec: Spec, tallies: list[Tally]) -> None:
        """One thread per concurrent call, each calling again as soon as it is answered."""
        with grpc.insecure_channel(self.target.address, options=_OPTIONS) as channel:
            call = channel.unary_unary(self.target.path)
            run_per_connection(
                spec,
                tallies,
                functools.partial(self._back_to_back_calls, call=call),
                "studioserve-bench-grpc",
            )

    def _back_to_back_calls(
        self, spec: Spec, tally: Tally, taken: itertools.count[int], *, call: Any
    ) -> None:
        body, timeout, metadata = self.target.body, self.timeout, self.metadata
        while spec.end is None or time.monotonic() < spec.end:
            if spec.requests is not None and next(taken) >= spec.requests:
                break
            t0 = time.perf_counter()
            try:
                call(body, timeout=timeout, metadata=metadata)
            except grpc.RpcError as e:
                self._failed(tally, e)
                continue
            tally.done(200, time.perf_counter() - t0)

    async def _open_loop(self, spec: Spec, out: Tally) -> None:
        """Calls started on a fixed schedule; latency counts from the scheduled start."""
        async with grpc.aio.insecure_channel(self.target.address, options=_OPTIONS) as channel:
            call = channel.unary_unary(self.target.path)

            async def fire(intended: float) -> None:
                try:
                    await call(self.target.body, timeout=self.timeout, metadata=self.metadata)
                except grpc.RpcError as e:
                    self._failed(out, e)
                    return
                out.done(200, time.perf_counter() - intended)

            await run_on_schedule(spec, fire)
