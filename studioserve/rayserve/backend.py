"""Run ``studio serve --backend ray``: connect to (or start) Ray, run the application, watch it,
drain it and delete everything it created.

:class:`RayBackend` is the lifecycle as a context manager; :func:`serve_on_ray` runs one until
SIGTERM, Ctrl-C or ``--killafter`` and returns the exit code. In order:

1. Ray: with no ``--ray-address`` a local Ray instance is started on this machine (bound to
   127.0.0.1, no dashboard, no usage reporting) and stopped again on exit; with one, the
   cluster is joined and left as it was found.
2. Serve: started with the HTTP proxy on ``--host``/``--port`` unless the cluster already runs
   it (then its proxy's address is used, and it is left running on exit); an application of
   the same name already there is an error naming ``studio ray stop``.
3. The application (:mod:`.app`): each model's deployment options from its serving.toml and
   the command line (:class:`~.options.RayOptions`), read here; ``serve.run`` returns once
   every replica has loaded its model. A model that cannot be loaded is a startup error that
   names the replica's own error, and the application is deleted.
4. Every second (:meth:`RayBackend._monitor`): Ray's replica states go to the ingress (which
   makes ``/readyz`` 200 only while every model has a running replica), and the ingress's
   activity comes back: ``--killafter`` seconds without an accepted inference request stop it.
5. Stop: the ingress drains (new inference requests get 503, in-flight ones finish), then the
   application is deleted, Serve is shut down if this started it and nothing else runs on
   it, and Ray is stopped if this started it. Every step runs whatever failed before it.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable
from typing import Any

from ..config import DEFAULT_MAX_BATCH_SIZE, ServeConfig, is_loopback, resolve_store_url
from ..errors import ConfigError, StudioServeError
from ..http.servers import url_for
from ..runtime.catalog import ModelCatalog
from ..runtime.server import SignalHandler, stop_on_signals
from ..serving.repository import ModelRepository
from ..store import open_store
from .options import RayOptions

logger = logging.getLogger(__name__)

__all__ = ["RayBackend", "serve_on_ray"]

#: seconds between the driver's looks at the application (replica states, activity)
TICK = 1.0
#: seconds in-flight requests get to finish once a stop begins
DRAIN_TIMEOUT = 30.0
#: seconds a deleted application gets to go before the local Ray instance is stopped
DELETE_TIMEOUT = 60.0
#: what sets how often Ray Serve's replicas and handles report their load to the autoscaler
METRIC_PUSH_VARIABLES = (
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
)
#: the namespace studioserve's driver joins (Serve's own actors live in "serve")
NAMESPACE = "studioserve"


def import_ray() -> Any:
    """The ``ray`` module, or a startup error naming the extra."""
    try:
        import ray
        from ray import serve  # noqa: F401  (the extra is ray[serve])
    except ImportError as e:
        raise ConfigError(
            "--backend ray needs Ray Serve: pip install 'studioserve[ray]' "
            f"(importing it failed: {e})"
        ) from None
    return ray


class RayBackend:
    """One Ray Serve deployment of the configured models (see the module docstring).

    :param config: what to serve (``backend="ray"``).
    :param options: where and how (default: from ``config``).
    """

    def __init__(self, config: ServeConfig, options: RayOptions | None = None) -> None:
        self.config = config
        self.options = options or RayOptions.from_config(config)
        self.token: str | None = None
        self.url = url_for(config.host, config.port)
        self.keys: list[str] = []
        self.stop_reason: str | None = None
        self.ingress: Any = None
        self._stop = threading.Event()
        self._monitor_thread: threading.Thread | None = None
        self._started_ray = False
        self._joined_ray = False
        self._started_serve = False
        self._deployed = False
        self._closed = False
        self._last: dict[str, float] = {}
        #: the handler SIGTERM and SIGINT must reach (set by serve_on_ray)
        self.signal_handler: SignalHandler | None = None

    # -- start -------------------------------------------------------------------------------

    def start(self) -> RayBackend:
        """Connect or start Ray, deploy the application; returns once every model is up."""
        cfg = self.config
        try:
            ray = import_ray()
            from ray import serve

            from .app import build_application

            self._connect(ray)
            self._start_serve(serve)
            models = self._deployment_options()
            self.token = (cfg.token or secrets.token_urlsafe(32)) if cfg.auth_enabled else None
            app = build_application(cfg, self.options, self.token, models)
            if self._stop.is_set():
                return self
            logger.info(
                "deploying %s to Ray Serve as application %r", ", ".join(models), self.app_name
            )
            self._deployed = True  # from here on, close deletes the application
            try:
                self.ingress = serve.run(
                    app,
                    name=self.app_name,
                    route_prefix="/",
                    # a line per request in every replica's log costs more than our path
                    logging_config={
                        "enable_access_log": cfg.verbose,
                        "log_level": "DEBUG" if cfg.verbose else "WARNING",
                    },
                )
            except Exception as e:  # a replica that would not start; the prefix taken; ...
                raise StudioServeError(_deploy_failure(serve, self.app_name, str(e))) from None
            self._tick()
            self._monitor_thread = threading.Thread(
                target=self._monitor, name="studioserve-ray-monitor", daemon=True
            )
            self._monitor_thread.start()
        except BaseException:
            self.close()
            raise
        logger.info("serving %s on Ray Serve at %s", ", ".join(self.keys), self.url)
        return self

    @property
    def app_name(self) -> str:
        return self.options.app_name

    def _connect(self, ray: Any) -> None:
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = not self.config.verbose
        if self.options.address is None:
            logger.info("starting a local Ray instance")
            for name in METRIC_PUSH_VARIABLES:  # the autoscaler sees load within a second
                os.environ.setdefault(name, "1")
            ray.init(
                address="local",
                include_dashboard=False,
                namespace=NAMESPACE,
                log_to_driver=not quiet,
                configure_logging=False,
                _node_ip_address="127.0.0.1",
            )
            self._started_ray = True
        else:
            logger.info("joining the Ray cluster at %s", self.options.address)
            ray.init(
                address=self.options.address,
                namespace=NAMESPACE,
                log_to_driver=not quiet,
                configure_logging=False,
            )
            self._joined_ray = True
        if self.signal_handler is not None:
            _reclaim_signals(self.signal_handler)

    def _start_serve(self, serve: Any) -> None:
        from ray.serve.context import _get_global_client

        cfg = self.config
        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            serve.start(
                http_options={
                    "host": cfg.host,
                    "port": cfg.port,
                    # the request path has its own timeout (504); the proxy's must not cut first
                    "request_timeout_s": cfg.request_timeout + 30.0,
                },
            )
            self._started_serve = True
            return
        if self.app_name in serve.status().applications:
            raise StudioServeError(
                f"the Ray cluster already runs an application named {self.app_name!r}; stop it "
                f"with 'studio ray stop {self.app_name}' (see 'studio ray status')"
            )
        http = getattr(client, "http_config", None)
        host, port = getattr(http, "host", None), getattr(http, "port", None)
        if host is not None and port is not None:
            if (host, port) != (cfg.host, cfg.port):
                logger.warning(
                    "this cluster's Serve HTTP proxy already listens on %s:%s (not %s:%s)",
                    host,
                    port,
                    cfg.host,
                    cfg.port,
                )
            self.url = url_for(str(host), int(port))
            if not is_loopback(str(host)) and not cfg.auth_enabled:
                logger.warning("the proxy listens off loopback and auth is off (--no-auth)")

    def _deployment_options(self) -> dict[str, dict[str, Any]]:
        """Each model's deployment options, from its serving.toml and the command line."""
        cfg = self.config
        store = open_store(resolve_store_url(cfg.store))
        try:
            catalog = ModelCatalog(cfg, store, ModelRepository())
            self.keys = catalog.wanted()
            if not self.keys:
                raise ConfigError(
                    "the store holds no experiment to serve; add one with 'studio experiments add'"
                )
            out = {}
            for key in self.keys:
                settings = catalog.settings(key)
                if settings.ensemble:
                    raise ConfigError(
                        f"{key!r} is an ensemble; the Ray backend serves models, not ensembles "
                        "(serve it with the local backend)"
                    )
                batch = cfg.max_batch_size or DEFAULT_MAX_BATCH_SIZE
                if not cfg.is_explicit("max_batch_size") and settings.max_batch_size:
                    batch = settings.max_batch_size
                out[key] = self.options.deployment(
                    cfg, instances=settings.instances, max_batch_size=batch
                )
            return out
        finally:
            store.close()

    # -- run ---------------------------------------------------------------------------------

    def _tick(self) -> dict[str, float]:
        from ray import serve

        from .app import model_deployment_name

        app = serve.status().applications.get(self.app_name)
        states: dict[str, dict[str, int]] = {}
        for key in self.keys:
            found = app.deployments.get(model_deployment_name(key)) if app is not None else None
            states[key] = (
                {str(getattr(s, "value", s)): n for s, n in found.replica_states.items()}
                if found is not None
                else {}
            )
        activity: dict[str, float] = self.ingress.tick.remote(states).result(timeout_s=30.0)
        self._last = activity
        return activity

    def _monitor(self) -> None:
        killafter = self.config.killafter
        tick = min(TICK, max(0.05, killafter / 20)) if killafter > 0 else TICK
        while not self._stop.wait(tick):
            try:
                activity = self._tick()
            except Exception as e:
                logger.warning("checking the Ray application failed: %s", e)
                continue
            if killafter > 0 and activity["idle_seconds"] >= killafter:
                logger.info("no inference request for %gs (--killafter); shutting down", killafter)
                self.request_stop("inactivity")
                return

    def request_stop(self, reason: str = "requested") -> None:
        """Ask it to stop (thread- and signal-safe); :meth:`wait` then returns."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    # -- stop --------------------------------------------------------------------------------

    def close(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Drain, delete the application, and stop what this started (every path)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join(TICK * 5)
        if self._deployed:
            from ray import serve

            if self.ingress is not None:
                try:
                    left = self.ingress.drain.remote(drain_timeout).result(
                        timeout_s=drain_timeout + 10.0
                    )
                    if left:
                        logger.warning("%d request(s) still in flight; stopping anyway", left)
                except Exception as e:
                    logger.warning("draining the ingress failed: %s", e)
            try:
                serve.delete(self.app_name)
                logger.info("deleted the Ray Serve application %r", self.app_name)
            except Exception:
                logger.exception("deleting the Ray Serve application %r failed", self.app_name)
        if self._started_serve:
            from ray import serve

            try:
                if not serve.status().applications:
                    serve.shutdown()
            except Exception:
                logger.exception("shutting Serve down failed")
        if self._started_ray or self._joined_ray:
            import ray

            # a local instance stops (its daemons gone before the command ends); a joined
            # cluster is only left
            _shutdown_ray(ray, wait=self._started_ray)
        logger.info("Ray backend stopped (%s)", self.stop_reason or "closed")

    def __enter__(self) -> RayBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _deploy_failure(serve: Any, app_name: str, text: str) -> str:
    """Why ``serve.run`` failed: the deployments' own messages (a replica's error), when Ray
    has them, else its error's text."""
    messages = []
    try:
        app = serve.status().applications.get(app_name)
        for name, dep in app.deployments.items() if app is not None else ():
            if dep.message:
                messages.append(f"{name}: {_last_error(dep.message)}")
    except Exception:
        logger.debug("reading the failed application's status failed", exc_info=True)
    logger.debug("serve.run failed: %s; %s", text, messages)
    detail = "; ".join(messages) or text
    return f"the Ray Serve application failed to start: {detail}"


