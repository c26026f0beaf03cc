"""The store interface: :class:`Store`, experiment metadata and key validation.

Every store implementation builds on this module; it imports none of them (the URL factory,
:func:`~studioserve.store.open.open_store`, lives in :mod:`studioserve.store.open`).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as _dt
import difflib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import ExperimentNotFound, InvalidKey, StoreError

KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
EXPERIMENT_FILE = "experiment.json"
MODELDIR = "modeldir"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid experiment key, else raise :class:`InvalidKey`.

    A key is ``[A-Za-z0-9._-]{1,128}`` and not ``.`` or ``..``, so it can never name a
    path outside the store.
    """
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or key in (".", ".."):
        raise InvalidKey(
            f"invalid experiment key {key!r}: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "(no slashes, no '..')"
        )
    return key


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ExperimentInfo:
    """One experiment's metadata, as ``experiment.json`` holds it."""

    key: str
    created: str = ""
    framework: str = ""
    description: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], key: str) -> ExperimentInfo:
        known = {"key", "created", "framework", "description"}
        return cls(
            key=str(data.get("key", key)),
            created=str(data.get("created", "")),
            framework=str(data.get("framework", "")),
            description=str(data.get("description", "")),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def parse(cls, raw: bytes | str, key: str, *, where: str, fix: str) -> ExperimentInfo:
        """``key``'s metadata from the text of its ``experiment.json``.

        :param where: the file or object URL, for messages.
        :param fix: what the user should do about a damaged file.
        :raises StoreError: when the text is not a JSON object.
        """
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise StoreError(f"cannot read {where}: not valid JSON ({e}); {fix}") from e
        if not isinstance(data, dict):
            raise StoreError(f"{where} does not hold a JSON object; {fix}")
        return cls.from_json(data, key)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            key=self.key,
            created=self.created,
            framework=self.framework,
            description=self.description,
        )
        return out


class Store(abc.ABC):
    """An experiment store. ``<store>/<key>/modeldir/**`` and ``<store>/<key>/experiment.json``.

    An experiment is complete (listed, fetchable) once its ``experiment.json`` exists;
    implementations write it last.
    """

    url: str

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """The keys of complete experiments, sorted."""

    @abc.abstractmethod
    def info(self, key: str) -> ExperimentInfo:
        """The metadata of ``key``; :class:`ExperimentNotFound` if missing."""

    @abc.abstractmethod
    def add(
        self,
        key: str,
        src: Path,
        *,
        description: str = "",
        framework: str = "",
        force: bool = False,
        quiet: bool = True,
    ) -> ExperimentInfo:
        """Copy folder ``src`` in as ``key``'s modeldir, then write experiment.json."""

    @abc.abstractmethod
    def remove(self, key: str) -> None:
        """Delete ``key``; :class:`ExperimentNotFound` if missing."""

    @abc.abstractmethod
    def fetch(self, key: str, *, refresh: bool = False, quiet: bool = True) -> Path:
        """A local folder holding ``key``'s modeldir (for remote stores: a verified cache)."""

    def files(self, key: str) -> list[tuple[str, int]]:
        """``(relative path, size)`` of each file in ``key``'s modeldir."""
        return []

    def close(self) -> None:
        """Release connections (remote stores); the store is not used afterwards."""
        return None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list(self) -> list[ExperimentInfo]:
        return [self.info(k) for k in self.keys()]

    def not_found(self, key: str) -> ExperimentNotFound:
        """The error for a missing key: names the store and the closest existing keys."""
        try:
            existing = self.keys()
        except Exception:  # noqa: BLE001 - listing is best effort for the message
            existing = []
        close = difflib.get_close_matches(key, existing, n=len(existing) or 1, cutoff=0.0)
        rest = [k for k in existing if k not in close]
        ordered = close + rest
        if ordered:
            shown = ", ".join(ordered[:10]) + (" ..." if len(ordered) > 10 else "")
            hint = f"existing keys (closest first): {shown}"
        else:
            hint = "the store has no experiments; add one with 'studio experiments add KEY DIR'"
        return ExperimentNotFound(f"no experiment {key!r} in store {self.url}; {hint}")
