"""The gRPC server: ``grpc.aio`` on an event loop of its own, in one background thread.

:class:`GrpcServer` serves :class:`~.service.InferenceService` on ``--host`` and
``--grpc-port`` beside the HTTP server, in the same process (so the models, their batching
pipes, the admission control and the telemetry are shared). Its loop (uvloop where installed,
:func:`studioserve.http.servers.new_event_loop`) runs every call as a coroutine: inference
awaits ``Model.predict_async``, completed a batch at a time by the pipe's worker, as on the
RSGI path, so a call holds no thread. Models without a pipe (and the repository's loads) run
in the loop's executor, a pool of ``threads`` threads, all started with the server.

Limits: a message over ``--max-body`` bytes is refused by gRPC itself (RESOURCE_EXHAUSTED);
answers are not limited. The port is bound without SO_REUSEPORT (gRPC's default on Linux), so
a port in use is an error at start instead of a second server sharing it. :meth:`GrpcServer.stop`
is the last step of the server's drain: new calls are refused and calls in flight get
``grace`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from grpc import aio

from ..config import host_port
from ..errors import ConfigError
from ..http.bridge import thread_pool
from ..http.servers import new_event_loop
from ..http.state import AppState
from .service import InferenceService

logger = logging.getLogger(__name__)

__all__ = ["GrpcServer", "grpc_address"]

#: seconds :meth:`GrpcServer.start` waits for the server to listen
START_TIMEOUT: Final = 30.0


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC writes a target (IPv6 addresses in brackets)."""
    return host_port(host, port)


class GrpcServer:
    """The gRPC inference service of one app, on its own thread and event loop.

    :param state: the app's state (service, token, telemetry, admission, ``--max-body``).
    :param host: the address to bind (the HTTP server's ``--host``).
    :param port: the TCP port (0: any free port; :attr:`port` is the bound one).
    :param threads: the loop's executor threads (models without a pipe run there).
    """

    def __init__(self, state: AppState, host: str, port: int, *, threads: int) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.threads = max(1, threads)
        self.service = InferenceService(state)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 0.0
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def address(self) -> str:
        """Where clients connect: ``host:port``."""
        return grpc_address(self.host, self.port)

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.state.max_body),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]

    def start(self) -> GrpcServer:
        """Bind and start serving; returns once listening.

        :raises ConfigError: when the port cannot be bound.
        """
        self._executor = thread_pool(self.threads, "studioserve-grpc")
        self._thread = threading.Thread(target=self._run, name="studioserve-grpc", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            self.stop(0)
            raise ConfigError(f"the gRPC server did not start on {self.address} in time")
        if self._error is not None:
            error = self._error
            self.stop(0)
            raise error
        logger.info("gRPC (KServe v2) at %s", self.address)
        return self

    def _run(self) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)
        if self._executor is not None:
            loop.set_default_executor(self._executor)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # never leave start() waiting
            if not self._started.is_set():
                self._error = e
                self._started.set()
            else:
                logger.exception("the gRPC server stopped on an error")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        server = aio.server(options=self._options())
        server.add_generic_rpc_handlers((self.service.rpc_handler(),))
        target = grpc_address(self.host, self.port)
        cause: RuntimeError | None = None
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError as e:
            bound, cause = 0, e
        if not bound:
            self._error = ConfigError(
                f"cannot listen for gRPC on {target}: the port is in use or the address is not "
                "this machine's; pass another --grpc-port (0: any free port) or stop what "
                "holds it"
            )
            if cause is not None:
                self._error.__cause__ = cause
            self._started.set()
            return
        self.port = bound
        await server.start()
        self._stopping = asyncio.Event()
        self._started.set()
        await self._stopping.wait()
        await server.stop(self._grace)

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new calls, give those in flight ``grace`` seconds, stop; join the thread."""
        thread, self._thread = self._thread, None
        loop, stopping = self._loop, self._stopping
        self._grace = grace
        if thread is not None:
            if loop is not None and stopping is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(stopping.set)
                except RuntimeError:  # the loop closed meanwhile
                    pass
            thread.join(grace + 10.0)
            if thread.is_alive():
                logger.warning("the gRPC server thread did not stop in %gs", grace + 10.0)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
