"""Pipelines: Studio.ML's ModelPipe as a batching service.

Public API (``__all__``; tests/test_public_api.py holds it to this list)::

    from studioserve.pipelines import ModelPipe, Batcher, AIMDController, collate, split_rows
    from studioserve.pipelines import BatchEvent, InstanceStats, PipeLoad, PipeStats, StageStats
    from studioserve.pipelines import (PipelineError, ItemFailed, InvalidInput, ItemFiltered,
        BatchSizeMismatch, Overloaded, DeadlineExceeded, PipeClosed)

The errors a pipe's futures and :meth:`ModelPipe.submit` raise live in
:mod:`studioserve.errors` and are re-exported here.

Modules, each importing only those above it: :mod:`.batching` (queues and stacking) and
:mod:`.keras_stage` (running a Keras model); :mod:`.events` (what a pipe reports);
:mod:`.options` (one ``add()``'s options, checked); :mod:`.stage` (one stage and its workers'
loop); :mod:`.studioml` (Studio.ML's collection calls); :mod:`.pipe` (:class:`ModelPipe`).
"""

from __future__ import annotations

from ..errors import BatchSizeMismatch as BatchSizeMismatch
from ..errors import DeadlineExceeded as DeadlineExceeded
from ..errors import InvalidInput as InvalidInput
from ..errors import ItemFailed as ItemFailed
from ..errors import ItemFiltered as ItemFiltered
from ..errors import Overloaded as Overloaded
from ..errors import PipeClosed as PipeClosed
from ..errors import PipelineError as PipelineError
from .batching import AIMDController as AIMDController
from .batching import Batcher as Batcher
from .batching import collate as collate
from .batching import split_rows as split_rows
from .events import BatchEvent as BatchEvent
from .events import InstanceStats as InstanceStats
from .events import PipeLoad as PipeLoad
from .events import PipeStats as PipeStats
from .events import StageStats as StageStats
from .pipe import ModelPipe as ModelPipe

__all__ = [
    "AIMDController",
    "BatchEvent",
    "BatchSizeMismatch",
    "Batcher",
    "DeadlineExceeded",
    "InstanceStats",
    "InvalidInput",
    "ItemFailed",
    "ItemFiltered",
    "ModelPipe",
    "Overloaded",
    "PipeClosed",
    "PipeLoad",
    "PipeStats",
    "PipelineError",
    "StageStats",
    "collate",
    "split_rows",
]
