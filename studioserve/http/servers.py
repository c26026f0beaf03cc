"""The embedded HTTP servers: granian (Rust, RSGI interface) and waitress, in this process.

Both run in background threads of the serving process, so the loaded model and its batching
pipe are shared by every request; :func:`make_http_server` picks one by name and the returned
server's ``kind`` says which one actually runs. Each is given the :class:`ServedApp` and takes
the interface it speaks: granian the RSGI app (:mod:`.rsgi`: inference as coroutines on its
loop, the rest through the WSGI app in a thread pool), waitress the WSGI app.

**Why granian is embedded through its internals.** granian's public entry points
(``granian.Granian(...).serve()``, the ``granian`` CLI) own the process: they import the app
from a module path in a worker (a forked process, or on free-threaded Python a thread) and
install SIGINT/SIGTERM handlers, which only works on the main thread. ``studio serve`` needs the
opposite: the app object it already built (model loaded, pipe warm) served from a background
thread while the process keeps its own signal handling (drain, then exit). So
:func:`_embedded_granian` subclasses ``granian.server.mt.MTServer`` (the thread-worker server),
skips its ``_check_gil`` (which refuses GIL builds), and runs ``startup`` with
``granian.server.common.set_main_signals`` replaced by a no-op; :meth:`GranianServer.stop` calls
``signal_handler_interrupt`` as a signal would.

**Ports.** Every bind sets ``SO_REUSEADDR`` (granian's and waitress's own listeners, and
:func:`_probe_port`), so a restarted server binds a port whose old connections sit in
TIME-WAIT; none of ours sets ``SO_REUSEPORT`` (granian's listener does: the probe keeps a
second server off a port a first one listens on).

**The pin.** Those are private names, so pyproject.toml pins granian to the minor series this
was tested with (:data:`GRANIAN_TESTED`).

**The fallback.** Once per process, :func:`check_granian` inspects those internals without
starting anything: that the modules import, that ``MTServer`` has the methods the subclass
overrides or calls, that ``startup`` still looks up ``set_main_signals`` in
``granian.server.common`` (so the patch takes effect), and that the constructor, ``startup`` and
``serve`` accept the arguments we pass. If anything is off, ``make_http_server(kind="granian")``
logs one warning naming the granian version and what changed, and returns a waitress server
instead (``kind == "waitress"``): slower, but it serves.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: The granian versions the embedding was tested with (keep in step with pyproject.toml).
GRANIAN_TESTED = ">=2.8,<2.9"

#: What the subclass in :func:`_embedded_granian` overrides or calls on ``MTServer``.
_MTSERVER_NAMES = ("_check_gil", "startup", "serve", "signal_handler_interrupt")


@dataclass(frozen=True)
class ServedApp:
    """One server's application in both interfaces.

    :param wsgi: the WSGI app (Flask behind FastPredict).
    :param rsgi: the RSGI app (:class:`~studioserve.http.rsgi.RsgiApp`), for granian.
    """

    wsgi: Any
    rsgi: Any = None


def _wsgi_of(app: Any) -> Any:
    return app.wsgi if isinstance(app, ServedApp) else app


class HttpServer(Protocol):
    """An HTTP server that runs in background threads."""

    #: which server this is: ``"granian"`` or ``"waitress"``.
    kind: str
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

    Binds with ``SO_REUSEADDR``, as granian's listener does (and waitress's, and every
    production server's): the connections of a server that just stopped wait in TIME-WAIT on
    its port for a minute, which must not keep the next server off it. Never ``SO_REUSEPORT``:
    granian sets that on its own listener, so this probe is what keeps a second server off a
    port a listening one holds (Linux refuses this bind while any socket listens there).

    :raises ConfigError: when it cannot be bound (in use, no such address).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def _granian_kwargs(host: str, port: int, threads: int, interface: str = "rsgi") -> dict[str, Any]:
    """The keyword arguments :class:`GranianServer` passes to the ``MTServer`` constructor.

    With RSGI, granian's blocking threads must be 1 (the app's own pool runs the blocking
    work, :class:`~studioserve.http.rsgi.RsgiApp`); with WSGI they are the app's threads.
    """
    return {
        "address": host,
        "port": port,
        "interface": interface,
        "workers": 1,
        "blocking_threads": threads if interface == "wsgi" else 1,
        "loop": event_loop(),
        "log_enabled": False,
        "backlog": 2048,
    }


def event_loop() -> str:
    """The asyncio loop granian's RSGI worker runs: uvloop where it is installed (a
    dependency on Linux and macOS), else asyncio's own.

    Measured with the same bare handler (decode, ``x @ W``, encode) under wrk at 64
    connections on 2 cores: uvloop about 13,500 req/s at 108 us of server CPU per request,
    asyncio's loop about 7,400 at 182 us (measured for issue 15; ``bench/bench_server.py``
    measures the whole server).
    """
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind :func:`event_loop` names, for a server that runs its own (the
    gRPC server, :mod:`studioserve.grpcapi.server`)."""
    if event_loop() == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


