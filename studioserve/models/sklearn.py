"""scikit-learn estimators and pipelines as a Model: skops files, and pickles the user trusts.

Loading (the detection table's ``sklearn`` and ``pickle`` rows):

- ``*.skops``: skops audits the file's types first (``skops.io.get_untrusted_types``). A file
  holding only types skops trusts loads as is; one holding others (a custom function in a
  ``FunctionTransformer``, and in skops 0.16 even a forest's ``sklearn.tree._tree.Tree``) is
  refused with those types listed, unless the user opts in (``--trust-artifact`` or
  ``trust = true`` in serving.toml), which trusts exactly the types listed.
- ``*.pkl``, ``*.pickle`` (``pickle.load``) and ``*.joblib`` (``joblib.load``): these run code
  while they load, so the loader lets them through only with the opt-in. What they hold must be
  a scikit-learn estimator (a ``BaseEstimator`` with ``predict`` or ``transform``; scikit-learn
  API models such as ``XGBClassifier`` count); anything else is refused with the wrapper
  contract to serve it instead.

Signature: one input ``"input"`` of per-example shape ``(n_features_in_,)``, float64 (what
scikit-learn computes in), and serving.toml's ``[[input]]`` / ``[[output]]`` tables replace
what the estimator says (:mod:`~._tabular`). An estimator fitted on a DataFrame has
``feature_names_in_``: its input stays one matrix whose columns are those features in that
order (no dict per example); the names are shown in :meth:`SklearnModel.describe` (the status
page and the load log line). Each batch is handed to the estimator as a pandas DataFrame with
those columns when pandas is installed (so a ``ColumnTransformer`` that selects columns by name
works), else as the matrix, with scikit-learn's "X does not have valid feature names" warning
silenced.

Outputs, one model call per batch (two for a classifier with probabilities):

- a classifier (``is_classifier``): ``"label"`` (``predict``: the class labels, as the
  estimator's ``classes_`` holds them: ints, or strings that OIP sends as BYTES) and, when it
  has ``predict_proba``, ``"probabilities"`` (per example ``(n_classes,)``, in ``classes_``
  order); each request key answers ``{"label": ..., "probabilities": ...}``;
- any other estimator with ``predict`` (regressors, clusterers): ``"prediction"``;
- a transformer without ``predict``: ``"output"`` (``transform``, densified).

A model with one output answers each key with its array. The estimator is shared by the
instances (scikit-learn's ``predict`` is safe to call from several threads) and runs on the
CPU, with the BLAS threads numpy has.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelLoadError
from ._tabular import Compute, serve_tabular
from .artifacts import Artifact
from .batched import BatchFunctionModel, LoadOptions, missing_framework

logger = logging.getLogger(__name__)

__all__ = ["SklearnModel", "load"]

#: most feature names :meth:`SklearnModel.describe` lists
_SHOWN_FEATURES = 20

_FEATURE_NAMES_WARNING = "X does not have valid feature names"


class SklearnModel(BatchFunctionModel):
    """A scikit-learn estimator or pipeline behind one batching stage."""

    kind: ClassVar[str] = "sklearn"

    #: the estimator's ``feature_names_in_`` (the input's columns, in order), if it has them
    feature_names: tuple[str, ...] = ()

    def describe(self) -> str:
        text = super().describe()
        names = self.feature_names
        if names:
            shown = ", ".join(names[:_SHOWN_FEATURES])
            more = f", ... ({len(names)} in all)" if len(names) > _SHOWN_FEATURES else ""
            text += f"; input columns: {shown}{more}"
        return text


def load(artifact: Artifact, options: LoadOptions) -> SklearnModel:
    """The detection table's loader for a skops file or a (trusted) pickle or joblib file.

    :raises ModelLoadError: for untrusted skops types without ``options.trust`` (listing them),
        a file that is not a fitted scikit-learn estimator, a missing package (naming the
        extra) or an unreadable file.
    """
    try:
        import sklearn.base as sklearn_base  # type: ignore[import-untyped]
    except ImportError as e:
        raise missing_framework("a scikit-learn model", "scikit-learn", "sklearn") from e
    path = artifact.path
    if artifact.framework.name == "pickle":
        estimator = _load_pickle(path)
    else:
        estimator = _load_skops(path, options.trust)
    _check_estimator(estimator, path, sklearn_base)
    names = _feature_names(estimator)
    n_features = getattr(estimator, "n_features_in_", None)
    if names and not n_features:
        n_features = len(names)
    compute, outputs = _compute(estimator, names, sklearn_base)
    model = serve_tabular(
        SklearnModel,
        [compute] * options.instances,
        outputs,
        artifact=artifact,
        options=options,
        n_features=n_features,
        dtype="float64",
        devices=["CPU"] * options.instances,
    )
    model.feature_names = names
    logger.info(
        "%s: %s on the CPU (%s)",
        path,
        type(estimator).__name__,
        ", ".join(outputs),
    )
    return model


def _load_skops(path: Path, trust: bool) -> Any:
    try:
        import skops.io as sio  # type: ignore[import-untyped]
    except ImportError as e:
        raise missing_framework(f"the skops file {path}", "skops", "sklearn") from e
    try:
        untrusted: list[str] = list(sio.get_untrusted_types(file=path))
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable skops file: {type(e).__name__}: {e}") from e
    if untrusted and not trust:
        raise ModelLoadError(
            f"{path} is a skops file holding types that skops does not trust: "
            f"{', '.join(untrusted)}; loading them may run code from the file, so it is refused "
            "by default. If you made this file or trust who did, pass --trust-artifact (or set "
            "trust = true in the experiment's serving.toml)"
        )
    if untrusted:
        logger.warning("%s: trusting skops types %s (--trust-artifact)", path, untrusted)
    try:
        return sio.load(path, trusted=untrusted or None)
    except Exception as e:
        raise ModelLoadError(f"cannot load the skops file {path}: {type(e).__name__}: {e}") from e


def _load_pickle(path: Path) -> Any:
    """A pickle or joblib file (the loader has checked the user's opt-in)."""
    try:
        if path.suffix.lower() == ".joblib":
            try:
                import joblib  # type: ignore[import-untyped]
            except ImportError as e:
                raise missing_framework(f"the joblib file {path}", "joblib", "sklearn") from e
            return joblib.load(path)
        with path.open("rb") as f:
            return pickle.load(f)  # noqa: S301 - the user trusts this file (--trust-artifact)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e


def _check_estimator(estimator: Any, path: Path, sklearn_base: Any) -> None:
    what = f"{type(estimator).__module__}.{type(estimator).__qualname__}"
    if not isinstance(estimator, sklearn_base.BaseEstimator) or not (
        hasattr(estimator, "predict") or hasattr(estimator, "transform")
    ):
        raise ModelLoadError(
            f"{path} holds a {what}, not a scikit-learn estimator or pipeline with predict or "
            "transform; to serve it, write a wrapper (--wrapper FILE.py) whose "
            "create_model(modeldir) loads it and returns a ModelPipe, a Keras model or a "
            "callable that maps a dict to a dict"
        )
    from sklearn.exceptions import NotFittedError  # type: ignore[import-untyped]
    from sklearn.utils.validation import check_is_fitted  # type: ignore[import-untyped]

    try:
        check_is_fitted(estimator)
    except NotFittedError as e:
        raise ModelLoadError(
            f"{path} holds a {what} that is not fitted; fit it before saving"
        ) from e
    except TypeError:  # an estimator check_is_fitted cannot judge: its first call will
        pass


def _feature_names(estimator: Any) -> tuple[str, ...]:
    names = getattr(estimator, "feature_names_in_", None)
    if names is None:
        return ()
    return tuple(str(n) for n in names)


def _compute(
    estimator: Any, names: tuple[str, ...], sklearn_base: Any
) -> tuple[Compute, list[str]]:
    """The function computing the estimator's outputs from the input matrix, and their names."""
    frame = _framer(names)
    if not hasattr(estimator, "predict"):
        transform = estimator.transform
        return (lambda x: {"output": _dense(transform(frame(x)))}), ["output"]
    predict = estimator.predict
    if not sklearn_base.is_classifier(estimator):
        return (lambda x: {"prediction": _dense(predict(frame(x)))}), ["prediction"]
    if not hasattr(estimator, "predict_proba"):
        return (lambda x: {"label": _dense(predict(frame(x)))}), ["label"]
    proba = estimator.predict_proba
    classes = getattr(estimator, "classes_", None)
    if classes is not None and _label_is_argmax(estimator, frame):
        labels = np.asarray(classes)

        def classify_once(x: np.ndarray[Any, Any]) -> dict[str, Any]:
            # one pass over the model: the label is the most probable class (checked at load)
            p = _dense(proba(frame(x)))
            return {"label": labels[p.argmax(axis=1)], "probabilities": p}

        return classify_once, ["label", "probabilities"]

    def classify(x: np.ndarray[Any, Any]) -> dict[str, Any]:
        rows = frame(x)
        return {"label": _dense(predict(rows)), "probabilities": _dense(proba(rows))}

    return classify, ["label", "probabilities"]


def _label_is_argmax(estimator: Any, frame: Any, rows: int = 64) -> bool:
    """Whether ``predict`` is the most probable class of ``predict_proba`` on probe rows.

    True for most classifiers (forests, trees, linear models, boosting), so one
    ``predict_proba`` per batch gives both outputs (a forest then runs once, not twice);
    False for those whose ``predict`` decides otherwise (an SVC with probability=True).
    """
    n = getattr(estimator, "n_features_in_", None)
    if not isinstance(n, (int, np.integer)) or n < 1:
        return False
    probe = np.random.default_rng(0).normal(size=(rows, int(n)))
    try:
        p = np.asarray(estimator.predict_proba(frame(probe)))
        if p.ndim != 2:
            return False
        want = np.asarray(estimator.predict(frame(probe)))
        return bool(np.array_equal(np.asarray(estimator.classes_)[p.argmax(axis=1)], want))
    except Exception:
        return False


def _framer(names: tuple[str, ...]) -> Any:
    """What hands the matrix to an estimator fitted with ``names``: a DataFrame with those
    columns when pandas is installed, else the matrix with the feature-names warning off."""
    if not names:
        return _same
    try:
        pandas = importlib.import_module("pandas")
    except ImportError:
        # once per process, narrowly: the matrix's columns are the features, in order
        warnings.filterwarnings("ignore", message=_FEATURE_NAMES_WARNING, category=UserWarning)
        return _same
    columns = list(names)

    def frame(x: np.ndarray[Any, Any]) -> Any:
        return pandas.DataFrame(x, columns=columns, copy=False)

    return frame


def _same(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return x


def _dense(value: Any) -> np.ndarray[Any, Any]:
    """An output as a dense array (a transformer may return a scipy sparse matrix)."""
    if hasattr(value, "toarray"):
        value = value.toarray()
    return np.asarray(value)
