"""The local registry of launched instances (``<config_dir>/instances.json``), behind
``studio instances list|stop``: one :class:`InstanceRecord` per deployment, written under a
file lock as soon as a launch starts and updated with every resource it creates, so a crashed
or interrupted launch can always be found and removed later."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..config import config_dir
from ..errors import CloudError
from .base import Resource, utcnow


@dataclasses.dataclass(kw_only=True)
class InstanceRecord:
    """One deployment in the local registry (what ``studio instances list`` shows).

    :param state: ``launching``, ``running``, ``pending``, ``stopping``, ``stopped``,
        ``unknown`` (the cloud could not be asked) or ``teardown-failed``.
    """

    id: str
    cloud: str
    state: str
    instance_id: str = ""
    region: str | None = None
    zone: str | None = None
    project: str | None = None
    endpoint_url: str | None = None
    anonymous: bool = False
    url: str = ""
    public_ip: str | None = None
    port: int = 0
    ssh_user: str = ""
    key_path: str = ""
    experiment: str = ""
    created_at: str = ""
    expires_at: str = ""
    killafter: float = 0.0
    pid: int = 0
    host: str = ""
    resources: list[Resource] = dataclasses.field(default_factory=list)

    @property
    def location(self) -> str:
        return self.zone or self.region or ""

    @property
    def age(self) -> _dt.timedelta:
        if not self.created_at:
            return _dt.timedelta(0)
        return utcnow() - _dt.datetime.fromisoformat(self.created_at)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["resources"] = [r.to_json() for r in self.resources]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["resources"] = [Resource.from_json(r) for r in data.get("resources", [])]
        return cls(**values)


def registry_path() -> Path:
    """The local registry of launched instances."""
    return config_dir() / "instances.json"


class Registry:
    """``instances.json`` under a file lock (several ``studio`` processes may share it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or registry_path()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=60):
            yield

    def _read(self) -> list[InstanceRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise CloudError(
                f"cannot read the instance registry {self.path}: {e}; fix or move it away "
                "(check your cloud console for instances tagged 'studioserve')"
            ) from e
        return [InstanceRecord.from_json(item) for item in data.get("instances", [])]

    def _write(self, records: list[InstanceRecord]) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "instances": [r.to_json() for r in records]}, f, indent=2)
        os.replace(tmp, self.path)

    def load(self) -> list[InstanceRecord]:
        with self._locked():
            return self._read()

    def upsert(self, record: InstanceRecord) -> None:
        with self._locked():
            records = [r for r in self._read() if r.id != record.id]
            records.append(record)
            self._write(records)

    def remove(self, deployment_id: str) -> None:
        with self._locked():
            records = self._read()
            kept = [r for r in records if r.id != deployment_id]
            if len(kept) != len(records):
                self._write(kept)
