"""The local-folder store (the default): ``<root>/<key>/modeldir``, ``experiment.json`` and
``serving.toml``.

The modeldir is used in place: :meth:`LocalStore.fetch` returns the store's own folder, so a
file put there (:meth:`LocalStore.put_file`, or a training run writing into it) is seen at
once, and :meth:`LocalStore.fingerprint` tells when that happened from names, sizes and
mtimes alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ExperimentExists, StoreError
from ._names import safe_join, safe_relpath
from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MAX_SERVING_CONFIG,
    MODELDIR,
    SERVING_FILE,
    ExperimentInfo,
    Store,
    check_serving_size,
    fingerprint_of,
    now_iso,
    serving_config_bytes,
    validate_key,
)

logger = logging.getLogger(__name__)

#: Writes a file's content into the open temporary file (see :meth:`LocalStore._replace`).
_Writer = Callable[[BinaryIO], object]


class LocalStore(Store):
    """Experiments in a folder on this machine.

    ``add`` copies into a hidden temporary folder and renames it into place, writing
    ``experiment.json`` last, so a half-copied experiment is never listed. Temporary folders
    have an ``@`` in their name, which no key can have, so they are never listed either.
    Single files (:meth:`put_file`, :meth:`put_serving_config`) are written the same way: under
    a temporary ``.<name>@put.*`` name in the experiment's folder (beside modeldir, not in
    it, so no scan of modeldir ever sees half a file), then renamed into place.

    Symlinks in a modeldir count as what they point to: a linked file is a file (its
    target's size and mtime), a linked folder is not descended into (as ``add`` copies).
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
        serving_config: bytes | Path | None = None,
    ) -> ExperimentInfo:
        dest = self._dir(key)
        src = Path(src)
        if not src.is_dir():
            raise StoreError(f"{src} is not a folder; pass the folder that holds the checkpoints")
        serving = (
            None
            if serving_config is None
            else serving_config_bytes(serving_config, where=f"{self.url}/{key}")
        )
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
                if serving is not None:
                    (tmp / SERVING_FILE).write_bytes(serving)
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
        """The store's own modeldir of ``key``, used in place (``refresh`` changes nothing).

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises StoreError: when the experiment has no modeldir folder.
        """
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
        return sorted((rel, st.st_size) for rel, st in _walk(modeldir))

    def fingerprint(self, key: str) -> str:
        """A token of the names, sizes and mtimes (ns) of ``key``'s files; no content is read.

        Covers every file :meth:`files` lists and ``serving.toml``, and each one's inode
        number: a file rewritten in place changes its mtime (a rewrite of the same size
        within one tick of the file system's clock is the one change it cannot see); one
        renamed into place (:meth:`put_file`, ``add --force``) is a new inode.

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises StoreError: when the experiment has no modeldir, or a folder cannot be read.
        """
        modeldir = self.fetch(key)
        entries: list[tuple[str, int, int, int]] = [
            (f"{MODELDIR}/{rel}", st.st_size, st.st_mtime_ns, st.st_ino)
            for rel, st in _walk(modeldir)
        ]
        try:
            st = (modeldir.parent / SERVING_FILE).stat()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(
                f"cannot read {modeldir.parent / SERVING_FILE}: {e}; check its permissions"
            ) from e
        else:
            entries.append((SERVING_FILE, st.st_size, st.st_mtime_ns, st.st_ino))
        return fingerprint_of(entries)

    def serving_config(self, key: str) -> tuple[bytes, str] | None:
        dest = self._dir(key)
        if not (dest / EXPERIMENT_FILE).is_file():
            raise self.not_found(key)
        path = dest / SERVING_FILE
        try:
            with path.open("rb") as f:
                check_serving_size(os.fstat(f.fileno()).st_size, str(path))
                raw = f.read(MAX_SERVING_CONFIG + 1)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e}; check its permissions") from e
        check_serving_size(len(raw), str(path))  # it grew since the fstat
        return raw, str(path)

    def put_serving_config(self, key: str, data: bytes | Path) -> None:
        dest = self._dir(key)
        raw = serving_config_bytes(data, where=f"{self.url}/{key}")
        if not (dest / EXPERIMENT_FILE).is_file():
            raise self.not_found(key)
        target = dest / SERVING_FILE
        try:
            self._replace(dest, target, lambda f: f.write(raw))
        except OSError as e:
            raise StoreError(f"cannot write {target}: {e}; check permissions and disk space") from e
        logger.info("wrote %s", target)

    def remove_serving_config(self, key: str) -> bool:
        dest = self._dir(key)
        if not (dest / EXPERIMENT_FILE).is_file():
            raise self.not_found(key)
        target = dest / SERVING_FILE
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"cannot delete {target}: {e}; check its permissions") from e
        logger.info("removed %s", target)
        return True

    def put_file(
        self, key: str, relative_path: str, local_path: Path, *, quiet: bool = True
    ) -> None:
        """Copy ``local_path`` into ``key``'s modeldir as ``relative_path``, atomically.

        The copy is written under a temporary name beside modeldir and renamed into place
        (``os.replace``), so a reader sees the old file or the whole new one; its mtime is
        the time of the copy, so it is the newest file of modeldir.

        :raises ExperimentNotFound: when ``key`` has no ``experiment.json``.
        :raises UnsafePath: for a path that is not a safe relative path inside modeldir.
        :raises StoreError: when ``local_path`` is not a readable file, or the path clashes
            with a folder (or a file where a folder should be) of modeldir.
        """
        rel = safe_relpath(relative_path)
        src = Path(local_path)
        modeldir = self.fetch(key)
        if not src.is_file():
            raise StoreError(f"{src} is not a file; pass the checkpoint file to put")
        target = safe_join(modeldir, rel)
        where = f"{self.url}/{key}/{MODELDIR}/{rel}"
        if target.is_dir():
            raise StoreError(f"{where} is a folder; put the file under another name")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the folder of {where}: {e}; a file of modeldir may have the "
                "name of one of its folders"
            ) from e
        safe_join(modeldir, rel)  # mkdir followed no link out of modeldir

        def copy(out: BinaryIO) -> None:
            with src.open("rb") as f:
                shutil.copyfileobj(f, out, 1024 * 1024)

        try:
            try:
                self._replace(modeldir.parent, target, copy)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                # modeldir's folder is on another file system: the temporary copy must
                # be made beside the target for the rename to be atomic
                self._replace(target.parent, target, copy)
        except OSError as e:
            raise StoreError(
                f"cannot copy {src} to {where}: {e}; check permissions and disk space"
            ) from e
        logger.info("put %s into %s", src, where)

    def remove_file(self, key: str, relative_path: str) -> bool:
        rel = safe_relpath(relative_path)
        modeldir = self.fetch(key)
        target = safe_join(modeldir, rel)
        where = f"{self.url}/{key}/{MODELDIR}/{rel}"
        if target.is_dir() and not target.is_symlink():
            raise StoreError(f"{where} is a folder; name a file of it")
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"cannot delete {where}: {e}; check its permissions") from e
        logger.info("removed %s", where)
        return True

    @staticmethod
    def _replace(folder: Path, target: Path, write: _Writer) -> None:
        """Write a file through ``write`` under a temporary name in ``folder``, then rename it
        to ``target`` (which replaces any file there), so no reader sees it half-written."""
        tmp = folder / f".{target.name}@put.{secrets.token_hex(8)}"
        try:
            with tmp.open("xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _walk(root: Path, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """``(relative POSIX path, stat)`` of each file under ``root``, following symlinked files
    but not symlinked folders; a file that vanishes while it is walked is left out.

    :raises StoreError: when a folder cannot be read.
    """
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot list {root}: {e}; check its permissions") from e
    for entry in entries:
        rel = prefix + entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            st = None if is_dir or not entry.is_file() else entry.stat()
        except FileNotFoundError:
            continue  # removed meanwhile (a broken link is no file: is_file() is False)
        except OSError as e:
            raise StoreError(f"cannot read {entry.path}: {e}; check its permissions") from e
        if is_dir:
            yield from _walk(Path(entry.path), rel + "/")
        elif st is not None:
            yield rel, st


def _is_key(name: str) -> bool:
    """Whether a folder name is an experiment key (temporary folders never are)."""
    return KEY_PATTERN.fullmatch(name) is not None and name not in (".", "..")
