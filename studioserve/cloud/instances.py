"""``studio instances list|stop``: the deployments this machine launched, from the local
registry, checked against their clouds; ended ones are cleaned up, stale launches rolled back."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .base import CloudOptions, Overrides, Provider
from .providers import make_provider
from .registry import InstanceRecord, Registry
from .teardown import teardown

logger = logging.getLogger(__name__)


def _provider_key(record: InstanceRecord) -> tuple[Any, ...]:
    return (
        record.cloud,
        record.region,
        record.zone,
        record.project,
        record.endpoint_url,
        record.anonymous,
    )


def _provider_for(record: InstanceRecord, cache: dict[tuple[Any, ...], Provider]) -> Provider:
    key = _provider_key(record)
    if key not in cache:
        cache[key] = make_provider(
            CloudOptions(
                cloud=record.cloud,
                gpus=0,
                region=record.region,
                zone=record.zone,
                project=record.project,
            ),
            Overrides(endpoint_url=record.endpoint_url, anonymous=record.anonymous),
        )
    return cache[key]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_instances(cloud: str | None = None, *, refresh: bool = True) -> list[InstanceRecord]:
    """The instances studioserve launched from this machine, oldest first.

    With ``refresh`` each one's state is asked from its cloud, and deployments whose instance
    has ended (the normal end: the server exited, the instance deleted itself) are cleaned up:
    leftover firewall rules / security groups and local keys are deleted and the record
    dropped. A GCE instance found stopped instead of deleted is deleted. Launches whose
    ``studio`` process died mid-way are rolled back.

    :param cloud: only this cloud (``"ec2"`` or ``"gcloud"``).
    """
    registry = Registry()
    records = [r for r in registry.load() if cloud is None or r.cloud == cloud]
    if not refresh:
        return sorted(records, key=lambda r: r.created_at)
    providers: dict[tuple[Any, ...], Provider] = {}
    kept: list[InstanceRecord] = []
    here = socket.gethostname()
    for record in records:
        if record.state == "launching" and (record.host != here or _pid_alive(record.pid)):
            kept.append(record)  # a studio process (maybe elsewhere) is launching it now
            continue
        try:
            provider = _provider_for(record, providers)
            state = provider.instance_state(record.instance_id) if record.instance_id else "gone"
        except Exception as e:  # no credentials, no network, no SDK: show it as unknown
            logger.warning("cannot ask %s about %s: %s", record.cloud, record.id, e)
            record.state = "unknown"
            kept.append(record)
            continue
        ended = state == "gone"
        stopped_gce = state == "stopped" and record.cloud == "gcloud"
        stale_launch = record.state in {"launching", "teardown-failed"}
        if ended or stopped_gce or stale_launch:
            why = (
                "ended"
                if ended
                else "stopped but not deleted"
                if stopped_gce
                else "an unfinished launch"
            )
            log = logger.warning if stopped_gce or stale_launch else logger.info
            log("%s (%s) is %s; removing what is left of it", record.id, record.instance_id, why)
            _, left = teardown(provider, record.id, record.resources)
            if left:
                record.state = "teardown-failed"
                record.resources = left
                registry.upsert(record)
                kept.append(record)
            else:
                registry.remove(record.id)
            continue
        record.state = state
        kept.append(record)
    return sorted(kept, key=lambda r: r.created_at)


def stop_instances(ids: Sequence[str] | None = None, all: bool = False) -> list[str]:
    """Delete the given deployments (ids or instance ids), or all of them; summary lines.

    :raises ConfigError: neither ids nor ``all``, or an id that is not in the registry.
    """
    registry = Registry()
    records = registry.load()
    if all:
        chosen = records
    elif ids:
        chosen = []
        for ident in ids:
            match = [r for r in records if ident in (r.id, r.instance_id)]
            if not match:
                known = ", ".join(r.id for r in records) or "none"
                raise ConfigError(
                    f"no studioserve instance {ident!r} in {registry.path} (known: {known}); "
                    "see `studio instances list`"
                )
            chosen += [r for r in match if r not in chosen]
    else:
        raise ConfigError("name the instances to stop, or pass --all")
    providers: dict[tuple[Any, ...], Provider] = {}
    lines: list[str] = []
    for record in chosen:
        provider = _provider_for(record, providers)
        summary, left = teardown(provider, record.id, record.resources)
        lines += [f"{record.id}: {line}" for line in summary]
        if left:
            record.state = "teardown-failed"
            record.resources = left
            registry.upsert(record)
        else:
            registry.remove(record.id)
    return lines
