"""Models: the Model protocol every served thing implements, one implementation per kind, and
the loader that picks one from a modeldir or a wrapper.

Public API (``__all__``; tests/test_public_api.py holds it to this list)::

    from studioserve.models import Model, PipeModel, KerasModel, SavedModel, CallableModel
    from studioserve.models import IdentityModel, load_model, find_checkpoint
    from studioserve.models import import_wrapper, model_from_object
"""

from __future__ import annotations

from .base import Model as Model
from .base import PipeModel as PipeModel
from .callable import CallableModel as CallableModel
from .identity import IdentityModel as IdentityModel
from .keras import KerasModel as KerasModel
from .loader import find_checkpoint as find_checkpoint
from .loader import load_model as load_model
from .savedmodel import SavedModel as SavedModel
from .wrapper import import_wrapper as import_wrapper
from .wrapper import model_from_object as model_from_object

__all__ = [
    "CallableModel",
    "IdentityModel",
    "KerasModel",
    "Model",
    "PipeModel",
    "SavedModel",
    "find_checkpoint",
    "import_wrapper",
    "load_model",
    "model_from_object",
]
