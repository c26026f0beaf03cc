"""Experiment stores: a local folder, S3 or GCS, behind one interface.

``open_store(url)`` picks the implementation from the URL's scheme::

    store = open_store("~/.studioml/experiments")   # or file://..., s3://b/p, gs://b/p
    store.add("mnist-7", Path("./checkpoints"), serving_config=Path("serving.toml"))
    modeldir = store.fetch("mnist-7")                # a local folder, cached for remote stores
    config = store.serving_config("mnist-7")         # (bytes, path or URL) of serving.toml

Hot reload polls :meth:`Store.fingerprint` (names, sizes and mtimes or ETags; no download)
and fetches again when it changes::

    token = store.fingerprint("mnist-7")
    store.put_file("mnist-7", "ckpt-0002.keras", Path("ckpt-0002.keras"))
    if store.fingerprint("mnist-7") != token:
        modeldir = store.fetch("mnist-7")            # downloads only the new file

Modules, in import order (each imports only those before it): :mod:`.base` (the interface),
:mod:`._names` (safe names and paths), :mod:`._transfer` (retries, progress, the file sink),
:mod:`.cache` (the verified local cache), :mod:`.remote` (what S3 and GCS share),
:mod:`.local`, :mod:`.s3`, :mod:`.gcs` (the implementations), :mod:`.open` (the factory).
"""

from __future__ import annotations

from .base import (
    EXPERIMENT_FILE,
    KEY_PATTERN,
    MAX_SERVING_CONFIG,
    MODELDIR,
    SERVING_FILE,
    ExperimentInfo,
    Store,
    validate_key,
)
from .open import open_store

__all__ = [
    "EXPERIMENT_FILE",
    "KEY_PATTERN",
    "MAX_SERVING_CONFIG",
    "MODELDIR",
    "SERVING_FILE",
    "ExperimentInfo",
    "Store",
    "open_store",
    "validate_key",
]
