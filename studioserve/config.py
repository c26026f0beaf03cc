"""Settings: where things live and what ``studio serve`` was asked to do.

Precedence everywhere: command-line option > environment variable > config file > default.
The config file is ``$STUDIO_CONFIG`` or ``~/.studioml/studioserve.toml``, for example::

    store = "s3://team-bucket/experiments"
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_PORT = 5000
#: the gRPC port where a port must be known ahead (a cloud firewall): Triton's
DEFAULT_GRPC_PORT = 8001
DEFAULT_HOST = "127.0.0.1"
DEFAULT_KILLAFTER = 3600.0
DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_BATCH_SIZE = 128
DEFAULT_QUEUE_SIZE = 4096
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_HTTP_SERVER = "granian"
#: the most keys (JSON object members, pickle dict entries) one request body may carry
DEFAULT_MAX_KEYS = 4096
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "ip6-localhost"})


def config_dir() -> Path:
    """The user's studioserve folder (``$STUDIO_HOME`` or ``~/.studioml``); not created here."""
    env = os.environ.get("STUDIO_HOME")
    return Path(env).expanduser() if env else Path.home() / ".studioml"


def config_file() -> Path:
    env = os.environ.get("STUDIO_CONFIG")
    return Path(env).expanduser() if env else config_dir() / "studioserve.toml"


def load_config_file() -> dict[str, Any]:
    """The config file's settings, or ``{}`` when there is none.

    :raises ConfigError: when the file exists but is not valid TOML.
    """
    path = config_file()
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}; fix or remove it") from e


def default_store_url() -> str:
    """The default experiment store: ``$STUDIO_STORE``, the config file's ``store``, or
    ``~/.studioml/experiments``."""
    env = os.environ.get("STUDIO_STORE")
    if env:
        return env
    value = load_config_file().get("store")
    if isinstance(value, str) and value:
        return value
    return str(config_dir() / "experiments")


def resolve_store_url(option: str | None) -> str:
    """The store URL to use, given the ``--store`` option (or None)."""
    return option if option else default_store_url()


