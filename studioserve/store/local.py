"""The local-folder store (the default): ``<root>/<key>/modeldir`` and ``experiment.json``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ExperimentExists, StoreError
from .base import EXPERIMENT_FILE, MODELDIR, ExperimentInfo, Store, now_iso, validate_key

logger = logging.getLogger(__name__)


class LocalStore(Store):
    """Experiments in a folder on this machine.

    ``add`` copies into a hidden temporary folder and renames it into place, writing
    ``experiment.json`` last, so a half-copied experiment is never listed.
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
            if not p.name.startswith(".") and (p / EXPERIMENT_FILE).is_file()
        )

    def info(self, key: str) -> ExperimentInfo:
        path = self._dir(key) / EXPERIMENT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise self.not_found(key) from None
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {path}: {e}; fix or remove that experiment") from e
        if not isinstance(data, dict):
            raise StoreError(f"{path} does not hold a JSON object; fix or remove that experiment")
        return ExperimentInfo.from_json(data, key)

    def add(
        self,
        key: str,
        src: Path,
        *,
        description: str = "",
        framework: str = "",
        force: bool = False,
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            shutil.copytree(src, tmp / MODELDIR, symlinks=False)
            (tmp / EXPERIMENT_FILE).write_text(
                json.dumps(info.to_json(), indent=2), encoding="utf-8"
            )
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=self.root))
                os.replace(dest, old / key)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
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
        trash = Path(tempfile.mkdtemp(prefix=f".{key}.rm.", dir=self.root))
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
