"""Which file or folder in a modeldir is which framework's model: the one detection table.

:func:`scan` walks a modeldir and returns every model artifact it recognizes, with its
framework and modification time. The table (also in the README):

=================  ==========================================================  ==========  =====
framework          artifact                                                    extra       trust
=================  ==========================================================  ==========  =====
``keras``          ``*.keras``, ``*.h5``, ``*.hdf5``                             keras
``savedmodel``     a folder holding ``saved_model.pb`` (TensorFlow SavedModel)  keras
``torchscript``    ``*.pt``, ``*.pth``, ``*.torchscript``: a TorchScript archive  torch
                   (``torch.jit.save``: a zip holding ``code/`` and
                   ``constants.pkl``)
``torch_export``   ``*.pt2`` (``torch.export.save``)                            torch
``torch_pickle``   ``*.pt``, ``*.pth`` that is not TorchScript: a pickled       torch       yes
                   module (``torch.save(model)``), or a ``state_dict``
                   (refused: no architecture; use a wrapper)
``onnx``           ``*.onnx``                                                   onnx
``sklearn``        ``*.skops`` (skops, with its type audit)                     sklearn     [1]
``xgboost``        ``*.ubj``; ``*.json`` when it is an XGBoost model (a        xgboost
                   ``learner`` object)
``lightgbm``       a LightGBM text model: ``*.txt`` or ``*.lgb`` whose first    lightgbm
                   line is ``tree``
``closure``        ``*.cloudpickle``, ``*.cpkl``: a Clipper-style closure, a    closure     yes
                   cloudpickled function taking a batch
``spark``          a PySpark ``PipelineModel`` folder (``metadata/part-*``      spark
                   naming ``org.apache.spark.ml.PipelineModel``)
``pickle``         ``*.pkl``, ``*.pickle``, ``*.joblib``: a pickled model (a    sklearn     yes
                   scikit-learn estimator or anything a wrapper could return)
=================  ==========================================================  ==========  =====

[1] a skops file whose types skops does not trust needs the opt-in too, and the refusal lists
those types.

"trust" marks formats that run code while they load: they are refused unless the user opts in
(``--trust-artifact``, or ``trust = true`` in serving.toml). A request body never reaches any
of these loaders. Frameworks are imported only when a model of theirs is loaded.

Files inside a folder artifact (a SavedModel's variables, a Spark model's stages) belong to it.
Several artifacts of one framework family are a model's versions (newest served by default); a
modeldir holding artifacts of two families is ambiguous: :func:`choose` names both files and
``--framework``.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from ..errors import ModelLoadError

__all__ = [
    "FRAMEWORKS",
    "Artifact",
    "Framework",
    "artifact_at",
    "choose",
    "scan",
]


@dataclasses.dataclass(frozen=True)
class Framework:
    """One row of the detection table.

    :param name: the framework's name (``--framework``, experiment.json's ``framework``).
    :param family: artifacts of one family may be versions of one model (``keras`` and
        ``savedmodel`` are both TensorFlow); two families in one modeldir are ambiguous.
    :param extra: the pip extra that installs it (``studioserve[torch]``).
    :param module: the studioserve module whose ``load(artifact, options)`` loads it.
    :param platform: the platform name in OIP metadata and configuration.
    :param runs_code: loading it runs code from the file (needs ``--trust-artifact``).
    """

    name: str
    family: str
    extra: str
    module: str
    platform: str
    runs_code: bool = False


FRAMEWORKS: Final[dict[str, Framework]] = {
    f.name: f
    for f in (
        Framework("keras", "tensorflow", "keras", "keras", "studioserve_keras"),
        Framework("savedmodel", "tensorflow", "keras", "savedmodel", "tensorflow_savedmodel"),
        Framework("torchscript", "torch", "torch", "torch", "pytorch_libtorch"),
        Framework("torch_export", "torch", "torch", "torch", "pytorch_export"),
        Framework("torch_pickle", "torch", "torch", "torch", "pytorch_libtorch", runs_code=True),
        Framework("onnx", "onnx", "onnx", "onnx", "onnxruntime_onnx"),
        Framework("sklearn", "sklearn", "sklearn", "sklearn", "sklearn"),
        Framework("xgboost", "xgboost", "xgboost", "trees", "xgboost"),
        Framework("lightgbm", "lightgbm", "lightgbm", "trees", "lightgbm"),
        Framework("closure", "closure", "closure", "closure", "python", runs_code=True),
        Framework("spark", "spark", "spark", "spark", "spark_mlib"),
        Framework("pickle", "pickle", "sklearn", "sklearn", "sklearn", runs_code=True),
    )
}

_SUFFIXES: Final[dict[str, str]] = {
    ".keras": "keras",
    ".h5": "keras",
    ".hdf5": "keras",
    ".pt2": "torch_export",
    ".torchscript": "torchscript",
    ".onnx": "onnx",
    ".skops": "sklearn",
    ".ubj": "xgboost",
    ".lgb": "lightgbm",
    ".cloudpickle": "closure",
    ".cpkl": "closure",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".joblib": "pickle",
}
SAVED_MODEL_FILE: Final = "saved_model.pb"
_SPARK_PIPELINE: Final = "org.apache.spark.ml.PipelineModel"
_SNIFF_BYTES: Final = 1 << 16


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One model artifact found in a modeldir.

    :param framework: its row of :data:`FRAMEWORKS`.
    :param path: the file, or the folder of a folder artifact (SavedModel, Spark).
    :param mtime: its modification time (a folder's: its marker file's).
    """

    framework: Framework
    path: Path
    mtime: float

    def describe(self) -> str:
        return f"{self.framework.name} model {self.path}"


