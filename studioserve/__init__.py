"""studioserve: a trained experiment behind a batched, safe HTTP endpoint in one command.

Public API (``__all__``; tests/test_public_api.py holds it to this list)::

    from studioserve import Client, ModelPipe, ServeConfig, StudioServeError, serve, __version__

Below these: :mod:`studioserve.pipelines`, :mod:`studioserve.models`, :mod:`studioserve.store`,
:mod:`studioserve.wire` and :mod:`studioserve.errors`; the layers are drawn in ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .config import ServeConfig as ServeConfig
from .errors import StudioServeError as StudioServeError

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
    from .pipelines import ModelPipe as ModelPipe
    from .runtime import serve as serve


def __getattr__(name: str) -> Any:
    # Lazy so that `import studioserve` (and `studio --help`) stays fast.
    if name == "ModelPipe":
        from .pipelines import ModelPipe

        return ModelPipe
    if name == "Client":
        from .client import Client

        return Client
    if name == "serve":
        from .runtime import serve

        return serve
    raise AttributeError(f"module 'studioserve' has no attribute {name!r}")
