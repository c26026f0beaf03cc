"""Untrusted names and paths: which object names may become local files, and where.

Object names come from a remote listing (or a local folder being uploaded) and are untrusted:
:func:`safe_relpath` refuses anything that could name a path outside the folder it is written
into, :func:`safe_join` checks the joined path still resolves inside it, and
:func:`check_layout` refuses listings where one file is also another file's folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import UnsafePath

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_relpath(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise :class:`UnsafePath`.

    Refused: empty names, absolute paths (``/x``, ``C:x``), backslashes, ``.`` or ``..``
    parts, empty parts (``a//b``, a trailing ``/``) and control characters.

    :param name: an object name relative to the modeldir, as the remote store gave it.
    :raises UnsafePath: when the name could escape the folder it is written into.
    """
    why = ""
    if not isinstance(name, str) or not name:
        why = "it is empty"
    elif _CONTROL.search(name):
        why = "it contains control characters"
    elif "\\" in name:
        why = "it contains a backslash"
    elif name.startswith("/") or _DRIVE.match(name):
        why = "it is an absolute path"
    else:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            why = "it has an empty, '.' or '..' part"
    if why:
        raise UnsafePath(
            f"refusing object name {name!r}: {why}, so it could be written outside the cache "
            "folder; rename or delete that object in the store"
        )
    return name


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel`` after :func:`safe_relpath`, checked to resolve inside ``root``.

    :raises UnsafePath: when ``rel`` is unsafe or resolves (through an existing symlink)
        outside ``root``.
    """
    path = root.joinpath(*safe_relpath(rel).split("/"))
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePath(
            f"refusing object name {rel!r}: it resolves to {real}, outside {real_root}; "
            "delete the cache folder and fetch again"
        )
    return path


def local_files(src: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of each regular file under ``src``, sorted.

    Symlinked files are followed (as :class:`~studioserve.store.local.LocalStore` does);
    symlinked folders are not descended into.

    :raises UnsafePath: for a file name that is not a safe relative path (a backslash, ...).
    """
    out = []
    for path in sorted(src.rglob("*")):
        if path.is_file():
            rel = path.relative_to(src).as_posix()
            out.append((safe_relpath(rel), path))
    return out


def check_layout(rels: Iterable[str]) -> None:
    """Refuse a set of relative paths where one file is also another file's folder.

    :raises UnsafePath: naming both objects.
    """
    files = set(rels)
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise UnsafePath(
                    f"objects {parent!r} and {rel!r} clash: {parent!r} would be both a file "
                    "and a folder; delete one of them in the store"
                )