def cache_dir() -> Path:
    """Where remote modeldirs are cached (``$STUDIO_CACHE`` or ``~/.studioml/cache``)."""
    env = os.environ.get("STUDIO_CACHE")
    return Path(env).expanduser() if env else config_dir() / "cache"


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL or a gRPC target writes it (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{shown}:{port}"


def is_loopback(host: str) -> bool:
    """True for hosts that only this machine can reach."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything ``studio serve`` needs; built by the CLI, consumed by :func:`studioserve.serve`.

    :param key: the experiment key (the first of ``keys`` when several are served; ``""``
        with ``all_models``).
    :param keys: every model to serve, each ``KEY`` or ``KEY@V`` (``V`` pins that version);
        empty: just ``key``.
    :param all_models: serve every experiment in the store (``--all``; with ``watch``,
        experiments added to or removed from the store appear and disappear).
    :param watch: poll the store every this many seconds and hot-reload what changed
        (None: never).
    :param instances: copies of each model's batched stage (``--instances``; None: the
        model's serving.toml, else 1).
    :param version_policy: every model's version policy (``latest``, ``latest:N``, ``all``,
        ``specific:1,3``; None: the model's serving.toml, else ``latest``).
    :param framework: load only this framework's artifacts (``--framework``; None: the
        model's serving.toml, else what the modeldir holds).
    :param trust_artifact: allow artifacts that run code when they load (pickle, joblib,
        cloudpickle closures, pickled torch modules; ``--trust-artifact``); serving.toml's
        ``trust = true`` does the same for one model.
    :param explicit: the fields set on purpose (the CLI's options given), which override
        each model's serving.toml; None: the fields that differ from their defaults.
    :param store: the store URL (None: the default store).
    :param wrapper: a wrapper file path or module name, or None.
    :param host: the address to bind; any non-loopback address turns on token auth.
    :param port: the TCP port (0: any free port).
    :param grpc_port: also serve the Open Inference Protocol over gRPC on this port of
        ``host`` (0: any free port; None: no gRPC; needs the ``grpc`` extra).
    :param killafter: seconds without an accepted inference request before the server exits
        (0: never).
    :param max_batch_size: the most items one model call takes.
    :param max_delay_ms: how long a batch waits for more items after its first (0: never wait).
    :param max_body: the largest request body in bytes (larger: 413).
    :param token: the bearer token; None generates one when auth is on.
    :param no_auth: turn auth off even on a non-loopback host.
    :param threads: HTTP worker threads.
    :param queue_size: the pipe's input queue bound (beyond it: 503).
    :param request_timeout: seconds a request may wait for its result (then 504).
    :param max_queue_ms: shed load: refuse a request at once (503 + Retry-After) when the work
        queued ahead of it would keep it waiting longer than this; None: a quarter of
        ``request_timeout``, at most 1000 ms.
    :param max_keys: the most keys (JSON object members) one request body may carry.
    :param http_server: the WSGI server, ``"granian"`` or ``"waitress"`` (``studio serve
        --http-server``; :func:`studioserve.serve` takes it as its ``http_server`` argument).
    :param backend: ``"local"`` (this process serves) or ``"ray"`` (a Ray Serve application on
        a local or existing Ray cluster, :mod:`studioserve.rayserve`).
    :param replicas: with the Ray backend, replicas per model (None: ``instances``, the
        model's serving.toml, else 1).
    :param autoscale: with the Ray backend, ``(min, max)`` replicas per model, scaled by Ray.
    :param ray_address: with the Ray backend, the cluster to join (``auto``,
        ``ray://HOST:PORT``); None starts a local Ray instance for as long as it serves.
    :param refresh: ignore the local cache of a remote store.
    :param quiet: no progress bars.
    :param verbose: debug logging.
    """

    key: str = ""
    keys: tuple[str, ...] = ()
    all_models: bool = False
    watch: float | None = None
    instances: int | None = None
    version_policy: str | None = None
    framework: str | None = None
    trust_artifact: bool = False
    explicit: frozenset[str] | None = None
    store: str | None = None
    wrapper: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    grpc_port: int | None = None
    killafter: float = DEFAULT_KILLAFTER
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_delay_ms: float = 0.0
    max_body: int = DEFAULT_MAX_BODY
    token: str | None = None
    no_auth: bool = False
    threads: int = 32
    queue_size: int = DEFAULT_QUEUE_SIZE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_queue_ms: float | None = None
    max_keys: int = DEFAULT_MAX_KEYS
    http_server: str = DEFAULT_HTTP_SERVER
    backend: str = "local"
    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    ray_address: str | None = None
    refresh: bool = False
    quiet: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        if not self.keys and self.key:
            object.__setattr__(self, "keys", (self.key,))
        if self.keys and not self.key:
            object.__setattr__(self, "key", self.keys[0].partition("@")[0])
        if not self.keys and not self.all_models:
            raise ConfigError("name an experiment key to serve (or pass --all)")
        if self.watch is not None and self.watch <= 0:
            raise ConfigError("--watch must be > 0 seconds")
        if self.instances is not None and self.instances < 1:
            raise ConfigError("--instances must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range; pass --port between 0 and 65535")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ConfigError(
                f"gRPC port {self.grpc_port} is out of range; pass --grpc-port between 0 and 65535"
            )
        if self.grpc_port is not None and self.backend == "ray":
            raise ConfigError("--grpc-port is served by the local backend only; drop --backend ray")
        if self.killafter < 0:
            raise ConfigError("--killafter must be >= 0 (0 means never)")
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be >= 1")
        if self.max_delay_ms < 0:
            raise ConfigError("--max-delay-ms must be >= 0")
        if self.max_body < 1:
            raise ConfigError("--max-body must be >= 1 byte")
        if self.threads < 1:
            raise ConfigError("--threads must be >= 1")
        if self.max_keys < 1:
            raise ConfigError("--max-keys must be >= 1")
        if self.max_queue_ms is not None and self.max_queue_ms <= 0:
            raise ConfigError("--max-queue-ms must be > 0 (leave it out for the automatic bound)")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"--backend {self.backend!r}: use local or ray")
        if self.backend != "ray":
            given = [
                flag
                for flag, value in (
                    ("--replicas", self.replicas),
                    ("--autoscale", self.autoscale),
                    ("--ray-address", self.ray_address),
                )
                if value is not None
            ]
            if given:
                raise ConfigError(f"{', '.join(given)} need(s) --backend ray")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError("--replicas must be >= 1")
        if self.replicas is not None and self.autoscale is not None:
            raise ConfigError("give --replicas or --autoscale, not both")

    @property
    def auth_enabled(self) -> bool:
        """Token auth is on for non-loopback hosts unless ``no_auth``, or when a token is given."""
        if self.no_auth:
            return False
        return self.token is not None or not is_loopback(self.host)

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    def is_explicit(self, name: str) -> bool:
        """Whether field ``name`` was set on purpose (so it overrides serving.toml)."""
        if self.explicit is not None:
            return name in self.explicit
        default = next(f for f in dataclasses.fields(self) if f.name == name).default
        return bool(getattr(self, name) != default)

    def models(self) -> list[tuple[str, int | None]]:
        """``keys`` as ``(key, pinned version or None)``.

        :raises ConfigError: for a ``KEY@V`` whose ``V`` is not a positive number.
        """
        out: list[tuple[str, int | None]] = []
        for spec in self.keys:
            key, at, version = spec.partition("@")
            if not at:
                out.append((key, None))
                continue
            if not version.isdigit() or int(version) < 1:
                raise ConfigError(
                    f"{spec!r}: the version after '@' must be a positive number (KEY@3)"
                )
            out.append((key, int(version)))
        return out
