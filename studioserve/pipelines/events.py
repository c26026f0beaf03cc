"""What a pipe lets you observe: the event a listener hears per batch, and stats snapshots.

These are plain frozen records; nothing here runs or counts. The stage workers
(:mod:`~studioserve.pipelines.stage`) emit :class:`BatchEvent`, and
:meth:`~studioserve.pipelines.ModelPipe.stats` builds :class:`PipeStats` from their counters.
The pipe's log records are observable too: every module of the package writes them to
:data:`logger`, named ``studioserve.pipelines.pipe`` as it was before the package was split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = ["BatchEvent", "InstanceStats", "PipeLoad", "PipeStats", "StageStats", "logger"]

#: the logger of everything a pipe logs (its stages and Studio.ML's mode included)
logger = logging.getLogger("studioserve.pipelines.pipe")


@dataclass(frozen=True)
class BatchEvent:
    """What a listener hears after every batch a stage ran (a non-batching stage: every item).

    :ivar stage: the stage's name.
    :ivar size: items in the batch.
    :ivar rows: rows in the batch (see :mod:`~studioserve.pipelines.batching`).
    :ivar queue_waits: seconds each item waited in the stage's queue.
    :ivar compute_seconds: seconds the stage's function took for the whole batch.
    :ivar ok: items that succeeded.
    :ivar failed: items that failed (raised, expired, wrong output rows).
    :ivar instance: the index of the stage's instance (its worker) that ran the batch; 0 for
        a stage of one instance.
    """

    stage: str
    size: int
    rows: int
    queue_waits: tuple[float, ...]
    compute_seconds: float
    ok: int
    failed: int
    instance: int = 0


@dataclass(frozen=True)
class InstanceStats:
    """One instance of a stage (Triton's model instance): its worker's counters since start.

    Every worker of a stage is one instance: the copy given for it in ``add(instances=...)``,
    or the stage's one function shared by ``num_workers`` workers. The instances of a stage
    take their batches from its one queue, whichever is free first, so their counts differ.

    :ivar index: the instance's index (worker ``i`` runs instance ``i``; ``BatchEvent.instance``).
    :ivar device: the device the instance was placed on ("CPU", "GPU:0", ...); None when it was
        not placed (the framework's default device, or a plain function).
    :ivar batches: batches it ran.
    :ivar items: items in those batches.
    :ivar rows: rows in those batches.
    :ivar compute_seconds: seconds its function took, over all its batches.
    :ivar failures: items that failed in its hands (raised, expired, wrong output rows); items
        refused on the way in are the stage's, not an instance's.
    """

    index: int
    device: str | None
    batches: int
    items: int
    rows: int
    compute_seconds: float
    failures: int


@dataclass(frozen=True)
class StageStats:
    """A snapshot of one stage's counters (totals since the pipe started) and its settings.

    :ivar batch_sizes: histogram: rows per batch -> number of batches.
    :ivar batch_limit: the current limit in rows (moves in adaptive mode).
    :ivar max_delay: seconds a worker waits after the first queued item for more (0 for a
        stage that does not batch).
    :ivar preferred_batch_sizes: the batch sizes the stage cuts batches at when it can
        (ascending; empty when none were given, or the stage does not batch).
    :ivar instances: per instance (one per worker, in index order), the counters the totals
        above sum; empty for a snapshot built without them.
    """

    name: str
    workers: int
    batching: bool
    max_batch_size: int
    batch_limit: int
    items: int
    batches: int
    failures: int
    batch_sizes: dict[int, int]
    compute_seconds: float
    queue_wait_seconds: float
    queue_depth: int
    max_delay: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: tuple[InstanceStats, ...] = ()


@dataclass(frozen=True)
class PipeStats:
    """A snapshot of a pipe: per-stage counters (in pipe order) and the items in flight."""

    stages: dict[str, StageStats] = field(default_factory=dict)
    in_flight: int = 0
    accepted: int = 0


@dataclass(slots=True)
class PipeLoad:
    """What an item submitted now would face: cheap to take per request (no lock is taken).

    A snapshot, read-only by convention (not frozen: a frozen dataclass costs four times as
    much to build, and one is built per request).

    :meth:`~studioserve.pipelines.ModelPipe.load` builds it from each stage's queue and its
    moving average of compute time per batch; admission control (:mod:`studioserve.serving`)
    reads it before a request is decoded.

    :ivar expected_wait: seconds of whole batches queued ahead of a new item, summed over the
        stages: per stage, ``queued rows // (batch limit * workers)`` rounds times the stage's
        compute time per batch (0 while every queue fits in its stage's next batches, so a
        light load always reads 0).
    :ivar oldest_wait: seconds the oldest queued item of any stage has waited so far.
    :ivar batch_seconds: the largest per-stage moving average of a batch's compute time (0
        before the first batch): the slowest stage's.
    :ivar round_rows: rows the slowest stage computes per round: its batch limit times its
        workers (so ``n`` items ahead of a new one cost it ``n // round_rows`` rounds); 0 for
        a pipe without stages (its functions run in the submitting thread).
    :ivar queued: items queued in every stage.
    :ivar full: the first stage's queue is full (:meth:`~studioserve.pipelines.ModelPipe.submit`
        would raise :class:`~studioserve.errors.Overloaded`).
    """

    expected_wait: float = 0.0
    oldest_wait: float = 0.0
    batch_seconds: float = 0.0
    round_rows: int = 0
    queued: int = 0
    full: bool = False
