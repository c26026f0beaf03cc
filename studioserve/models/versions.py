"""A model's versions: its checkpoints, and the policy that picks which of them are served.

Triton's layout and Studio.ML's, one rule (DESIGN.md section 9):

- Numbered subfolders of modeldir (``modeldir/1/``, ``modeldir/2/``: digits, no leading zero)
  are the versions, version = the number; each is loaded as its own modeldir (a wrapper's
  ``create_model(version_dir)``, or the newest checkpoint inside it).
- Otherwise each checkpoint in modeldir (what :func:`~.loader.list_checkpoints` finds) is one
  version, numbered 1..n by modification time (1 = the oldest, equal times by path), and
  loading version v loads exactly that checkpoint. With a wrapper, modeldir is one version: the
  wrapper decides what its files are (``list_versions(modeldir, wrapped=True)``).
- Neither: one version 1, the modeldir itself (the identity model, with its warning, or the
  wrapper).

:class:`VersionPolicy` is Triton's ``version_policy``: the newest N (default 1), all, or
specific versions. Each :class:`ModelVersionSource` carries a cheap ``fingerprint`` of what it
holds (names, sizes, modification times) so that a reload can tell a rewritten version from an
unchanged one without reading the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, ModelLoadError
from ..model_config import parse_version_policy
from ..tensors import TensorSpec
from .artifacts import scan
from .base import Model
from .loader import list_checkpoints, load_model

logger = logging.getLogger(__name__)

__all__ = ["ModelVersionSource", "VersionPolicy", "fingerprint", "list_versions", "load_version"]

VersionKind = Literal["folder", "checkpoint", "modeldir"]
#: a version folder's name: digits without a leading zero (Triton ignores ``0`` and ``01``)
_VERSION_NAME = re.compile(r"[1-9][0-9]*")
_warned: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class ModelVersionSource:
    """One version of a model, and where it comes from.

    :param version: the version number (>= 1).
    :param path: what gets loaded: the version folder, the checkpoint (a file or a SavedModel
        folder) or the modeldir.
    :param kind: ``"folder"`` (a numbered subfolder), ``"checkpoint"`` (one checkpoint of a
        flat modeldir) or ``"modeldir"`` (the whole modeldir: no checkpoint, or a wrapper).
    :param mtime: the newest modification time of what it holds (seconds since the epoch); a
        checkpoint's is the one versions are numbered by.
    :param fingerprint: a short hex digest of the names, sizes and modification times of the
        files under ``path``; it changes when the version is rewritten.
    """

    version: int
    path: Path
    kind: VersionKind
    mtime: float
    fingerprint: str

    def describe(self) -> str:
        """``version 2 (checkpoint /m/model.keras)``."""
        return f"version {self.version} ({self.kind} {self.path})"


def list_versions(
    modeldir: Path, *, wrapped: bool = False, framework: str | None = None
) -> list[ModelVersionSource]:
    """The versions of the model in ``modeldir``, sorted by version (see the module's rules).

    Always at least one: a modeldir with no checkpoint and no numbered folder (or one that
    does not exist yet) is version 1.

    :param wrapped: a wrapper serves the model, so checkpoints in a flat modeldir are not
        versions (the wrapper's ``create_model`` gets the modeldir); numbered folders still are.
    :param framework: only that framework's artifacts are versions (``--framework``).
    :raises ModelLoadError: when ``modeldir`` exists and is not a folder, or holds two
        frameworks' models and no ``framework`` picks one.
    """
    modeldir = Path(modeldir)
    if modeldir.exists() and not modeldir.is_dir():
        raise ModelLoadError(f"modeldir {modeldir} is not a folder; point it at a folder")
    folders = _version_folders(modeldir)
    if folders:
        return [
            ModelVersionSource(
                version=number,
                path=folder,
                kind="folder",
                mtime=_newest_mtime(folder),
                fingerprint=fingerprint(folder),
            )
            for number, folder in folders
        ]
    checkpoints = [] if wrapped else list_checkpoints(modeldir, framework=framework)
    if checkpoints:
        return [
            ModelVersionSource(
                version=i,
                path=path,
                kind="checkpoint",
                mtime=mtime,
                fingerprint=fingerprint(path),
            )
            for i, (mtime, path) in enumerate(checkpoints, start=1)
        ]
    return [
        ModelVersionSource(
            version=1,
            path=modeldir,
            kind="modeldir",
            mtime=_newest_mtime(modeldir),
            fingerprint=fingerprint(modeldir),
        )
    ]


def load_version(
    source: ModelVersionSource,
    wrapper: str | None = None,
    *,
    max_batch_size: int = 128,
    max_delay: float = 0.0,
    queue_size: int = 4096,
    instances: int = 1,
    devices: Sequence[str] | None = None,
    models: Any = None,
    framework: str | None = None,
    trust: bool = False,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
) -> Model:
    """Load and warm one version, as :func:`~.loader.load_model` does a modeldir.

    A folder version loads as its own modeldir (the wrapper's ``create_model(version_dir)``, or
    its newest checkpoint); a checkpoint version loads exactly that checkpoint; a modeldir
    version loads as :func:`~.loader.load_model` always has.

    :param source: the version, from :func:`list_versions`.
    :param wrapper: a wrapper file path or module name.
    :param max_batch_size: the batch bound for the model stage of checkpoints.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :param instances: copies of a checkpoint's batched stage (see :func:`~.loader.load_model`).
    :param devices: the device of each instance (None: the visible GPUs, else CPU).
    :raises ModelLoadError: for a version folder that holds no checkpoint (without a wrapper:
        an empty version is not served as the identity model), an unreadable or vanished
        checkpoint, or a broken wrapper.
    :raises ValueError: for a checkpoint version with a wrapper (list versions with
        ``wrapped=True`` when a wrapper serves the model).
    """
    checkpoint: Path | None = None
    if source.kind == "checkpoint":
        if wrapper:
            raise ValueError(
                f"{source.describe()} is one checkpoint, but a wrapper loads a folder; "
                "list the versions with list_versions(modeldir, wrapped=True)"
            )
        modeldir, checkpoint = source.path.parent, source.path
    else:
        modeldir = source.path
    if source.kind == "folder" and not wrapper:
        if not source.path.is_dir():
            raise ModelLoadError(
                f"version folder {source.path} does not exist (removed since it was listed?); "
                "check the modeldir and load again"
            )
        if not list_checkpoints(source.path, framework=framework):
            raise ModelLoadError(
                f"version folder {source.path} holds no model artifact (see the README's "
                "framework table); write one into it, or remove the empty folder"
            )
    model = load_model(
        modeldir,
        wrapper,
        max_batch_size=max_batch_size,
        max_delay=max_delay,
        queue_size=queue_size,
        checkpoint=checkpoint,
        instances=instances,
        devices=devices,
        models=models,
        framework=framework,
        trust=trust,
        inputs=inputs,
        outputs=outputs,
    )
    logger.info("model version %d is %s", source.version, model.describe())
    return model


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve, as Triton's ``version_policy``.

    Build one with :meth:`latest`, :meth:`all`, :meth:`specific` or :meth:`parse`; the default
    is the newest version.

    :param kind: ``"latest"``, ``"all"`` or ``"specific"``.
    :param count: how many of the newest versions ``latest`` serves.
    :param versions: the versions ``specific`` serves, sorted.
    """

    kind: Literal["latest", "all", "specific"] = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(f"unknown version policy kind {self.kind!r}")
        if self.kind == "latest" and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"latest needs a count >= 1, not {self.count!r}")
        if self.kind == "specific":
            if not self.versions or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in self.versions
            ):
                raise ValueError(f"specific needs versions >= 1, not {self.versions!r}")
            object.__setattr__(self, "versions", tuple(sorted(set(self.versions))))

    @classmethod
    def latest(cls, n: int = 1) -> VersionPolicy:
        """The ``n`` newest versions (all of them when there are fewer)."""
        return cls("latest", count=n)

    @classmethod
    def all(cls) -> VersionPolicy:
        """Every version."""
        return cls("all", count=0)

    @classmethod
    def specific(cls, *versions: int) -> VersionPolicy:
        """Exactly these versions (``KEY@V`` on the command line is ``specific(V)``)."""
        return cls("specific", count=0, versions=tuple(versions))

    @classmethod
    def parse(cls, text: str, *, source: str = "serving.toml") -> VersionPolicy:
        """``"latest"``, ``"latest:3"``, ``"all"`` or ``"specific:1,3"`` (the grammar of
        :func:`studioserve.model_config.parse_version_policy`).

        :param source: where the text came from, for the error.
        :raises ConfigError: for any other text, naming the source and the grammar.
        """
        kind, count, versions = parse_version_policy(text, source=source)
        if kind == "latest":
            return cls.latest(count)
        if kind == "specific":
            return cls.specific(*versions)
        return cls.all()

    def text(self) -> str:
        """The policy in the grammar :meth:`parse` reads (``"latest:2"``, ``"specific:1,3"``)."""
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in self.versions)
        return "all"

    def describe(self) -> str:
        """``the newest version``, ``the 3 newest versions``, ``all versions``, ``versions 1,
        3``."""
        if self.kind == "latest":
            return "the newest version" if self.count == 1 else f"the {self.count} newest versions"
        if self.kind == "specific":
            label = "version" if len(self.versions) == 1 else "versions"
            return f"{label} {', '.join(str(v) for v in self.versions)}"
        return "all versions"

    def select(
        self, sources: Sequence[ModelVersionSource], *, model: str | None = None
    ) -> list[ModelVersionSource]:
        """The versions this policy serves out of ``sources``, sorted by version.

        :param model: the model's key, for the error.
        :raises ConfigError: when a specific version does not exist; the message lists the
            versions that do.
        """
        ordered = sorted(sources, key=lambda s: s.version)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.count :]
        have = {s.version for s in ordered}
        missing = [v for v in self.versions if v not in have]
        if missing:
            label = "version" if len(missing) == 1 else "versions"
            whose = f"model {model!r}" if model else "the model"
            raise ConfigError(
                f"{whose} has no {label} {', '.join(str(v) for v in missing)} (asked for by "
                f"the version policy {self.text()!r}); its versions: "
                f"{', '.join(str(v) for v in sorted(have)) or '(none)'}. "
                "Pin one of those, or use 'latest' or 'all'"
            )
        wanted = set(self.versions)
        return [s for s in ordered if s.version in wanted]


