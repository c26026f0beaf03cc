"""From a modeldir (and an optional wrapper) to a loaded, warmed :class:`~.base.Model`.

The implementation is picked here, once:

- ``--wrapper FILE.py`` or ``--wrapper package.module``: what its ``create_model(modeldir)``
  returns (:mod:`studioserve.models.wrapper`).
- No wrapper: the newest checkpoint by modification time among ``*.keras``, ``*.h5``,
  ``*.hdf5`` (:class:`~.keras.KerasModel`) and TF SavedModel folders holding
  ``saved_model.pb`` (:class:`~.savedmodel.SavedModel`).
- No checkpoint: the identity model, with a warning (Studio.ML's behaviour).

``checkpoint=`` loads one given checkpoint instead of the newest: a model's versions are its
checkpoints (:mod:`studioserve.models.versions`), and loading one version loads exactly that one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .base import Model
from .identity import IdentityModel
from .keras import KerasModel, load_keras
from .savedmodel import SavedModel
from .wrapper import load_wrapper

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "SAVED_MODEL_FILE",
    "find_checkpoint",
    "list_checkpoints",
    "load_model",
]

CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVED_MODEL_FILE = "saved_model.pb"


def list_checkpoints(modeldir: Path) -> list[tuple[float, Path]]:
    """Every checkpoint under ``modeldir`` with its modification time, oldest first.

    Candidates: ``*.keras``, ``*.h5``, ``*.hdf5`` files and folders holding ``saved_model.pb``
    (a SavedModel's time is its ``saved_model.pb``'s); symlinks are skipped. Equal times are
    ordered by path.
    """
    candidates: list[tuple[float, str, Path]] = []
    for path in Path(modeldir).rglob("*"):
        if path.is_symlink():
            continue
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            candidates.append((path.stat().st_mtime, str(path), path))
        elif path.is_file() and path.name == SAVED_MODEL_FILE:
            candidates.append((path.stat().st_mtime, str(path.parent), path.parent))
    candidates.sort()
    return [(mtime, path) for mtime, _, path in candidates]


def find_checkpoint(modeldir: Path) -> Path | None:
    """The newest checkpoint under ``modeldir`` by modification time, or None.

    Candidates: ``*.keras``, ``*.h5``, ``*.hdf5`` files and folders holding ``saved_model.pb``.
    """
    checkpoints = list_checkpoints(modeldir)
    return checkpoints[-1][1] if checkpoints else None


def load_model(
    modeldir: Path,
    wrapper: str | None = None,
    *,
    max_batch_size: int = 128,
    max_delay: float = 0.0,
    queue_size: int = 4096,
    checkpoint: Path | None = None,
    instances: int = 1,
    devices: Sequence[str] | None = None,
    models: Any = None,
) -> Model:
    """Load and warm the model for ``modeldir``.

    :param modeldir: the experiment's local modeldir.
    :param wrapper: a wrapper file path or module name (its ``create_model(modeldir)`` decides).
    :param max_batch_size: the batch bound for the model stage of checkpoints.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :param checkpoint: load this checkpoint (a ``.keras``/``.h5``/``.hdf5`` file or a SavedModel
        folder) instead of the newest in ``modeldir``; not with ``wrapper``.
    :param instances: copies of a checkpoint's batched stage fed by one queue (Triton's
        instance groups); a wrapper's ``create_model`` builds its own pipe, so it ignores this.
    :param devices: the device of each instance (None: the visible GPUs round-robin, else CPU).
    :param models: the other served models, for a wrapper's ``create_model(modeldir, models)``.
    :raises ModelLoadError: for an unreadable or missing checkpoint or a broken wrapper.
    :raises ValueError: for both ``wrapper`` and ``checkpoint``.
    """
    start = time.monotonic()
    modeldir = Path(modeldir)
    if wrapper and checkpoint is not None:
        raise ValueError("pass wrapper or checkpoint, not both (a wrapper loads its modeldir)")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ModelLoadError(
            f"checkpoint {checkpoint} does not exist (removed since it was listed?); "
            "check the modeldir and load again"
        )
    model: Model
    if wrapper:
        if instances > 1:
            logger.warning(
                "instances=%d is ignored for wrapper %s: its create_model builds the pipe",
                instances,
                wrapper,
            )
        model = load_wrapper(
            wrapper,
            modeldir,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            queue_size=queue_size,
            models=models,
        )
    else:
        checkpoint = find_checkpoint(modeldir) if checkpoint is None else Path(checkpoint)
        if checkpoint is None:
            logger.warning(
                "no checkpoint (*.keras, *.h5, *.hdf5 or a SavedModel folder) in %s; "
                "serving the identity model (each value is returned as sent)",
                modeldir,
            )
            model = IdentityModel(source=str(modeldir))
        elif checkpoint.is_dir():
            model = SavedModel(
                checkpoint,
                max_batch_size=max_batch_size,
                max_delay=max_delay,
                queue_size=queue_size,
                instances=instances,
                devices=devices,
            )
        else:
            model = KerasModel(
                load_keras(checkpoint),
                source=str(checkpoint),
                max_batch_size=max_batch_size,
                max_delay=max_delay,
                queue_size=queue_size,
                instances=instances,
                devices=devices,
            )
    model.load_seconds = time.monotonic() - start
    logger.info("loaded %s in %.2fs", model.describe(), model.load_seconds)
    return model
