"""The Ray Serve backend: the same endpoint, on as many replicas and machines as a Ray cluster has.

``studio serve KEY [KEY ...] --backend ray`` runs the models as one Ray Serve application:

- one **model deployment** per served model (:class:`~.replica.ModelReplica`): each replica
  loads the model from the store (through the verified cache on its node) exactly as the local
  server does (:class:`~studioserve.runtime.catalog.ModelCatalog`) and batches across the
  requests it is sent in the model's own :class:`~studioserve.pipelines.ModelPipe`;
- one **ingress deployment** (:class:`~.ingress.Ingress`) behind Ray Serve's HTTP proxy: the
  local server's Flask app and request path (:class:`~studioserve.http.asgi.AsgiApp` over
  :class:`~studioserve.serving.inference.RequestHandler`), whose models are
  :class:`~.remote.RemoteModel` objects that call the model deployments.

:func:`~.backend.serve_on_ray` is the lifecycle (connect or start Ray, run the application,
inactivity timer, drain, delete everything it created); :func:`~.status.ray_status` lists the
studioserve applications on a cluster. Ray is an optional extra (``studioserve[ray]``); nothing
outside this package imports it, and importing this package does not either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import serve_on_ray
    from .options import RayOptions
    from .status import ray_status, ray_stop

__all__ = ["RayOptions", "ray_status", "ray_stop", "serve_on_ray"]

_WHERE = {
    "RayOptions": ".options",
    "serve_on_ray": ".backend",
    "ray_status": ".status",
    "ray_stop": ".status",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(where, __name__), name)
