"""``--wrapper FILE.py|module``: import it and turn what ``create_model(modeldir)`` returns
into a Model: a :class:`~studioserve.pipelines.ModelPipe` (batched across requests), a Keras
model (served like a checkpoint) or a ``dict -> dict`` callable (called once per request)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..pipelines import ModelPipe
from ..pipelines.keras_stage import is_keras_model, keras_signature
from .base import Model, PipeModel
from .callable import CallableModel
from .keras import KerasModel

__all__ = ["import_wrapper", "load_wrapper", "model_from_object"]


def import_wrapper(wrapper: str) -> Any:
    """Import a wrapper given as a file path or a module name.

    :raises ModelLoadError: when it cannot be imported; the message names the file and the fix.
    """
    path = Path(wrapper).expanduser()
    if wrapper.endswith(".py") or path.exists():
        if not path.is_file():
            raise ModelLoadError(
                f"wrapper file {wrapper} does not exist; pass a .py file path or a module name"
            )
        name = f"studioserve_wrapper_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"cannot import wrapper file {path}: not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelLoadError(
                f"importing wrapper {path} raised {type(e).__name__}: {e}; fix the wrapper"
            ) from e
        return module
    try:
        return importlib.import_module(wrapper)
    except ImportError as e:
        raise ModelLoadError(
            f"cannot import wrapper module {wrapper!r}: {e}. Pass a .py file path, or make "
            "the module importable (install it or add its folder to PYTHONPATH)"
        ) from e
    except Exception as e:
        raise ModelLoadError(
            f"importing wrapper {wrapper!r} raised {type(e).__name__}: {e}; fix the wrapper"
        ) from e


def model_from_object(
    obj: Any,
    *,
    source: str,
    max_batch_size: int = 128,
    max_delay: float = 0.0,
    queue_size: int = 4096,
) -> Model:
    """The Model for what a wrapper's ``create_model`` returned (or any such object).

    :raises ModelLoadError: for anything that is not a pipe, a Keras model or a callable.
    """
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, ModelPipe):
        keras_model = obj.keras_model
        outputs = keras_signature(keras_model)[1] if keras_model is not None else []
        return PipeModel(obj, source=source, outputs=outputs)
    if is_keras_model(obj):
        return KerasModel(
            obj,
            source=source,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            queue_size=queue_size,
        )
    if _is_torch_module(obj):  # a module built in code (e.g. after load_state_dict)
        from .batched import LoadOptions
        from .torch import serve_module

        return serve_module(
            obj,
            source=source,
            options=LoadOptions(
                max_batch_size=max_batch_size, max_delay=max_delay, queue_size=queue_size
            ),
        )
    if callable(obj):
        return CallableModel(obj, source=source)
    raise ModelLoadError(
        f"create_model in wrapper {source} returned {type(obj).__name__}; return a "
        "ModelPipe, a Keras model or a callable that maps a dict to a dict"
    )


def load_wrapper(
    wrapper: str,
    modeldir: Path,
    *,
    max_batch_size: int,
    max_delay: float,
    queue_size: int,
    models: Any = None,
) -> Model:
    """Import ``wrapper`` and call its ``create_model(modeldir)``.

    A ``create_model(modeldir, models)`` that takes a second argument gets ``models``: a
    handle to the other models the server serves (``models.predict(key, data)``; see
    :class:`studioserve.serving.handles.ServedModels`), so a wrapper can chain models in code.

    :raises ModelLoadError: when it has no create_model, create_model raises, or it returns
        something that cannot be served.
    """
    module = import_wrapper(wrapper)
    create = getattr(module, "create_model", None)
    if not callable(create):
        raise ModelLoadError(
            f"wrapper {wrapper} has no create_model function; define "
            "'def create_model(modeldir): ...' returning a ModelPipe, a Keras model "
            "or a callable that maps a dict to a dict"
        )
    try:
        obj = create(str(modeldir), models) if _takes_models(create) else create(str(modeldir))
    except Exception as e:
        raise ModelLoadError(
            f"create_model({str(modeldir)!r}) in wrapper {wrapper} raised "
            f"{type(e).__name__}: {e}; fix the wrapper"
        ) from e
    return model_from_object(
        obj,
        source=wrapper,
        max_batch_size=max_batch_size,
        max_delay=max_delay,
        queue_size=queue_size,
    )


def _takes_models(create: Any) -> bool:
    """Whether ``create_model`` takes the served-models handle as a second argument."""
    try:
        params = list(inspect.signature(create).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _is_torch_module(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module`` (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
