"""Experiment stores: a local folder, S3 or GCS, behind one interface.

``open_store(url)`` picks the implementation from the URL's scheme::

    store = open_store("~/.studioml/experiments")   # or file://..., s3://b/p, gs://b/p
    store.add("mnist-7", Path("./checkpoints"))
    modeldir = store.fetch("mnist-7")                # a local folder, cached for remote stores

Modules, in import order (each imports only those before it): :mod:`.base` (the interface),
:mod:`._names` (safe names and paths), :mod:`._transfer` (retries, progress, the file sink),
:mod:`.cache` (the verified local cache), :mod:`.remote` (what S3 and GCS share),
:mod:`.local`, :mod:`.s3`, :mod:`.gcs` (the implementations), :mod:`.open` (the factory).
"""

from __future__ import annotations

from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MODELDIR,
    ExperimentInfo,
    Store,
    validate_key,
)
from .open import open_store

__all__ = [
    "EXPERIMENT_FILE",
    "KEY_PATTERN",
    "MODELDIR",
    "ExperimentInfo",
    "Store",
    "open_store",
    "validate_key",
]
