"""The target of a benchmark, chosen once by its protocol: an HTTP request (:mod:`.target`) or
a gRPC call (:mod:`.grpc_load`, imported only for ``--protocol grpc``)."""

from __future__ import annotations

from ..errors import ConfigError
from .config import BenchConfig
from .target import Target, http_target

__all__ = ["prepare_target"]


def prepare_target(cfg: BenchConfig) -> Target:
    """Build the request every connection will send, and check one round trip works.

    :raises ClientError: when the server cannot be reached or the probe request fails.
    :raises ConfigError: for a bad URL, body file or missing model name (or, for gRPC, a
        missing ``grpc`` extra).
    """
    if cfg.protocol != "grpc":
        return http_target(cfg)
    try:
        from .grpc_load import grpc_target
    except ImportError as e:
        raise ConfigError(
            f"--protocol grpc needs grpcio ({e}); pip install 'studioserve[grpc]'"
        ) from e
    return grpc_target(cfg)
