"""Deleting what a deployment created: the one rollback, used by a failed or interrupted
launch, ``studio instances stop`` and ``studio instances list``'s clean-up.

It deletes what the deployment recorded plus whatever the cloud still has tagged with its
id, instances first and local files last. One resource's failure never stops the others. It
runs under a :class:`~studioserve.cloud.signals.Shield`: a first Ctrl-C (or SIGTERM, SIGHUP)
only says what a second one would leave behind; a second one abandons the waiting, but every
delete call left is still issued before it returns, and whatever is not confirmed gone is
returned as left (the registry keeps it for ``studio instances stop`` to retry).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

from .base import Provider, Resource, deletion_order
from .signals import Shield

logger = logging.getLogger(__name__)


def delete_one(provider: Provider, resource: Resource, *, wait: bool = True) -> str:
    """Delete one resource (a local key file here, anything else through the provider)."""
    if resource.kind == "local-key":
        removed = []
        for path in (Path(resource.id), Path(resource.id).with_suffix(".pub")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
        return (
            f"deleted the local SSH key {resource.id}"
            if removed
            else f"{resource.id} was already gone"
        )
    return provider.delete(resource, wait=wait)


def teardown(
    provider: Provider,
    deployment_id: str,
    known: Iterable[Resource],
    *,
    shield: Shield | None = None,
) -> tuple[list[str], list[Resource]]:
    """Delete ``known`` plus whatever the cloud still has tagged with the id.

    Returns (summary lines, resources left behind).

    :param shield: the caller's shield, when the rollback began before the teardown (a
        launch stops its server first); a new one otherwise.
    """
    resources = list(known)
    try:
        resources += [r for r in provider.find(deployment_id) if r not in resources]
    except Exception as e:  # the known list still gets deleted
        logger.warning("could not list the resources of %s by tag: %s", deployment_id, e)
    ordered = deletion_order(resources)
    lines: list[str] = []
    left: list[Resource] = []
    done: list[Resource] = []

    def remaining() -> list[str]:
        return [r.describe() for r in ordered if r not in done]

    with contextlib.ExitStack() as stack:
        if shield is None:
            shield = stack.enter_context(Shield(remaining))
        for resource in ordered:
            line = _delete_shielded(provider, resource, shield, left)
            done.append(resource)
            logger.info("%s", line)
            lines.append(line)
    if left:
        lines.append(
            f"run `studio instances stop {deployment_id}` to retry, or delete the resources "
            f"tagged studioserve={deployment_id} in the cloud console"
        )
    return lines, left


def _delete_shielded(
    provider: Provider, resource: Resource, shield: Shield, left: list[Resource]
) -> str:
    """One delete: waited for until the user abandons, then only issued."""
    if not shield.abandoned:
        try:
            return delete_one(provider, resource)
        except KeyboardInterrupt:
            # the second signal: make sure this one's call is issued (deletes are
            # idempotent), then the rest are issued without waiting
            left.append(resource)
            try:
                delete_one(provider, resource, wait=False)
            except Exception as e:
                return f"NOT deleted (abandoned): {resource.describe()}: {e}"
            return f"NOT confirmed deleted (abandoned while waiting): {resource.describe()}"
        except Exception as e:
            left.append(resource)
            return f"NOT deleted: {resource.describe()}: {e}"
    if resource.kind == "local-key":  # a local file: nothing to wait for
        return delete_one(provider, resource)
    left.append(resource)
    try:
        line = delete_one(provider, resource, wait=False)
    except KeyboardInterrupt:
        return f"NOT deleted (abandoned): {resource.describe()}"
    except Exception as e:
        return f"NOT deleted: {resource.describe()}: {e}"
    return f"{line} (requested, not confirmed: abandoned)"
