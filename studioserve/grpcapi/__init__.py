"""Open Inference Protocol over gRPC: the KServe v2 ``inference.GRPCInferenceService`` and the
Triton extensions tritonclient uses, beside the HTTP server (``studio serve --grpc-port``).

- :mod:`.proto`: the published .proto files and the code generated from them (shipped);
- :mod:`.codec`: ``ModelInferRequest``/``ModelInferResponse`` to and from the decoded form
  the HTTP protocol uses;
- :mod:`.protocol`: :class:`~.protocol.GrpcProtocol`, gRPC inference as a protocol of the one
  request path, and the table from our errors to gRPC status codes;
- :mod:`.documents`: metadata, configuration, statistics and index messages;
- :mod:`.service`: the service's calls, auth and errors;
- :mod:`.server`: ``grpc.aio`` on its own thread and event loop.

Importing this package imports nothing of gRPC; :func:`load_server` does, and says which extra
to install when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .server import GrpcServer

__all__ = ["EXTRA", "load_server"]

#: how to install what gRPC serving needs
EXTRA = "pip install 'studioserve[grpc]'"


def load_server() -> type[GrpcServer]:
    """The :class:`~.server.GrpcServer` class, importing gRPC and protobuf now.

    :raises ConfigError: naming the ``grpc`` extra when grpcio or protobuf is missing or too
        old for the generated code.
    """
    try:
        from .server import GrpcServer
    except ImportError as e:
        raise ConfigError(f"--grpc-port needs grpcio and protobuf ({e}); {EXTRA}") from e
    except Exception as e:  # the generated code's version checks (grpcio, protobuf too old)
        raise ConfigError(
            f"--grpc-port cannot load gRPC support: {type(e).__name__}: {e}; {EXTRA}"
        ) from e
    return GrpcServer
