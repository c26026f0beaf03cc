"""What ``studio bench`` measures and how: :class:`BenchConfig` and the parsing of level lists.

A config is checked when it is built, so nothing later (the probe, the generator processes)
has to handle a bad setting; the errors are :class:`~studioserve.errors.ConfigError` with the
command-line option in the message.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError

#: The protocols ``studio bench`` can speak.
PROTOCOLS: Final = ("pickle", "oip", "grpc")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure and how.

    :param url: the server's base URL (``http://host:port``); for the pickle protocol a path,
        if given, is the endpoint (default ``/``); for gRPC its address (``host:port`` or
        ``grpc://host:port``).
    :param concurrency: closed-loop levels: connections each sending back to back.
    :param request_rates: open-loop levels in requests per second (replaces ``concurrency``).
    :param duration: seconds per level (ignored when ``requests`` is given).
    :param requests: requests per level.
    :param protocol: ``"pickle"`` (``POST /``), ``"oip"`` (``POST /v2/models/{name}/infer``)
        or ``"grpc"`` (the KServe v2 gRPC ``ModelInfer``, raw tensors).
    :param body_file: send this file's bytes as the body instead of a synthesised one.
    :param content_type: the body file's Content-Type (default: from its suffix).
    :param headers: extra request headers.
    :param batch: examples per synthesised request.
    :param binary: OIP only: send tensors with the binary data extension (else JSON).
    :param model: OIP and gRPC: the model name (default: the studioserve server's experiment;
        over gRPC the one model the repository index lists).
    :param token: bearer token.
    :param warmup: seconds of discarded load before each level.
    :param processes: generator processes (default: CPU count, at most 4, at most the level).
    :param timeout: seconds a request may take before it counts as an error.
    :param seed: seed of the synthesised data.
    """

    url: str
    concurrency: tuple[int, ...] = (1, 8, 64)
    request_rates: tuple[float, ...] = ()
    duration: float = 10.0
    requests: int | None = None
    protocol: str = "pickle"
    body_file: Path | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    batch: int = 1
    binary: bool = True
    model: str | None = None
    token: str | None = None
    warmup: float = 1.0
    processes: int | None = None
    timeout: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; use pickle, oip or grpc")
        if not self.request_rates and not self.concurrency:
            raise ConfigError("give at least one concurrency level or request rate")
        if any(c < 1 for c in self.concurrency):
            raise ConfigError(f"concurrency levels must be >= 1, not {list(self.concurrency)}")
        if any(not r > 0 for r in self.request_rates):
            raise ConfigError(f"request rates must be > 0, not {list(self.request_rates)}")
        if self.requests is None and not self.duration > 0:
            raise ConfigError("--duration must be > 0 seconds (or pass --requests)")
        if self.requests is not None and self.requests < 1:
            raise ConfigError("--requests must be >= 1")
        if self.batch < 1:
            raise ConfigError("--batch must be >= 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must be >= 0 seconds")
        if self.processes is not None and self.processes < 1:
            raise ConfigError("--processes must be >= 1")

    @property
    def mode(self) -> str:
        """``"rate"`` (open loop) or ``"concurrency"`` (closed loop)."""
        return "rate" if self.request_rates else "concurrency"

    @property
    def levels(self) -> tuple[float, ...]:
        """The levels to measure, in order: request rates, else concurrencies (as floats)."""
        return self.request_rates if self.request_rates else tuple(map(float, self.concurrency))

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC ``authorization`` metadata for :attr:`token` (empty without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @property
    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header for :attr:`token` (empty without one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def default_processes(cfg: BenchConfig) -> int:
    """Generator processes: ``cfg.processes``, else the CPU count (at most 4), never more than
    the largest concurrency level."""
    n = cfg.processes or min(4, os.cpu_count() or 1)
    if cfg.mode == "concurrency":
        n = min(n, max(cfg.concurrency))
    return max(1, n)


def parse_levels(text: str, kind: type[int] | type[float] = int) -> tuple[Any, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``.

    :raises ValueError: for anything that is not a comma-separated list of numbers.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("give at least one level, e.g. 1,8,64")
    return tuple(kind(p) for p in parts)
