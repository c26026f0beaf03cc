"""Start, run and stop a server: fetch, load, warm, listen, watch for idleness, drain, exit.

:class:`ModelServer` is the whole lifecycle as a context manager (tests and embedding use it);
:func:`serve` runs one until SIGTERM, Ctrl-C or the inactivity timer, and returns the exit code.

The inactivity timer (``--killafter``) restarts on every accepted inference request only, not
on probes, metrics, the status page or requests refused for auth. When it fires, or on
SIGTERM/SIGINT, the server stops accepting inference requests (503), finishes the ones in
flight, answers every request with ``Connection: close`` for a short grace (so keep-alive
clients move off their connections before they are closed), stops listening, closes the pipe
and exits 0.

HTTP is served by granian's Rust HTTP stack through its WSGI interface, embedded in this
process (so the model and its batching pipe are shared by every request); waitress is the
pure-Python fallback (``http_server="waitress"``). The servers live in
:mod:`studioserve.http.servers`; bench/bench_wsgi.py measured the choice. With
``--grpc-port`` the same process also serves the Open Inference Protocol over gRPC
(:mod:`studioserve.grpcapi`, the ``grpc`` extra), through the same request path; the drain
covers its calls too, and it stops with the HTTP server.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .. import _allocator, grpcapi
from ..config import ServeConfig, resolve_store_url
from ..http.app import create_app, drain_of
from ..http.rsgi import served_app
from ..http.servers import HttpServer, make_http_server, url_for
from ..http.state import AppState, ServerInfo, state_of
from ..models import Model
from ..serving.admission import default_max_in_flight
from ..serving.repository import ModelRepository
from ..serving.service import ModelService
from ..store import Store, open_store
from .catalog import ModelCatalog

if TYPE_CHECKING:
    from ..grpcapi.server import GrpcServer

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0
#: at most this many seconds after a drain begins, the HTTP server stops (in-flight aside) ...
DRAIN_GRACE = 3.0
#: ... or sooner, once no request arrived for this long (a client's next request on a
#: kept-alive connection comes one round trip after the answer to its last)
DRAIN_QUIET = 1.0
SUMMARY_INTERVAL = 60.0
#: seconds the gRPC server gives calls still in flight when it stops (after the drain)
GRPC_GRACE = 1.0


class ModelServer:
    """One serving lifecycle: fetch, load and warm, listen, idle watch, drain, close.

    Use as a context manager; :meth:`wait` blocks until it should exit::

        with ModelServer(ServeConfig(key="mnist-7", port=0)) as server:
            print(server.url, server.token)
            server.wait()

    :param config: what to serve and how.
    :param model: an already loaded model (skips the store and the loader), for embedding.
    :param http_server: ``"granian"`` or ``"waitress"`` (default: ``config.http_server``).
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        model: Model | None = None,
        http_server: str | None = None,
    ) -> None:
        self.config = config
        self.http_server = http_server or config.http_server
        self._model = model
        self.token: str | None = None
        self.modeldir: Path | None = None
        self.service: ModelService | None = None
        self.app: Any = None
        self.http: HttpServer | None = None
        #: the gRPC server (``--grpc-port``), or None
        self.grpc: GrpcServer | None = None
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._trimmer: _allocator.Trimmer | None = None
        self._store: Store | None = None
        self.catalog: ModelCatalog | None = None
        self.repository = ModelRepository()
        self._closed = False
        #: the HTTP threads (``--threads``, or sized by the number of models)
        self.threads = config.threads

    # -- start -------------------------------------------------------------------------------

    def start(self) -> ModelServer:
        """Fetch, load and warm every model, start listening; returns once ready."""
        cfg = self.config
        # before anything loads: a missing grpc extra is a ConfigError naming it
        grpc_server = grpcapi.load_server() if cfg.grpc_port is not None else None
        try:
            store = None
            if self._model is None or len(cfg.keys) > 1 or cfg.all_models:
                store = self._store = open_store(resolve_store_url(cfg.store))
            catalog = self.catalog = ModelCatalog(cfg, store, self.repository, model=self._model)
            catalog.load_all()
            if self._stop.is_set():  # SIGTERM or Ctrl-C while loading: never start serving
                logger.info("stop requested while loading (%s); not serving", self.stop_reason)
                return self
            self.modeldir = catalog.modeldirs.get(cfg.key)
            if store is not None:
                self.repository.control = catalog
            self.service = ModelService(self.repository, request_timeout=cfg.request_timeout)
            self.token = (cfg.token or secrets.token_urlsafe(32)) if cfg.auth_enabled else None
            names = self.repository.names()
            self.threads = http_threads(cfg, len(names))
            self.app = create_app(
                self.service,
                token=self.token,
                max_body=cfg.max_body,
                info=ServerInfo(
                    experiment=", ".join(names) if names else cfg.key,
                    store=resolve_store_url(cfg.store),
                    max_batch_size=cfg.max_batch_size,
                    max_delay_ms=cfg.max_delay_ms,
                    killafter_seconds=cfg.killafter,
                    auth=self.token is not None,
                ),
                max_queue_time=None if cfg.max_queue_ms is None else cfg.max_queue_ms / 1000.0,
                max_in_flight=default_max_in_flight(self.threads),
                max_keys=cfg.max_keys,
            )
            state_of(self.app).shutdown_at = self.shutdown_at
            self.http = make_http_server(
                served_app(self.app, self.threads),
                cfg.host,
                cfg.port,
                self.threads,
                self.http_server,
            )
            # on granian's loop a request holds no thread while its pipe computes it, so no
            # pool bounds how many bodies are held: bound their bytes as the thread cap did
            admission = state_of(self.app).admission
            admission.threads_per_request = self.http.kind != "granian"
            admission.max_body_bytes = default_max_in_flight(self.threads) * cfg.max_body
            for entry in self.repository.models():  # worker threads up before the first request
                for served in entry.versions.values():
                    served.model.start()
            _allocator.tune()
            activity = self.service.activity
            self._trimmer = _allocator.Trimmer(lambda: activity.accepted).start()
            _allocator.settle_gc()  # undone with the trimmer's close
            self.http.start()
            if grpc_server is not None and cfg.grpc_port is not None:
                self.grpc = grpc_server(
                    state_of(self.app), cfg.host, cfg.grpc_port, threads=self.threads
                ).start()
                state_of(self.app).grpc_address = self.grpc.address
            self.service.ready = True
            if cfg.watch is not None:
                catalog.watch(cfg.watch)
            self._watcher = threading.Thread(
                target=self._monitor, name="studioserve-monitor", daemon=True
            )
            self._watcher.start()
        except BaseException:
            self.close()
            raise
        logger.info("serving %s at %s", ", ".join(self.repository.names()), self.url)
        return self

    # -- facts -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.http.port if self.http else self.config.port

    @property
    def url(self) -> str:
        return url_for(self.config.host, self.port)

    @property
    def grpc_address(self) -> str | None:
        """Where the gRPC server listens (``host:port``), or None without ``--grpc-port``."""
        return self.grpc.address if self.grpc is not None else None

    @property
    def state(self) -> AppState:
        return state_of(self.app)

    def shutdown_at(self) -> float | None:
        """The ``time.monotonic()`` at which the inactivity timer will fire, if any."""
        if self.config.killafter <= 0 or self.service is None:
            return None
        idle = self.service.activity.idle_seconds()
        return time.monotonic() + max(0.0, self.config.killafter - idle)

    # -- run and stop ------------------------------------------------------------------------

    def _monitor(self) -> None:
        """Fire the inactivity timer, flush the telemetry buffers, log a summary every minute."""
        assert self.service is not None
        activity = self.service.activity
        killafter = self.config.killafter
        tick = min(TELEMETRY_FLUSH, max(0.05, killafter / 20)) if killafter > 0 else TELEMETRY_FLUSH
        last_summary, last_count = time.monotonic(), activity.accepted
        telemetry = self.state.telemetry
        while not self._stop.wait(tick):
            telemetry.flush(wait=False)  # buffered requests and batches, off the request path
            now = time.monotonic()
            if now - last_summary >= SUMMARY_INTERVAL:
                count = activity.accepted
                logger.info(
                    "last %.0fs: %d inference request(s), %d in flight",
                    now - last_summary,
                    count - last_count,
                    activity.in_flight,
                )
                last_summary, last_count = now, count
            if killafter > 0 and activity.idle_seconds() >= killafter:
                logger.info("no inference request for %gs (--killafter); shutting down", killafter)
                self.request_stop("inactivity")
                return

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the server to stop (thread- and signal-safe); :meth:`wait` then returns."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()
        if self.catalog is not None:
            self.catalog.request_stop()  # models not loaded yet are not loaded

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested; True if it was."""
        return self._stop.wait(timeout)

    def close(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Drain: refuse new inference requests (503; gRPC: UNAVAILABLE), finish the ones in
        flight (HTTP and gRPC alike), give keep-alive clients a grace to notice, stop listening
        (the gRPC server first), close the pipe.

        From the first moment of the drain every response carries ``Connection: close``, so
        clients stop reusing their connections; the HTTP server stops only once no request
        arrived for :data:`DRAIN_QUIET` seconds, or :data:`DRAIN_GRACE` seconds after the drain
        began (in-flight requests always finish first, up to ``drain_timeout``). A request
        sent on a kept-alive connection just before the stop so gets an answer (503 and
        ``Connection: close``) instead of a closed socket.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        service = self.service
        if service is not None:
            service.draining = True
            service.ready = False
            began = time.monotonic()
            drain = drain_of(self.app) if self.app is not None else None
            if drain is not None:
                drain.start()
            deadline = began + drain_timeout
            while service.activity.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            if service.activity.in_flight:
                logger.warning(
                    "%d request(s) still in flight after %gs; stopping anyway",
                    service.activity.in_flight,
                    drain_timeout,
                )
            if drain is not None and self.http is not None:
                grace_end = began + DRAIN_GRACE
                while drain.quiet_seconds() < DRAIN_QUIET and time.monotonic() < grace_end:
                    time.sleep(0.01)
        if self.catalog is not None:
            self.catalog.close()
        if self.grpc is not None:
            self.grpc.stop(GRPC_GRACE)  # calls in flight finished above; new ones refused
            self.grpc = None
        if self.http is not None:
            self.http.stop()
        if self._watcher is not None:
            self._watcher.join(5.0)
        if self._trimmer is not None:
            self._trimmer.close()
            self._trimmer = None
            _allocator.unsettle_gc()
        if service is not None:
            service.close()
        else:
            self.repository.close()
            if self._model is not None and self.catalog is None:
                self._model.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        logger.info("server stopped (%s)", self.stop_reason or "closed")

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


#: what a signal handler installed by :func:`stop_on_signals` is
SignalHandler = Callable[[int, FrameType | None], None]


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[SignalHandler | None]:
    """SIGTERM and SIGINT call ``request_stop(signal name)`` (drain and exit) for the block,
    main thread only; yields the handler (None off the main thread), which a caller whose
    library replaces the handlers (``ray.init``) installs again."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s; draining and shutting down", signal.Signals(signum).name)
        request_stop(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield handler
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


#: seconds between the monitor thread's telemetry flushes (which keep the buffers small and
#: their delivery off the request path)
TELEMETRY_FLUSH = 0.25

#: the most HTTP threads the automatic sizing picks (``--threads`` sets any number)
MAX_AUTO_THREADS = 128


def http_threads(config: ServeConfig, models: int) -> int:
    """The HTTP threads for ``models`` served models: ``--threads`` when given, else the
    default per model (up to :data:`MAX_AUTO_THREADS`).

    Every inference request holds a thread while it waits for its model, and each model
    batches only its own requests: five models behind the threads of one would each see a
    fifth of the concurrency, so batches of a fifth of the size (bench_repository.py).
    """
    if config.is_explicit("threads") or models <= 1:
        return config.threads
    return min(MAX_AUTO_THREADS, max(config.threads, config.threads * models // 2))


def serve(
    config: ServeConfig,
    *,
    on_ready: Callable[[ModelServer], None] | None = None,
    http_server: str | None = None,
) -> int:
    """Serve ``config.key`` until SIGTERM, Ctrl-C or ``config.killafter`` seconds of idleness.

    :param config: what to serve and how.
    :param on_ready: called once the server is listening and the model is warm (the CLI prints
        the URL, signature and token there).
    :returns: the exit code (0 after a graceful stop).
    :raises StudioServeError: when the experiment cannot be fetched or loaded, or the port
        cannot be bound.
    """
    server = ModelServer(config, http_server=http_server)
    with stop_on_signals(server.request_stop):
        server.start()
        try:
            if on_ready is not None and server.http is not None:
                on_ready(server)
            server.wait()
        finally:
            server.close()
    return 0
