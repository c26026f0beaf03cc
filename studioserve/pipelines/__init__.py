"""Pipelines: Studio.ML's ModelPipe as a batching service.

Public API::

    from studioserve.pipelines import ModelPipe, Batcher

The errors a pipe's futures and :meth:`ModelPipe.submit` raise live in
:mod:`studioserve.errors` and are re-exported here.
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
from .pipe import BatchEvent as BatchEvent
from .pipe import ModelPipe as ModelPipe
from .pipe import PipeStats as PipeStats
from .pipe import StageStats as StageStats

__all__ = [
    "AIMDController",
    "BatchEvent",
    "BatchSizeMismatch",
    "Batcher",
    "DeadlineExceeded",
    "InvalidInput",
    "ItemFailed",
    "ItemFiltered",
    "ModelPipe",
    "Overloaded",
    "PipeClosed",
    "PipeStats",
    "PipelineError",
    "StageStats",
    "collate",
    "split_rows",
]
