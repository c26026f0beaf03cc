"""The local-folder store (the default): ``<root>/<key>/modeldir`` and ``experiment.json``."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from ..errors import ExperimentExists, StoreError
from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MODELDIR,
    ExperimentInfo,
    Store,
    now_iso,
    validate_key,
)

logger = logging.getLogger(__name__)


class LocalStore(Store):
    """Experiments in a folder on this machine.

    ``add`` copies into a hidden temporary folder and renames it into place, writing
    ``experiment.json`` last, so a half-copied experiment is never listed. Temporary folders
    have an ``@`` in their name, which no key can have, so they are never listed either.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _dir(self, key: str) -> Path:
        return self.root / validate_key(key)

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _is_key(p.name) and (p / EXPERIMENT_FILE).is_file()
        )

    def info(self, key: str) -> ExperimentInfo:
        path = self._dir(key) / EXPERIMENT_FILE
        fix = "fix or remove that experiment"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise self.not_found(key) from None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e}; {fix}") from e
        return ExperimentInfo.parse(raw, key, where=str(path), fix=fix)

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
        dest = self._dir(key)
        src = Path(src)
        if not src.is_dir():
            raise StoreError(f"{src} is not a folder; pass the folder that holds the checkpoints")
        if dest.exists() and not force:
            raise ExperimentExists(
                f"experiment {key!r} already exists in {self.url}; pass --force to replace it"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        info = ExperimentInfo(
            key=key, created=now_iso(), framework=framework, description=description
        )
        # Not mkdtemp: its 0700 mode would stay on the experiment and lock out other users
        # of a shared store. mkdir honours the umask like any other folder.
        tmp = self.root / f".{key}@add.{secrets.token_hex(8)}"
        tmp.mkdir()
        try:
            try:
                shutil.copytree(src, tmp / MODELDIR, symlinks=False)
                (tmp / EXPERIMENT_FILE).write_text(
                    json.dumps(info.to_json(), indent=2), encoding="utf-8"
                )
            except OSError as e:  # shutil.Error (a broken link, an unreadable file) included
                raise StoreError(
                    f"cannot copy {src} into the store {self.url} as {key!r}: {e}; "
                    "fix the folder (broken links, permissions, disk space) and add it again"
                ) from e
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{key}@old.", dir=self.root))
                os.replace(dest, old / key)
                try:
                    os.replace(tmp, dest)
                except OSError:
                    os.replace(old / key, dest)  # put the previous experiment back
                    raise
                finally:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.replace(tmp, dest)
                except OSError as e:
                    if dest.exists():  # another add of the same key won the race
                        raise ExperimentExists(
                            f"experiment {key!r} was added to {self.url} by someone else "
                            "meanwhile; pass --force to replace it"
                        ) from e
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("added experiment %s to %s", key, self.url)
        return info

    def remove(self, key: str) -> None:
        dest = self._dir(key)
        if not dest.is_dir():
            raise self.not_found(key)
        # rename first so a half-deleted experiment is never listed
        trash = Path(tempfile.mkdtemp(prefix=f".{key}@rm.", dir=self.root))
        os.replace(dest, trash / key)
        shutil.rmtree(trash, ignore_errors=True)

    def fetch(self, key: str, *, refresh: bool = False, quiet: bool = True) -> Path:
        dest = self._dir(key)
        if not (dest / EXPERIMENT_FILE).is_file():
            raise self.not_found(key)
        modeldir = dest / MODELDIR
        if not modeldir.is_dir():
            raise StoreError(
                f"experiment {key!r} in {self.url} has no modeldir folder; "
                f"re-add it with 'studio experiments add {key} DIR --force'"
            )
        return modeldir

    def files(self, key: str) -> list[tuple[str, int]]:
        modeldir = self.fetch(key)
        return sorted(
            (p.relative_to(modeldir).as_posix(), p.stat().st_size)
            for p in modeldir.rglob("*")
            if p.is_file()
        )


def _is_key(name: str) -> bool:
    """Whether a folder name is an experiment key (temporary folders never are)."""
    return KEY_PATTERN.fullmatch(name) is not None and name not in (".", "..")
