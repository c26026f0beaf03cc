"""Pipelines: Studio.ML's ModelPipe as a batching service.

Public API::

    from studioserve.pipelines import ModelPipe, Batcher
"""

from __future__ import annotations

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
    "Batcher",
    "ModelPipe",
    "PipeStats",
    "StageStats",
    "collate",
    "split_rows",
]
