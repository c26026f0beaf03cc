"""XGBoost and LightGBM boosters as a Model: their native model files, no pickle.

Loading (the detection table's ``xgboost`` and ``lightgbm`` rows):

- XGBoost: ``*.ubj`` or an XGBoost ``*.json`` (``Booster.save_model``, or
  ``XGBClassifier.save_model``), loaded with ``xgboost.Booster(model_file=...)``; each batch is
  one ``Booster.inplace_predict`` (no DMatrix). The objective comes from the booster's saved
  configuration. When this XGBoost is built with CUDA the booster is placed on the GPU
  (``device = "cuda:N"``: the instance's ``GPU:N`` label, by default ``GPU:0``) and the log
  line says so; XGBoost falls back to the CPU when it finds no GPU, and so does the label.
  Batches arrive as numpy arrays, which XGBoost copies to the GPU (it warns once about the
  mismatched devices).
- LightGBM: a text model (``Booster.save_model``, ``booster_.save_model``), loaded with
  ``lightgbm.Booster(model_file=...)``; each batch is one ``Booster.predict``, on the CPU.

Signature: one input ``"input"`` of per-example shape ``(num_features,)``: float32 for XGBoost
(what it computes in), float64 for LightGBM (its thresholds are doubles, so float64 rows answer
exactly what ``Booster.predict`` answers on them). serving.toml's ``[[input]]`` /
``[[output]]`` tables replace it (:mod:`~._tabular`).

Outputs: a classifier objective (XGBoost ``binary:logistic``, ``multi:softprob``; LightGBM
``binary``, ``multiclass``, ``multiclassova``) answers ``"label"`` (the class index, int64:
``p > 0.5`` for binary, the argmax for several classes) and ``"probabilities"`` (per example
``(n_classes,)``: ``[1 - p, p]`` for a binary model, like scikit-learn's ``predict_proba``; a
binary objective with several targets answers each target's ``p`` and ``p > 0.5``);
every other objective answers ``"prediction"`` as the booster does (raw margins for
``binary:logitraw``, class indices for ``multi:softmax``). Each instance loads its own
booster from the file; the boosters keep their default thread counts.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelLoadError
from ._tabular import Compute, serve_tabular
from .artifacts import Artifact
from .batched import BatchFunctionModel, LoadOptions, missing_framework

logger = logging.getLogger(__name__)

__all__ = ["LightGBMModel", "XGBoostModel", "load"]

_XGBOOST_CLASSIFIERS = ("binary:logistic", "multi:softprob")
_LIGHTGBM_CLASSIFIERS = ("binary", "multiclass", "multiclassova")
#: the outputs of a classifier (True) and of any other objective
_OUTPUTS = {True: ["label", "probabilities"], False: ["prediction"]}


class XGBoostModel(BatchFunctionModel):
    """An XGBoost booster behind one batching stage."""

    kind: ClassVar[str] = "xgboost"


class LightGBMModel(BatchFunctionModel):
    """A LightGBM booster behind one batching stage."""

    kind: ClassVar[str] = "lightgbm"


def load(artifact: Artifact, options: LoadOptions) -> BatchFunctionModel:
    """The detection table's loader for an XGBoost or LightGBM model file.

    :raises ModelLoadError: for a missing package (naming the extra) or an unreadable file.
    """
    if artifact.framework.name == "lightgbm":
        return _load_lightgbm(artifact, options)
    return _load_xgboost(artifact, options)


def _load_xgboost(artifact: Artifact, options: LoadOptions) -> XGBoostModel:
    try:
        import xgboost
    except ImportError as e:
        raise missing_framework("an XGBoost model", "xgboost", "xgboost") from e
    path = artifact.path
    labels = _xgboost_labels(options, bool(xgboost.build_info().get("USE_CUDA")))
    boosters: list[Any] = []
    placed: list[str] = []
    for label in labels:
        try:
            booster = xgboost.Booster(model_file=str(path))
        except xgboost.core.XGBoostError as e:
            raise ModelLoadError(f"cannot load the XGBoost model {path}: {e}") from e
        boosters.append(booster)
        placed.append(_place_xgboost(booster, label, str(path)))
    objective = str(json.loads(boosters[0].save_config())["learner"]["objective"]["name"])
    classifier = objective in _XGBOOST_CLASSIFIERS
    model = serve_tabular(
        XGBoostModel,
        [
            _compute(b.inplace_predict, classifier, objective.startswith("binary:"))
            for b in boosters
        ],
        _OUTPUTS[classifier],
        artifact=artifact,
        options=options,
        n_features=boosters[0].num_features(),
        dtype="float32",
        devices=placed,
    )
    logger.info("%s: XGBoost %s booster on %s", path, objective, ", ".join(sorted(set(placed))))
    return model


def _xgboost_labels(options: LoadOptions, cuda: bool) -> list[str]:
    """Each instance's device label: the given ones, else ``GPU:0`` with CUDA, else ``CPU``."""
    if options.devices is not None:
        if len(options.devices) != options.instances:
            raise ModelLoadError(
                f"{len(options.devices)} devices for {options.instances} instances; give one "
                "device per instance"
            )
        return list(options.devices)
    return ["GPU:0" if cuda else "CPU"] * options.instances


