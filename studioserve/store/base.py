"""The store interface: :class:`Store`, experiment metadata and key validation.

Every store implementation builds on this module; it imports none of them (the URL factory,
:func:`~studioserve.store.open.open_store`, lives in :mod:`studioserve.store.open`). It also
holds what every store does alike with an experiment's ``serving.toml``: its name, its size
bound (:data:`MAX_SERVING_CONFIG`) and :func:`serving_config_bytes`, and the digest that
:meth:`Store.fingerprint` returns (:func:`fingerprint_of`).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as _dt
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ExperimentNotFound, InvalidKey, StoreError

KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
EXPERIMENT_FILE = "experiment.json"
MODELDIR = "modeldir"
SERVING_FILE = "serving.toml"
#: The largest ``serving.toml`` a store reads or writes, in bytes.
MAX_SERVING_CONFIG = 1024 * 1024


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


def check_serving_size(size: int, where: str) -> None:
    """Refuse a ``serving.toml`` over :data:`MAX_SERVING_CONFIG` bytes.

    :param where: the file or object URL, for the message.
    :raises StoreError: naming ``where`` and the limit.
    """
    if size > MAX_SERVING_CONFIG:
        raise StoreError(
            f"{where} is {size} bytes, over the {MAX_SERVING_CONFIG // 1024} KiB limit of a "
            f"{SERVING_FILE}; it holds a few serving settings: shorten it"
        )


def serving_config_bytes(data: bytes | Path, *, where: str) -> bytes:
    """The bytes of a ``serving.toml`` to store: ``data`` itself, or the file it names.

    The store keeps the bytes as they are; parsing them is the serving layer's job.

    :param where: where the bytes will go (an experiment's URL), for messages.
    :raises StoreError: for an unreadable file, or more than :data:`MAX_SERVING_CONFIG` bytes.
    """
    if isinstance(data, Path):
        try:
            with data.open("rb") as f:
                check_serving_size(os.fstat(f.fileno()).st_size, str(data))
                raw = f.read(MAX_SERVING_CONFIG + 1)
        except OSError as e:
            raise StoreError(
                f"cannot read {data} as the {SERVING_FILE} of {where}: {e}; pass a readable file"
            ) from e
        check_serving_size(len(raw), str(data))
        return raw
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"serving config must be bytes or a Path, not {type(data).__name__}")
    raw = bytes(data)
    check_serving_size(len(raw), f"the {SERVING_FILE} for {where}")
    return raw


def fingerprint_of(entries: Iterable[Sequence[object]]) -> str:
    """The token :meth:`Store.fingerprint` returns for ``entries`` (one tuple per file).

    Equal entries, in any order, give equal tokens; each entry must be JSON-serializable.
    """
    rows = sorted(json.dumps(list(e), separators=(",", ":")) for e in entries)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:32]


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
    implementations write it last. ``<store>/<key>/serving.toml`` (optional) holds that
    model's serving settings: the store keeps its bytes and never parses them.

    A server that reloads a model when the store changes polls :meth:`fingerprint` (cheap:
    no file is read or downloaded) and, when the token changed, calls :meth:`fetch` again
    and reads :meth:`serving_config`.
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
        serving_config: bytes | Path | None = None,
    ) -> ExperimentInfo:
        """Copy folder ``src`` in as ``key``'s modeldir, then write experiment.json.

        :param serving_config: the experiment's ``serving.toml`` (its bytes, or a file to
            copy), written before ``experiment.json``; None: the experiment has none.
        """

    @abc.abstractmethod
    def remove(self, key: str) -> None:
        """Delete ``key``; :class:`ExperimentNotFound` if missing."""

    @abc.abstractmethod
    def fetch(self, key: str, *, refresh: bool = False, quiet: bool = True) -> Path:
        """A local folder holding ``key``'s modeldir (for remote stores: a verified cache)."""

    @abc.abstractmethod
    def fingerprint(self, key: str) -> str:
        """A token of what ``key``'s modeldir and ``serving.toml`` hold now.

        Equal tokens mean nothing changed; a file added, removed or rewritten (in modeldir,
        or ``serving.toml``) gives a new token. Cheap enough to poll every second: it reads
        names and metadata only (a local folder's sizes and mtimes, one remote listing),
        never a file's content. Tokens are comparable only with tokens of the same store.

        :raises ExperimentNotFound: when ``key`` is not a complete experiment (also while an
            ``add --force`` replaces it).
        """

    @abc.abstractmethod
    def serving_config(self, key: str) -> tuple[bytes, str] | None:
        """The bytes of ``key``'s ``serving.toml`` and its path or URL, or None if it has none.

        :raises ExperimentNotFound: when ``key`` is not a complete experiment.
        :raises StoreError: for a file over :data:`MAX_SERVING_CONFIG` bytes (naming it), or
            one that cannot be read.
        """

    @abc.abstractmethod
    def put_serving_config(self, key: str, data: bytes | Path) -> None:
        """Create or replace ``key``'s ``serving.toml`` (its bytes, or a file to copy).

        :raises ExperimentNotFound: when ``key`` is not a complete experiment.
        :raises StoreError: for more than :data:`MAX_SERVING_CONFIG` bytes.
        """

    @abc.abstractmethod
    def remove_serving_config(self, key: str) -> bool:
        """Delete ``key``'s ``serving.toml``; False if it had none.

        :raises ExperimentNotFound: when ``key`` is not a complete experiment.
        """

    @abc.abstractmethod
    def put_file(
        self, key: str, relative_path: str, local_path: Path, *, quiet: bool = True
    ) -> None:
        """Copy one local file into ``key``'s modeldir as ``relative_path`` (a new checkpoint).

        Creates or replaces that one file; the others stay. The file appears whole or not at
        all (local folder: written under a temporary name, then renamed; S3/GCS: one object).

        :param relative_path: a POSIX path inside modeldir, e.g. ``"ckpt-0002.keras"``.
        :raises ExperimentNotFound: when ``key`` is not a complete experiment.
        :raises UnsafePath: for a path that is not a safe relative path.
        :raises StoreError: when ``local_path`` is not a readable file, or the path clashes
            with a folder or file of modeldir.
        """

    @abc.abstractmethod
    def remove_file(self, key: str, relative_path: str) -> bool:
        """Delete one file of ``key``'s modeldir (an old checkpoint); False if there is none.

        :raises ExperimentNotFound: when ``key`` is not a complete experiment.
        :raises UnsafePath: for a path that is not a safe relative path.
        :raises StoreError: when the path names a folder, or the delete fails.
        """

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