class GranianServer:
    """granian's Rust HTTP server embedded in this process (one worker): the RSGI app when
    the :class:`ServedApp` has one, else its WSGI app."""

    kind = "granian"

    def __init__(self, app: Any, host: str, port: int, threads: int) -> None:
        rsgi = app.rsgi if isinstance(app, ServedApp) else None
        self.interface = "wsgi" if rsgi is None else "rsgi"
        self.app = _wsgi_of(app) if rsgi is None else rsgi
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
            **_granian_kwargs(self.host, self.port, self.threads, self.interface),
        )
        self._thread = threading.Thread(target=self._run, name="studioserve-http", daemon=True)
        self._thread.start()
        _wait_listening(self.host, self.port, 15.0, self._thread.is_alive)

    def stop(self) -> None:
        """Stop as SIGTERM stops granian: it stops listening, finishes the responses in
        progress (adding ``Connection: close``) and closes every idle kept-alive connection at
        once, so a request a client sends on one at that instant gets no answer (measured:
        11-21 of ~2,000 under 32 keep-alive clients); :meth:`ModelServer.close
        <studioserve.runtime.ModelServer.close>`'s drain grace is what prevents that."""
        if self._server is not None:
            self._server.signal_handler_interrupt()
        if self._thread is not None:
            self._thread.join(15.0)
            self._thread = None
        close = getattr(self.app, "close", None)  # the RSGI app's thread pool
        if close is not None:
            close()


@dataclass(frozen=True)
class GranianCheck:
    """What :func:`check_granian` found: the version and what is missing or changed."""

    version: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _granian_version() -> str:
    try:
        from importlib.metadata import version

        return version("granian")
    except Exception:  # not installed, or no metadata
        return "(not installed)"


def _accepts(func: Any, *args: Any, **kwargs: Any) -> str | None:
    """None if ``func``'s signature accepts these arguments, else why not."""
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as e:
        return str(e)
    except ValueError as e:  # no signature to inspect
        return f"no signature ({e})"
    return None


@functools.cache
def check_granian() -> GranianCheck:
    """Check, once per process, that granian's internals are what the embedding relies on.

    Imports granian and inspects it; starts, binds and configures nothing.
    """
    version = _granian_version()
    try:
        import granian.server.common as common
        from granian.server.mt import MTServer
    except Exception as e:  # ImportError, or whatever importing granian raised
        return GranianCheck(version, (f"granian.server.mt.MTServer cannot be imported ({e})",))

    problems: list[str] = []
    missing = [n for n in _MTSERVER_NAMES if not callable(getattr(MTServer, n, None))]
    problems += [f"MTServer.{n} is missing" for n in missing]
    if not callable(getattr(common, "set_main_signals", None)):
        problems.append("granian.server.common.set_main_signals is missing")
    elif "startup" not in missing:
        startup = MTServer.startup
        code = getattr(startup, "__code__", None)
        if (
            code is None
            or "set_main_signals" not in code.co_names
            or getattr(startup, "__globals__", None) is not vars(common)
        ):
            problems.append(
                "MTServer.startup no longer calls granian.server.common.set_main_signals"
            )
    why = _accepts(MTServer, "studioserve:app", **_granian_kwargs("127.0.0.1", 0, 1))
    if why:
        problems.append(f"MTServer() does not accept our arguments: {why}")
    if "startup" not in missing and (why := _accepts(MTServer.startup, None, None, None)):
        problems.append(f"MTServer.startup(spawn_target, target_loader) fails: {why}")
    if "serve" not in missing and (why := _accepts(MTServer.serve, None, target_loader=None)):
        problems.append(f"MTServer.serve(target_loader=...) fails: {why}")
    return GranianCheck(version, tuple(problems))


def reset_granian_check() -> None:
    """Forget the cached :func:`check_granian` result and embedded class (for tests)."""
    global _GRANIAN_CLASS
    check_granian.cache_clear()
    with _GRANIAN_LOCK:
        _GRANIAN_CLASS = None


_GRANIAN_CLASS: Any = None
_GRANIAN_LOCK = threading.Lock()
_SIGNALS_LOCK = threading.Lock()


