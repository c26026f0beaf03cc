"""``studio ray status`` and ``studio ray stop``: the studioserve applications on a Ray cluster.

An application is studioserve's when its ingress deployment is studioserve's
(:data:`~.app.INGRESS`, with ``model-<key>`` deployments beside it). :func:`ray_status` lists
each with its status, its models' replica counts and the proxy's URL; :func:`ray_stop`
deletes applications by name (what a driver that was killed with SIGKILL left behind).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import StudioServeError
from .backend import NAMESPACE, import_ray

logger = logging.getLogger(__name__)

__all__ = ["ray_status", "ray_stop"]


@contextlib.contextmanager
def _joined(address: str) -> Iterator[Any]:
    """Ray, connected to the cluster at ``address`` for the block (left as it was found)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise StudioServeError(f"no Ray cluster answers at {address!r}: {e}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _ours(app: Any) -> bool:
    from .app import INGRESS

    return INGRESS in app.deployments and any(name.startswith("model-") for name in app.deployments)


def ray_status(address: str = "auto") -> list[dict[str, Any]]:
    """Each studioserve application on the cluster at ``address``: name, status, URL, models.

    :raises StudioServeError: when no Ray cluster answers at ``address``.
    """
    with _joined(address):
        from ray import serve
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return []
        http = getattr(client, "http_config", None)
        url = f"http://{getattr(http, 'host', '127.0.0.1')}:{getattr(http, 'port', 8000)}"
        out = []
        for name, app in sorted(serve.status().applications.items()):
            if not _ours(app):
                continue
            models = {}
            for dep_name, dep in sorted(app.deployments.items()):
                if dep_name.startswith("model-"):
                    models[dep_name[6:]] = {
                        "status": str(getattr(dep.status, "value", dep.status)),
                        "replicas": {
                            str(getattr(s, "value", s)): n for s, n in dep.replica_states.items()
                        },
                    }
            out.append(
                {
                    "name": name,
                    "status": str(getattr(app.status, "value", app.status)),
                    "url": url,
                    "models": models,
                }
            )
        return out


def ray_stop(names: list[str], address: str = "auto") -> list[str]:
    """Delete the named studioserve applications (all of them when ``names`` is empty).

    :returns: a line per application deleted.
    """
    with _joined(address):
        from ray import serve

        apps = serve.status().applications
        wanted = names or [n for n, app in apps.items() if _ours(app)]
        lines = []
        for name in wanted:
            if name not in apps or not _ours(apps[name]):
                raise StudioServeError(f"no studioserve application named {name!r} on this cluster")
            serve.delete(name)
            lines.append(f"deleted {name}")
        return lines