def artifact_at(path: Path) -> Artifact | None:
    """The artifact ``path`` is (a file or a folder), or None when it is none of the table's."""
    path = Path(path)
    if path.is_symlink():
        return None
    if path.is_dir():
        marker = path / SAVED_MODEL_FILE
        if marker.is_file():
            return Artifact(FRAMEWORKS["savedmodel"], path, marker.stat().st_mtime)
        spark = _spark_marker(path)
        if spark is not None:
            return Artifact(FRAMEWORKS["spark"], path, spark.stat().st_mtime)
        return None
    if not path.is_file():
        return None
    name = _classify_file(path)
    if name is None:
        return None
    return Artifact(FRAMEWORKS[name], path, path.stat().st_mtime)


def scan(modeldir: Path) -> list[Artifact]:
    """Every artifact under ``modeldir``, oldest first (ties by path); symlinks skipped."""
    found: list[Artifact] = []
    _walk(Path(modeldir), found)
    found.sort(key=lambda a: (a.mtime, str(a.path)))
    return found


def _walk(folder: Path, found: list[Artifact]) -> None:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            artifact = artifact_at(entry)
            if artifact is not None:
                found.append(artifact)  # its files belong to it
            else:
                _walk(entry, found)
        elif entry.is_file():
            artifact = artifact_at(entry)
            if artifact is not None:
                found.append(artifact)


def choose(
    artifacts: Sequence[Artifact], *, framework: str | None = None, where: Path | str = ""
) -> list[Artifact]:
    """The artifacts that are the model's versions: one family's, oldest first.

    :param framework: ``--framework``: keep only that framework's artifacts.
    :raises ModelLoadError: for an unknown framework, none of the asked framework, or
        artifacts of two families without ``framework`` (the message names a file of each and
        the flag).
    """
    if framework is not None:
        if framework not in FRAMEWORKS:
            raise ModelLoadError(
                f"unknown framework {framework!r}; --framework takes one of "
                f"{', '.join(sorted(FRAMEWORKS))}"
            )
        picked = [a for a in artifacts if a.framework.name == framework]
        if not picked and artifacts:
            raise ModelLoadError(
                f"--framework {framework}: {where or 'the modeldir'} holds no {framework} "
                f"model, only {_listing(artifacts)}"
            )
        return picked
    families: dict[str, Artifact] = {}
    for a in artifacts:
        families.setdefault(a.framework.family, a)
    if len(families) > 1:
        first, second = list(families.values())[:2]
        raise ModelLoadError(
            f"{where or 'the modeldir'} holds models of {len(families)} frameworks "
            f"({first.path.name}: {first.framework.name}; {second.path.name}: "
            f"{second.framework.name}); pick one with --framework "
            f"{first.framework.name}|{second.framework.name} (or framework = ... in "
            "serving.toml), or keep one model per experiment"
        )
    return list(artifacts)


def _listing(artifacts: Iterable[Artifact]) -> str:
    return ", ".join(f"{a.path.name} ({a.framework.name})" for a in artifacts)


def _classify_file(path: Path) -> str | None:
    suffix = path.suffix.lower()
    name = _SUFFIXES.get(suffix)
    if name is not None:
        return name
    if suffix in (".pt", ".pth"):
        return "torchscript" if _is_torchscript(path) else "torch_pickle"
    if suffix == ".json":
        return "xgboost" if _is_xgboost_json(path) else None
    if suffix == ".txt":
        return "lightgbm" if _is_lightgbm_text(path) else None
    return None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with ``<name>/code/`` and ``<name>/constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    has_code = any("/code/" in n for n in names)
    return has_code and any(n.endswith("/constants.pkl") for n in names)


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(_SNIFF_BYTES)
    except OSError:
        return b""


def _is_xgboost_json(path: Path) -> bool:
    head = _head(path).lstrip()
    if not head.startswith(b"{") or b'"learner"' not in head:
        return False
    if path.stat().st_size <= _SNIFF_BYTES:
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, OSError):
            return False
        return isinstance(doc, dict) and isinstance(doc.get("learner"), dict)
    return True


def _is_lightgbm_text(path: Path) -> bool:
    head = _head(path)
    first = head.split(b"\n", 1)[0].strip()
    return first == b"tree" and b"version=" in head


def _spark_marker(folder: Path) -> Path | None:
    """The ``metadata/part-*`` file of a PySpark PipelineModel folder, if it is one."""
    meta = folder / "metadata"
    if not meta.is_dir() or not (folder / "stages").is_dir():
        return None
    for part in sorted(meta.glob("part-*")):
        if part.is_file() and _SPARK_PIPELINE.encode() in _head(part):
            return part
    return None
