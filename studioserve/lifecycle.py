"""Start, run and stop a server: fetch, load, warm, listen, watch for idleness, drain, exit.

:class:`ModelServer` is the whole lifecycle as a context manager (tests and embedding use it);
:func:`serve` runs one until SIGTERM, Ctrl-C or the inactivity timer, and returns the exit code.

The inactivity timer (``--killafter``) restarts on every accepted inference request only, not
on probes, metrics, the status page or requests refused for auth. When it fires, or on
SIGTERM/SIGINT, the server stops accepting inference requests (503), finishes the ones in
flight, stops listening, closes the pipe and exits 0.

HTTP is served by granian's Rust HTTP stack through its WSGI interface, embedded in this
process (so the model and its batching pipe are shared by every request); waitress is the
pure-Python fallback (``http_server="waitress"``). bench/bench_wsgi.py measured the choice.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from .config import ServeConfig, resolve_store_url
from .errors import ConfigError
from .loader import LoadedModel, load_model
from .server import AppState, create_app, state_of
from .service import ModelService

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0
SUMMARY_INTERVAL = 60.0


class HttpServer(Protocol):
    """A WSGI server that runs in background threads."""

    port: int

    def start(self) -> None:
        """Listen; return once connections are accepted."""

    def stop(self) -> None:
        """Stop listening and join every thread."""


def _port_error(host: str, port: int, e: OSError) -> ConfigError:
    return ConfigError(
        f"cannot listen on {host}:{port}: {e.strerror or e}. Port {port} may be in use by "
        "another program: stop it, or pass a different --port (0 picks a free one)"
    )


def _probe_port(host: str, port: int) -> int:
    """Check that ``host:port`` can be bound and return the port (0: a free one).

    :raises ConfigError: when it cannot be bound (in use, no such address).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise _port_error(host, port, e) from e
        return int(s.getsockname()[1])


def _wait_listening(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() < deadline:
        if not alive():
            raise ConfigError(f"the HTTP server on {host}:{port} stopped while starting")
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise ConfigError(f"the HTTP server did not start listening on {host}:{port} in {timeout}s")


class GranianServer:
    """granian's Rust HTTP server, WSGI interface, embedded in this process (one worker)."""

    def __init__(self, app: Any, host: str, port: int, threads: int) -> None:
        self.app = app
        self.host = host
        self.port = _probe_port(host, port)
        self.threads = threads
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.serve(target_loader=lambda *a, **k: self.app)
        except BaseException as e:  # SystemExit from granian's shutdown included
            if not (isinstance(e, SystemExit) and not e.code):
                self._error = e
                logger.error("HTTP server stopped: %s", e)

    def start(self) -> None:
        self._server = _embedded_granian()(
            "studioserve:app",
            address=self.host,
            port=self.port,
            interface="wsgi",
            workers=1,
            blocking_threads=self.threads,
            log_enabled=False,
            backlog=2048,
        )
        self._thread = threading.Thread(target=self._run, name="studioserve-http", daemon=True)
        self._thread.start()
        _wait_listening(self.host, self.port, 15.0, self._thread.is_alive)

    def stop(self) -> None:
        if self._server is not None:
            self._server.signal_handler_interrupt()
        if self._thread is not None:
            self._thread.join(15.0)
            self._thread = None


_GRANIAN_CLASS: Any = None
_GRANIAN_LOCK = threading.Lock()


def _embedded_granian() -> Any:
    """granian's thread-worker server, usable in-process on a GIL build and off the main thread.

    granian's own entry point runs its WSGI worker in a thread only on free-threaded Python
    and installs signal handlers (main thread only). We run it embedded: our process owns
    the signals, and the worker thread serves the app object directly.
    """
    global _GRANIAN_CLASS
    with _GRANIAN_LOCK:
        if _GRANIAN_CLASS is not None:
            return _GRANIAN_CLASS
        import granian.server.common as common
        from granian.server.mt import MTServer

        class _Embedded(MTServer):  # type: ignore[misc]
            def _check_gil(self) -> None:
                return None

            def startup(self, spawn_target: Any, target_loader: Any) -> None:
                with _GRANIAN_LOCK:
                    saved = getattr(common, "set_main_signals")  # noqa: B009
                    setattr(common, "set_main_signals", lambda *a, **k: None)  # noqa: B010
                    try:
                        super().startup(spawn_target, target_loader)  # type: ignore[no-untyped-call]
                    finally:
                        setattr(common, "set_main_signals", saved)  # noqa: B010

        _GRANIAN_CLASS = _Embedded
        return _Embedded


class WaitressServer:
    """waitress, pure Python, in this process."""

    def __init__(self, app: Any, host: str, port: int, threads: int) -> None:
        import waitress.server

        try:
            self._server = waitress.server.create_server(
                app,
                host=host,
                port=port,
                threads=threads,
                connection_limit=1000,
                backlog=2048,
                channel_timeout=120,
                ident="studioserve",
                clear_untrusted_proxy_headers=True,
            )
        except OSError as e:
            raise _port_error(host, port, e) from e
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.run, name="studioserve-http", daemon=True
        )
        self._thread.start()
        _wait_listening(self.host, self.port, 15.0, self._thread.is_alive)

    def stop(self) -> None:
        self._server.close()
        self._server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
        if self._thread is not None:
            self._thread.join(15.0)
            self._thread = None