def _place_xgboost(booster: Any, label: str, source: str) -> str:
    """Put ``booster`` on the device ``label`` names; the label of where it is."""
    kind, _, index = label.lower().partition(":")
    if kind not in ("gpu", "cuda"):
        return "CPU"
    device = f"cuda:{index or 0}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        booster.set_param({"device": device})
    for w in caught:
        logger.warning("%s: %s", source, w.message)
    got = json.loads(booster.save_config())["learner"]["generic_param"]["device"]
    if not str(got).startswith("cuda"):
        logger.warning(
            "%s: XGBoost did not take %s (it uses %s); serving on the CPU", source, device, got
        )
        return "CPU"
    return f"GPU:{index or 0}"


def _load_lightgbm(artifact: Artifact, options: LoadOptions) -> LightGBMModel:
    try:
        import lightgbm
    except ImportError as e:
        raise missing_framework("a LightGBM model", "lightgbm", "lightgbm") from e
    path = artifact.path
    boosters = []
    for _ in range(options.instances):
        try:
            boosters.append(lightgbm.Booster(model_file=str(path)))
        except lightgbm.basic.LightGBMError as e:
            raise ModelLoadError(f"cannot load the LightGBM model {path}: {e}") from e
    objective = _lightgbm_objective(boosters[0])
    classifier = objective in _LIGHTGBM_CLASSIFIERS
    model = serve_tabular(
        LightGBMModel,
        [_compute(b.predict, classifier, objective == "binary") for b in boosters],
        _OUTPUTS[classifier],
        artifact=artifact,
        options=options,
        n_features=boosters[0].num_feature(),
        dtype="float64",
        devices=["CPU"] * options.instances,
    )
    logger.info("%s: LightGBM %s booster on the CPU", path, objective or "(no objective)")
    return model


def _lightgbm_objective(booster: Any) -> str:
    """The objective's name (``"binary"`` of ``"binary sigmoid:1"``), from the file's
    parameters, else from the model's header."""
    objective = booster.params.get("objective") if isinstance(booster.params, dict) else None
    if not objective:
        objective = booster.dump_model(num_iteration=1).get("objective", "")
    words = str(objective).split()
    return words[0] if words else ""


def _compute(predict: Callable[[Any], Any], classifier: bool, binary: bool = False) -> Compute:
    """The outputs from one booster call: a classifier's label and probabilities, else its
    prediction (``binary``: a binary objective, whose 2-D output is several targets')."""
    if not classifier:
        return lambda x: {"prediction": np.asarray(predict(x))}

    def classify(x: np.ndarray[Any, Any]) -> dict[str, Any]:
        p = np.asarray(predict(x))
        if p.ndim == 1:  # binary: P(class 1)
            return {"label": (p > 0.5).astype(np.int64), "probabilities": np.stack([1 - p, p], 1)}
        if binary:  # several binary targets: P(1) of each
            return {"label": (p > 0.5).astype(np.int64), "probabilities": p}
        return {"label": np.argmax(p, axis=1).astype(np.int64), "probabilities": p}

    return classify
