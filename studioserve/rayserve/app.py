"""The Ray Serve application of one ``studio serve --backend ray``: its deployments and options.

:func:`build_application` makes one model deployment per served model (``model-<key>``,
:class:`~.replica.ModelReplica`, with the replica options of :class:`~.options.RayOptions`)
and the ingress deployment (``ingress``, :class:`~.ingress.Ingress`) bound to their handles.
The ingress asks Ray for no CPU of its own (like Ray's proxy, it mostly waits); each model
replica asks for ``RayOptions.cpus`` and ``RayOptions.gpus``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve

from ..config import ServeConfig
from .ingress import Ingress
from .options import RayOptions
from .replica import ModelReplica

__all__ = ["INGRESS", "build_application", "model_deployment_name"]

#: the ingress deployment's name
INGRESS = "ingress"


def model_deployment_name(key: str) -> str:
    """The deployment that serves model ``key``."""
    return f"model-{key}"


def build_application(
    config: ServeConfig,
    options: RayOptions,
    token: str | None,
    models: Mapping[str, Mapping[str, Any]],
) -> Any:
    """The application (``Deployment.bind()``) serving ``models``.

    :param models: per model key, its ``serve.deployment`` options
        (:meth:`RayOptions.deployment`).
    """
    bound = {}
    for key, deployment_options in models.items():
        deployment = serve.deployment(name=model_deployment_name(key), **deployment_options)(
            ModelReplica
        )
        bound[key] = deployment.bind(config, key)
    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=1,
        max_ongoing_requests=max(1024, config.queue_size),
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=max(5.0, min(60.0, config.request_timeout)),
    )(serve.ingress()(Ingress))
    return ingress.bind(config, token, bound)
