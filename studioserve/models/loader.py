"""From a modeldir (and an optional wrapper) to a loaded, warmed :class:`~.base.Model`.

The implementation is picked here, once:

- ``--wrapper FILE.py`` or ``--wrapper package.module``: what its ``create_model(modeldir)``
  returns (:mod:`studioserve.models.wrapper`).
- No wrapper: the newest artifact by modification time that the detection table of
  :mod:`~.artifacts` recognizes (Keras, SavedModel, TorchScript, ``torch.export``, ONNX,
  skops, XGBoost, LightGBM, a closure, a PySpark PipelineModel, a trusted pickle), loaded by
  its framework's module (``load(artifact, options)``), imported only then; formats that run
  code when they load are refused unless ``trust``.
- No artifact: the identity model, with a warning (Studio.ML's behaviour).

``checkpoint=`` loads one given checkpoint instead of the newest: a model's versions are its
checkpoints (:mod:`studioserve.models.versions`), and loading one version loads exactly that one.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..tensors import TensorSpec
from .artifacts import Artifact, artifact_at, choose, scan
from .base import Model
from .batched import LoadOptions
from .identity import IdentityModel
from .wrapper import load_wrapper

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "SAVED_MODEL_FILE",
    "find_checkpoint",
    "list_checkpoints",
    "load_artifact",
    "load_model",
]

CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVED_MODEL_FILE = "saved_model.pb"


def list_checkpoints(modeldir: Path, *, framework: str | None = None) -> list[tuple[float, Path]]:
    """Every model artifact under ``modeldir`` with its modification time, oldest first.

    What counts is the detection table of :mod:`studioserve.models.artifacts` (Keras files,
    SavedModel folders, TorchScript, ``.onnx``, ``.skops``, ...); symlinks are skipped and
    equal times are ordered by path.

    :param framework: keep only that framework's artifacts (``--framework``).
    :raises ModelLoadError: when the modeldir holds two frameworks' models and no
        ``framework`` picks one.
    """
    chosen = choose(scan(modeldir), framework=framework, where=modeldir)
    return [(a.mtime, a.path) for a in chosen]


def find_checkpoint(modeldir: Path, *, framework: str | None = None) -> Path | None:
    """The newest model artifact under ``modeldir`` by modification time, or None."""
    checkpoints = list_checkpoints(modeldir, framework=framework)
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
    framework: str | None = None,
    trust: bool = False,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
) -> Model:
    """Load and warm the model for ``modeldir``.

    :param modeldir: the experiment's local modeldir.
    :param wrapper: a wrapper file path or module name (its ``create_model(modeldir)`` decides).
    :param max_batch_size: the batch bound for the model stage of checkpoints.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :param checkpoint: load this artifact (a file or folder of the detection table) instead of
        the newest in ``modeldir``; not with ``wrapper``.
    :param instances: copies of a checkpoint's batched stage fed by one queue (Triton's
        instance groups); a wrapper's ``create_model`` builds its own pipe, so it ignores this.
    :param devices: the device of each instance (None: the visible GPUs round-robin, else CPU).
    :param models: the other served models, for a wrapper's ``create_model(modeldir, models)``.
    :param framework: load only this framework's artifacts (``--framework``).
    :param trust: allow artifacts that run code when they load (``--trust-artifact``).
    :param inputs: the input signature, for formats that do not carry one (serving.toml).
    :param outputs: the output signature, likewise.
    :raises ModelLoadError: for an unreadable, ambiguous, untrusted or missing artifact, a
        framework that is not installed (naming the extra), or a broken wrapper.
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
        if checkpoint is None:
            chosen = choose(scan(modeldir), framework=framework, where=modeldir)
            artifact = chosen[-1] if chosen else None
        else:
            artifact = artifact_at(Path(checkpoint))
            if artifact is None:
                raise ModelLoadError(
                    f"{checkpoint} is not a model artifact studioserve knows (see the README's "
                    "framework table)"
                )
        if artifact is None:
            logger.warning(
                "no model artifact (a checkpoint of the README's framework table) in %s; "
                "serving the identity model (each value is returned as sent)",
                modeldir,
            )
            model = IdentityModel(source=str(modeldir))
        else:
            model = load_artifact(
                artifact,
                LoadOptions(
                    max_batch_size=max_batch_size,
                    max_delay=max_delay,
                    queue_size=queue_size,
                    instances=instances,
                    devices=tuple(devices) if devices is not None else None,
                    trust=trust,
                    inputs=tuple(inputs) if inputs is not None else None,
                    outputs=tuple(outputs) if outputs is not None else None,
                ),
            )
    model.load_seconds = time.monotonic() - start
    logger.info("loaded %s in %.2fs", model.describe(), model.load_seconds)
    return model


def load_artifact(artifact: Artifact, options: LoadOptions) -> Model:
    """Load one artifact with its framework's runtime (imported now, not before).

    :raises ModelLoadError: for a format that runs code without ``options.trust`` (naming the
        opt-in), a framework that is not installed (naming the extra), or a broken file.
    """
    fw = artifact.framework
    if fw.runs_code and not options.trust:
        refusal = _framework_refusal(artifact)
        if refusal is not None:
            raise refusal
        raise ModelLoadError(
            f"{artifact.path} is a {_RUNS_CODE.get(fw.name, fw.name)}: loading it runs code "
            "from the file, so it is refused by default. If you made this file or trust who "
            "did, pass --trust-artifact (or set trust = true in the experiment's serving.toml)"
            + (
                "; better, save it in a format that runs no code (skops, ONNX)"
                if fw.name == "pickle"
                else ""
            )
        )
    module = importlib.import_module(f"{__package__}.{fw.module}")
    load: Callable[[Artifact, LoadOptions], Model] = module.load
    model = load(artifact, options)
    return model


def _framework_refusal(artifact: Artifact) -> ModelLoadError | None:
    """The framework module's own refusal of an untrusted artifact, if it has one: its optional
    ``refuse_untrusted(artifact)`` may tell apart, without running code from the file, one
    that no opt-in would serve (a PyTorch state_dict) and say what to do instead."""
    name = f"{__package__}.{artifact.framework.module}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None
    hook: Callable[[Artifact], ModelLoadError | None] | None = getattr(
        module, "refuse_untrusted", None
    )
    return hook(artifact) if hook is not None else None


_RUNS_CODE = {
    "torch_pickle": "pickled PyTorch file (torch.save of a module or a state_dict)",
    "closure": "cloudpickled closure (Clipper's python closure format)",
    "pickle": "pickle or joblib file",
}
