"""studioserve: a trained experiment behind a batched, safe HTTP endpoint in one command.

Public API::

    from studioserve import ModelPipe, Client, ServeConfig, serve
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ServeConfig as ServeConfig
from .errors import StudioServeError as StudioServeError

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ModelPipe",
    "ServeConfig",
    "StudioServeError",
    "__version__",
    "serve",
]

if TYPE_CHECKING:
    from .client import Client as Client
    from .lifecycle import serve as serve
    from .pipelines import ModelPipe as ModelPipe


def __getattr__(name: str) -> Any:
    # Lazy so that `import studioserve` (and `studio --help`) stays fast.
    if name == "ModelPipe":
        from .pipelines import ModelPipe

        return ModelPipe
    if name == "Client":
        from .client import Client

        return Client
    if name == "serve":
        from .lifecycle import serve

        return serve
    raise AttributeError(f"module 'studioserve' has no attribute {name!r}")
