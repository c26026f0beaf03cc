"""From a modeldir (and an optional wrapper) to a loaded, warmed :class:`~.base.Model`.

The implementation is picked here, once:

- ``--wrapper FILE.py`` or ``--wrapper package.module``: what its ``create_model(modeldir)``
  returns (:mod:`studioserve.models.wrapper`).
- No wrapper: the newest checkpoint by modification time among ``*.keras``, ``*.h5``,
  ``*.hdf5`` (:class:`~.keras.KerasModel`) and TF SavedModel folders holding
  ``saved_model.pb`` (:class:`~.savedmodel.SavedModel`).
- No checkpoint: the identity model, with a warning (Studio.ML's behaviour).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .base import Model
from .identity import IdentityModel
from .keras import KerasModel, load_keras
from .savedmodel import SavedModel
from .wrapper import load_wrapper

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_SUFFIXES", "SAVED_MODEL_FILE", "find_checkpoint", "load_model"]

CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVED_MODEL_FILE = "saved_model.pb"


def find_checkpoint(modeldir: Path) -> Path | None:
    """The newest checkpoint under ``modeldir`` by modification time, or None.

    Candidates: ``*.keras``, ``*.h5``, ``*.hdf5`` files and folders holding ``saved_model.pb``.
    """
    candidates: list[tuple[float, str, Path]] = []
    for path in modeldir.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            candidates.append((path.stat().st_mtime, str(path), path))
        elif path.is_file() and path.name == SAVED_MODEL_FILE:
            candidates.append((path.stat().st_mtime, str(path.parent), path.parent))
    if not candidates:
        return None
    candidates.sort()
    return candidates[-1][2]


def load_model(
    modeldir: Path,
    wrapper: str | None = None,
    *,
    max_batch_size: int = 128,
    max_delay: float = 0.0,
    queue_size: int = 4096,
) -> Model:
    """Load and warm the model for ``modeldir``.

    :param modeldir: the experiment's local modeldir.
    :param wrapper: a wrapper file path or module name (its ``create_model(modeldir)`` decides).
    :param max_batch_size: the batch bound for the model stage of checkpoints.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :raises ModelLoadError: for an unreadable checkpoint or a broken wrapper.
    """
    start = time.monotonic()
    modeldir = Path(modeldir)
    model: Model
    if wrapper:
        model = load_wrapper(
            wrapper,
            modeldir,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            queue_size=queue_size,
        )
    else:
        checkpoint = find_checkpoint(modeldir)
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
            )
        else:
            model = KerasModel(
                load_keras(checkpoint),
                source=str(checkpoint),
                max_batch_size=max_batch_size,
                max_delay=max_delay,
                queue_size=queue_size,
            )
    model.load_seconds = time.monotonic() - start
    logger.info("loaded %s in %.2fs", model.describe(), model.load_seconds)
    return model