def _last_error(message: str) -> str:
    """The last ``SomeError: text`` line of a traceback Ray reports (studioserve's own
    errors without their module path)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "Error: " in line or "Exception: " in line]
    line = errors[-1] if errors else (lines[-1] if lines else message)
    return line.replace("studioserve.errors.", "")


def _reclaim_signals(handler: SignalHandler) -> None:
    """Put the drain's SIGTERM and SIGINT handler back after ``ray.init``, which installs its
    own (a driver's SIGTERM would otherwise exit at once, or abort in Ray's core worker)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


def serve_on_ray(
    config: ServeConfig,
    options: RayOptions | None = None,
    *,
    on_ready: Callable[[RayBackend], None] | None = None,
) -> int:
    """Serve ``config``'s models on Ray Serve until SIGTERM, Ctrl-C or ``--killafter``.

    :returns: the exit code (0 after a graceful stop).
    :raises StudioServeError: when Ray is missing, a model cannot be loaded, or the cluster
        already runs an application of that name.
    """
    backend = RayBackend(config, options)
    with stop_on_signals(backend.request_stop) as handler:
        backend.signal_handler = handler
        backend.start()
        try:
            if on_ready is not None and not backend.wait(0):
                on_ready(backend)
            backend.wait()
        finally:
            backend.close()
    return 0


def _shutdown_ray(ray: Any, *, wait: bool) -> None:
    """``ray.shutdown()``; with ``wait``, until the daemons it started have exited (Ray
    2.5x and later can wait; otherwise a busy machine may keep Ray's GCS, which runs niced,
    for a minute after the command has ended)."""
    if wait and "wait_for_processes" in inspect.signature(ray.shutdown).parameters:
        ray.shutdown(wait_for_processes=True)
    else:
        ray.shutdown()
