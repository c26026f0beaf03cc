"""A wheel of the studioserve package this process runs, for the instance to install.

Built straight from the imported package's files (no build backend, no network), so it works
the same from a source checkout, an editable install or an installed wheel; the version gets a
local label with a content hash so the instance runs exactly these files. Its METADATA carries
the extras too, so the instance can install ``studioserve-...whl[torch]``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import zipfile
from pathlib import Path

from .._version import __version__
from ..config import cache_dir

logger = logging.getLogger(__name__)


def _package_files(pkg_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in pkg_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
    )


def _project_metadata(pkg_dir: Path) -> tuple[str, list[str], str]:
    """(summary, dependencies, requires-python) of the studioserve being run; the
    dependencies include the extras' (``Requires-Dist: torch>=2; extra == "torch"``)."""
    pyproject = pkg_dir.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib

            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except (ImportError, OSError, ValueError):
            project = {}
        if project.get("name") == "studioserve":
            requires = [str(d) for d in project.get("dependencies", [])]
            for extra, deps in project.get("optional-dependencies", {}).items():
                requires += [_with_extra(str(d), str(extra)) for d in deps]
            return (
                str(project.get("description", "")),
                requires,
                str(project.get("requires-python", "")),
            )
    try:
        meta = importlib.metadata.metadata("studioserve")
        requires = importlib.metadata.requires("studioserve") or []
    except importlib.metadata.PackageNotFoundError:
        return "", [], ""
    summary = (meta.get_all("Summary") or [""])[0]
    requires_python = (meta.get_all("Requires-Python") or [""])[0]
    return str(summary), list(requires), str(requires_python)


def _with_extra(requirement: str, extra: str) -> str:
    """``requirement`` for ``extra`` only, in METADATA's ``Requires-Dist`` form."""
    base, _, marker = requirement.partition(";")
    condition = f'extra == "{extra}"'
    if marker.strip():
        condition = f"({marker.strip()}) and {condition}"
    return f"{base.strip()}; {condition}"


def _extras(requires: list[str]) -> list[str]:
    """The extras named in ``requires``' markers, in order."""
    found: list[str] = []
    for requirement in requires:
        _, _, marker = requirement.partition("extra ==")
        name = marker.strip().strip("\"'")
        if name and name not in found:
            found.append(name)
    return found


def build_wheel(dest_dir: Path | None = None) -> Path:
    """A wheel of the studioserve package this process runs (cached by content).

    Built straight from the imported package's files, so it works the same for a source
    checkout, an editable install or an installed wheel, needs no build backend and no
    network. The version gets a local label with a content hash (``0.1.0+g1a2b3c4d5e``) so
    the instance runs exactly these files.
    """
    pkg_dir = Path(__file__).resolve().parents[1]
    files = _package_files(pkg_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(pkg_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    base_version = __version__.split("+", 1)[0]
    version = f"{base_version}+g{digest.hexdigest()[:12]}"
    dest = dest_dir or cache_dir() / "wheels"
    wheel = dest / f"studioserve-{version}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    summary, requires, requires_python = _project_metadata(pkg_dir)
    dist_info = f"studioserve-{version}.dist-info"
    metadata_lines = ["Metadata-Version: 2.1", "Name: studioserve", f"Version: {version}"]
    if summary:
        metadata_lines.append(f"Summary: {summary}")
    if requires_python:
        metadata_lines.append(f"Requires-Python: {requires_python}")
    metadata_lines += [f"Provides-Extra: {e}" for e in _extras(requires)]
    metadata_lines += [f"Requires-Dist: {r}" for r in requires]
    generated = {
        f"{dist_info}/METADATA": ("\n".join(metadata_lines) + "\n").encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: studioserve.cloud\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": b"[console_scripts]\nstudio = studioserve.cli:main\n",
        f"{dist_info}/top_level.txt": b"studioserve\n",
    }
    entries: list[tuple[str, bytes]] = [
        (f"studioserve/{p.relative_to(pkg_dir).as_posix()}", p.read_bytes()) for p in files
    ]
    entries += list(generated.items())
    record_lines = []
    for name, data in entries:
        hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{name},sha256={hashed},{len(data)}")
    record_lines.append(f"{dist_info}/RECORD,,")
    entries.append((f"{dist_info}/RECORD", ("\n".join(record_lines) + "\n").encode()))
    tmp = wheel.with_suffix(f".{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    os.replace(tmp, wheel)
    logger.info("built %s", wheel)
    return wheel
