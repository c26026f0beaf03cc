"""Start, run and stop a server: the lifecycle (:mod:`.server`) and the models it loads from
the store, with their versions, settings and hot reloads (:mod:`.catalog`)."""

from __future__ import annotations

from .catalog import ModelCatalog
from .server import DRAIN_GRACE, DRAIN_QUIET, DRAIN_TIMEOUT, ModelServer, serve

__all__ = ["DRAIN_GRACE", "DRAIN_QUIET", "DRAIN_TIMEOUT", "ModelCatalog", "ModelServer", "serve"]