def _embedded_granian() -> Any:
    """granian's thread-worker server, usable in-process on a GIL build and off the main thread.

    granian's own entry point runs its WSGI worker in a thread only on free-threaded Python
    and installs signal handlers (main thread only). We run it embedded: our process owns
    the signals, and the worker thread serves the app object directly. Call it only after
    :func:`check_granian` passed (:func:`make_http_server` does).
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
                with _SIGNALS_LOCK:
                    saved = getattr(common, "set_main_signals")  # noqa: B009
                    setattr(common, "set_main_signals", lambda *a, **k: None)  # noqa: B010
                    try:
                        super().startup(spawn_target, target_loader)  # type: ignore[no-untyped-call]
                    finally:
                        setattr(common, "set_main_signals", saved)  # noqa: B010

        _GRANIAN_CLASS = _Embedded
        return _Embedded


#: the environ key where :func:`_waitress_app` notes that the app asked to close the connection
_CLOSE_KEY = "studioserve.connection_close"


def _waitress_app(app: Any) -> Callable[[dict[str, Any], Any], Any]:
    """``app`` as waitress may run it: a ``Connection`` response header is taken out.

    waitress refuses hop-by-hop headers from the app (PEP 3333: 500 instead), while granian
    passes ``Connection: close`` on and closes after the response (what the drain relies on,
    :class:`studioserve.http.pickle_routes.Drain`). So the header becomes a note in the
    environ, which :func:`_waitress_channel`'s task turns into waitress's own close.
    """

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            kept = [h for h in headers if h[0].lower() != "connection"]
            if len(kept) != len(headers):
                if any(h[0].lower() == "connection" and h[1].lower() == "close" for h in headers):
                    environ[_CLOSE_KEY] = True
                headers = kept
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return app(environ, respond)

    return wsgi


def _waitress_channel() -> type:
    """waitress's channel class with a task that closes the connection when the app asked."""
    from waitress.channel import HTTPChannel
    from waitress.task import WSGITask

    class _Task(WSGITask):  # type: ignore[misc]
        def build_response_header(self) -> bytes:
            environ = getattr(self, "environ", None)
            if environ is not None and environ.get(_CLOSE_KEY):
                self.set_close_on_finish()  # adds "Connection: close"; closes once flushed
            return super().build_response_header()  # type: ignore[no-any-return]

    class _Channel(HTTPChannel):  # type: ignore[misc]
        task_class = _Task

    return _Channel


class WaitressServer:
    """waitress, pure Python, in this process.

    :meth:`stop` is graceful, which waitress's own ``close`` is not (that closes the listener
    only: the loop thread then serves the open connections on while the task threads are gone,
    so a request on a kept-alive connection waited for its timeout): stop listening, let every
    connection finish the response it is writing, close the connections, then the threads.
    """

    kind = "waitress"

    def __init__(self, app: Any, host: str, port: int, threads: int) -> None:
        import waitress.server

        try:
            self._server = waitress.server.create_server(
                _waitress_app(_wsgi_of(app)),
                host=host,
                port=port,
                threads=threads,
                connection_limit=1000,
                backlog=2048,
                channel_timeout=120,
                ident="studioserve",
                clear_untrusted_proxy_headers=True,
            )  # binds with SO_REUSEADDR (waitress sets it on POSIX), never SO_REUSEPORT
        except OSError as e:
            raise _port_error(host, port, e) from e
        self._server.channel_class = _waitress_channel()
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.run, name="studioserve-http", daemon=True
        )
        self._thread.start()
        _wait_listening(self.host, self.port, 15.0, self._thread.is_alive)

    def _in_loop(self, fn: Callable[[], None], timeout: float = 5.0) -> None:
        """Run ``fn`` in waitress's loop thread (which owns the sockets) and wait for it."""
        done = threading.Event()

        def thunk() -> None:
            try:
                fn()
            finally:
                done.set()

        self._server.trigger.pull_trigger(thunk)
        done.wait(timeout)

    def _busy(self) -> int:
        """How many connections have a request in progress or a response left to send."""
        return sum(
            1
            for ch in list(self._server._map.values())
            if getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0)
        )

    def _close_connections(self) -> None:
        server = self._server
        for ch in list(server._map.values()):
            if ch is not server.trigger:
                ch.handle_close()
        server.trigger.close()  # the map is empty now: the loop returns

    def stop(self, timeout: float = 10.0) -> None:
        from waitress import wasyncore

        server = self._server
        thread, self._thread = self._thread, None
        if thread is None or not thread.is_alive():
            server.close()
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
            return
        self._in_loop(lambda: wasyncore.dispatcher.close(server))  # stop listening
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._in_loop(self._close_connections)
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=timeout)
        thread.join(15.0)


HTTP_SERVERS: dict[str, Callable[[Any, str, int, int], HttpServer]] = {
    "granian": GranianServer,
    "waitress": WaitressServer,
}


def make_http_server(app: Any, host: str, port: int, threads: int, kind: str) -> HttpServer:
    """The ``kind`` HTTP server for ``app`` on ``host:port`` (0: a free port), not yet started.

    ``"granian"`` falls back to waitress, with one warning, when :func:`check_granian` finds
    granian's internals changed or granian missing; the returned server's ``kind`` tells.

    :raises ConfigError: for an unknown ``kind``, or when the port cannot be bound.
    """
    if kind not in HTTP_SERVERS:
        raise ConfigError(f"unknown HTTP server {kind!r}; choose one of {', '.join(HTTP_SERVERS)}")
    if kind == "granian":
        check = check_granian()
        if not check.ok:
            logger.warning(
                "granian %s cannot be embedded (tested: granian%s): %s; waitress serves HTTP "
                "instead",
                check.version,
                GRANIAN_TESTED,
                "; ".join(check.problems),
            )
            kind = "waitress"
    return HTTP_SERVERS[kind](app, host, port, threads)


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"
