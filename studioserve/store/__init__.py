"""Experiment stores: a local folder, S3 or GCS, behind one interface.

``open_store(url)`` picks the implementation from the URL's scheme::

    store = open_store("~/.studioml/experiments")   # or file://..., s3://b/p, gs://b/p
    store.add("mnist-7", Path("./checkpoints"))
    modeldir = store.fetch("mnist-7")                # a local folder, cached for remote stores
"""

from __future__ import annotations

from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MODELDIR,
    ExperimentInfo,
    Store,
    open_store,
    validate_key,
)

__all__ = [
    "EXPERIMENT_FILE",
    "KEY_PATTERN",
    "MODELDIR",
    "ExperimentInfo",
    "Store",
    "open_store",
    "validate_key",
]
