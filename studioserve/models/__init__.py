"""Models: the Model protocol every served thing implements, one implementation per kind, and
the loader that picks one from a modeldir or a wrapper.

Public API (``__all__``; tests/test_public_api.py holds it to this list)::

    from studioserve.models import Model, PipeModel, KerasModel, SavedModel, CallableModel
    from studioserve.models import IdentityModel, load_model, find_checkpoint
    from studioserve.models import import_wrapper, model_from_object
    from studioserve.models import ModelVersionSource, VersionPolicy, list_versions, load_version
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
from .versions import ModelVersionSource as ModelVersionSource
from .versions import VersionPolicy as VersionPolicy
from .versions import list_versions as list_versions
from .versions import load_version as load_version
from .wrapper import import_wrapper as import_wrapper
from .wrapper import model_from_object as model_from_object

__all__ = [
    "CallableModel",
    "IdentityModel",
    "KerasModel",
    "Model",
    "ModelVersionSource",
    "PipeModel",
    "SavedModel",
    "VersionPolicy",
    "find_checkpoint",
    "import_wrapper",
    "list_versions",
    "load_model",
    "load_version",
    "model_from_object",
]