def fingerprint(path: Path) -> str:
    """A 16-hex-digit digest of the relative names, sizes and modification times of the files
    under ``path`` (or of ``path`` itself for a file); symlinks count by their target's text.

    Cheap (stat only, no reads); a missing path has the digest of nothing, and a file removed
    while it is walked counts as gone.
    """
    digest = hashlib.blake2b(digest_size=8)
    for rel, entry in _entries(Path(path)):
        try:
            if entry.is_symlink():
                line = f"{rel}\0link\0{os.readlink(entry)}"
            elif entry.is_file():
                st = entry.stat()
                line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}"
            else:
                continue
        except OSError:
            line = f"{rel}\0gone"
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _entries(path: Path) -> Iterable[tuple[str, Path]]:
    """``(relative name, path)`` of ``path`` (a file) or everything under it, sorted."""
    if path.is_file() or path.is_symlink():
        return [(path.name, path)]
    if not path.is_dir():
        return []
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*"))


def _newest_mtime(path: Path) -> float:
    """The newest modification time of the files under ``path``, else its own (0.0 if gone)."""
    times: list[float] = []
    for _, entry in _entries(path):
        try:
            if entry.is_file() and not entry.is_symlink():
                times.append(entry.stat().st_mtime)
        except OSError:
            continue
    if times:
        return max(times)
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _version_folders(modeldir: Path) -> list[tuple[int, Path]]:
    """The numbered subfolders of ``modeldir``, by number; warns once about look-alikes."""
    if not modeldir.is_dir():
        return []
    folders: list[tuple[int, Path]] = []
    for entry in modeldir.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        if _VERSION_NAME.fullmatch(entry.name):
            folders.append((int(entry.name), entry))
        elif entry.name.isdigit():
            _warn_once(
                entry,
                "ignoring folder %s: a version folder's name is a number without a leading "
                "zero (1, 2, ...); rename it",
            )
    folders.sort()
    if folders:
        others = [
            path
            for path in (a.path for a in scan(modeldir))
            if not any(path.is_relative_to(folder) for _, folder in folders)
        ]
        if others:
            _warn_once(
                modeldir,
                "%s has numbered version folders; the checkpoints outside them are not served "
                "(move them into a version folder)",
            )
    return folders


def _warn_once(path: Path, message: str) -> None:
    """Log ``message % path`` once per process (list_versions runs at every --watch poll)."""
    key = (str(path), message)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, path)