HTTP_SERVERS: dict[str, Callable[[Any, str, int, int], HttpServer]] = {
    "granian": GranianServer,
    "waitress": WaitressServer,
}


def make_http_server(app: Any, host: str, port: int, threads: int, kind: str) -> HttpServer:
    try:
        factory = HTTP_SERVERS[kind]
    except KeyError:
        raise ConfigError(
            f"unknown HTTP server {kind!r}; choose one of {', '.join(HTTP_SERVERS)}"
        ) from None
    return factory(app, host, port, threads)


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


class ModelServer:
    """One serving lifecycle: fetch, load and warm, listen, idle watch, drain, close.

    Use as a context manager; :meth:`wait` blocks until it should exit::

        with ModelServer(ServeConfig(key="mnist-7", port=0)) as server:
            print(server.url, server.token)
            server.wait()

    :param config: what to serve and how.
    :param model: an already loaded model (skips the store and the loader), for embedding.
    :param http_server: ``"granian"`` (default) or ``"waitress"``.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        model: LoadedModel | None = None,
        http_server: str = "granian",
    ) -> None:
        self.config = config
        self.http_server = http_server
        self._model = model
        self.token: str | None = None
        self.modeldir: Path | None = None
        self.service: ModelService | None = None
        self.app: Any = None
        self.http: HttpServer | None = None
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._closed = False

    # -- start -------------------------------------------------------------------------------

    def start(self) -> ModelServer:
        """Fetch and load the model, warm it, start listening; returns once ready."""
        cfg = self.config
        try:
            model = self._model or self._load()
            self.service = ModelService(model, request_timeout=cfg.request_timeout)
            self.token = (cfg.token or secrets.token_urlsafe(32)) if cfg.auth_enabled else None
            self.app = create_app(
                self.service,
                token=self.token,
                max_body=cfg.max_body,
                info={
                    "experiment": cfg.key,
                    "store": resolve_store_url(cfg.store),
                    "batching": {
                        "max_batch_size": cfg.max_batch_size,
                        "max_delay_ms": cfg.max_delay_ms,
                    },
                    "killafter_seconds": cfg.killafter,
                    "auth": self.token is not None,
                },
            )
            state_of(self.app).shutdown_at = self.shutdown_at
            self.http = make_http_server(
                self.app, cfg.host, cfg.port, cfg.threads, self.http_server
            )
            if model.pipe is not None:
                model.pipe.start()  # worker threads up before the first request
            self.http.start()
            self.service.ready = True
            self._watcher = threading.Thread(
                target=self._monitor, name="studioserve-monitor", daemon=True
            )
            self._watcher.start()
        except BaseException:
            self.close()
            raise
        logger.info("serving %s at %s", cfg.key, self.url)
        return self

    def _load(self) -> LoadedModel:
        from .store import open_store

        cfg = self.config
        with open_store(resolve_store_url(cfg.store)) as store:
            self.modeldir = store.fetch(cfg.key, refresh=cfg.refresh, quiet=cfg.quiet)
        return load_model(
            self.modeldir,
            cfg.wrapper,
            max_batch_size=cfg.max_batch_size,
            max_delay=cfg.max_delay_ms / 1000.0,
            queue_size=cfg.queue_size,
        )

    # -- facts -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.http.port if self.http else self.config.port

    @property
    def url(self) -> str:
        return url_for(self.config.host, self.port)

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
        """Fire the inactivity timer; log a one-line summary every minute."""
        assert self.service is not None
        activity = self.service.activity
        killafter = self.config.killafter
        tick = min(1.0, max(0.05, killafter / 20)) if killafter > 0 else 1.0
        last_summary, last_count = time.monotonic(), activity.accepted
        while not self._stop.wait(tick):
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

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested; True if it was."""
        return self._stop.wait(timeout)

    def close(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, finish in-flight requests, stop listening, close the pipe."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        service = self.service
        if service is not None:
            service.ready = False
            deadline = time.monotonic() + drain_timeout
            while service.activity.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            if service.activity.in_flight:
                logger.warning(
                    "%d request(s) still in flight after %gs; stopping anyway",
                    service.activity.in_flight,
                    drain_timeout,
                )
        if self.http is not None:
            self.http.stop()
        if self._watcher is not None:
            self._watcher.join(5.0)
        if service is not None:
            service.close()
        elif self._model is not None:
            self._model.close()
        logger.info("server stopped (%s)", self.stop_reason or "closed")

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _signals_stop(server: ModelServer) -> Iterator[None]:
    """SIGTERM and SIGINT ask the server to drain and exit (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s; draining and shutting down", signal.Signals(signum).name)
        server.request_stop(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def serve(
    config: ServeConfig,
    *,
    on_ready: Callable[[ModelServer], None] | None = None,
    http_server: str = "granian",
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
    with _signals_stop(server):
        server.start()
        try:
            if on_ready is not None:
                on_ready(server)
            server.wait()
        finally:
            server.close()
    return 0
