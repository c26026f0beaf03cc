"""Triton's statistics extension (``/v2/models/{name}/stats``) as an observer.

``success``/``fail`` count requests (every inference route, pickle and OIP alike) and their
end-to-end time. ``queue`` and ``compute_infer`` count the items of the model stage: time in
the stage's queue, and the compute time of the batch each ran in. ``inference_count`` is rows
computed, ``execution_count`` model calls (batches). Models without a pipe count each
successful request as one execution whose compute time is the request's time.
``compute_input`` and ``compute_output`` are not measured separately (their time is 0; their
counts follow ``compute_infer``, as perf_analyzer divides by them).

One :class:`ModelStatistics` counts one version of one model (the repository's
:class:`~studioserve.serving.repository.ServedVersion`); with replicas (``--instances``) it
also counts executions per instance, reported in ``instance_stats`` (a field Triton does not
have; tritonclient passes it through). Requests come in bulk (``on_requests``, one lock per
flush); :meth:`ModelStatistics.json` flushes the buffered requests before it reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..pipelines import BatchEvent
from ..serving.observer import RequestDigest

__all__ = ["ModelStatistics"]


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def add_ns(self, ns: int, count: int) -> None:
        self.count += count
        self.ns += ns

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStatistics:
    """Triton-style statistics for one model (see the module docstring).

    :param model_stage: the pipe stage that runs the model (None: the model has no pipe).
    :param flush: called before every read, to deliver the requests still buffered
        (:meth:`~studioserve.serving.observer.Observers.flush`).
    """

    def __init__(
        self,
        model_stage: str | None,
        *,
        version: int = 1,
        flush: Callable[[], object] | None = None,
    ) -> None:
        self.model_stage = model_stage
        self.version = version
        self.flush = flush
        #: instance index -> [executions, rows]
        self.instances: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_infer = _Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, _Duration] = {}

    def on_request(self, route: str, status: int, seconds: float, model: Any = None) -> None:
        self.on_requests(RequestDigest.of([(route, status, seconds, model, time.time())]))

    def on_requests(self, digest: RequestDigest) -> None:
        """Requests answered by this version (whatever model the digest's groups name)."""
        ok = ok_ns = failed = failed_ns = 0
        last = 0.0
        for group in digest.groups:
            status = group.status
            if status == 404:  # asked for another model: not this one's failure
                continue
            last = max(last, group.last_at)
            if status == 200:
                ok += len(group.seconds)
                ok_ns += group.total_ns()
            else:
                failed += len(group.seconds)
                failed_ns += group.total_ns()
        if not (ok or failed):
            return
        with self._lock:
            self.last_inference_ms = max(self.last_inference_ms, int(last * 1000))
            if ok:
                self.success.add_ns(ok_ns, ok)
                if self.model_stage is None:
                    self.inference_count += ok
                    self.execution_count += ok
                    self.compute_infer.add_ns(ok_ns, ok)
                    self.batches.setdefault(1, _Duration()).add_ns(ok_ns, ok)
            if failed:
                self.fail.add_ns(failed_ns, failed)

    def on_batch(self, event: BatchEvent) -> None:
        if event.stage != self.model_stage:
            return
        waits: Sequence[float] = event.queue_waits
        with self._lock:
            self.queue.add(sum(waits), len(waits))
            self.compute_infer.add(event.compute_seconds * event.size, event.size)
            self.inference_count += event.rows
            self.execution_count += 1
            self.batches.setdefault(event.rows, _Duration()).add(event.compute_seconds)
            counts = self.instances.setdefault(getattr(event, "instance", 0), [0, 0])
            counts[0] += 1
            counts[1] += event.rows

    def json(self, name: str) -> dict[str, Any]:
        if self.flush is not None:
            self.flush()  # not under the lock: the flush takes it to deliver
        with self._lock:
            infer = self.compute_infer.json()
            zero = {"count": infer["count"], "ns": 0}
            return {
                "name": name,
                "version": str(self.version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.json(),
                    "fail": self.fail.json(),
                    "queue": self.queue.json(),
                    "compute_input": dict(zero),
                    "compute_infer": infer,
                    "compute_output": dict(zero),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": {"count": d.count, "ns": 0},
                        "compute_infer": d.json(),
                        "compute_output": {"count": d.count, "ns": 0},
                    }
                    for size, d in sorted(self.batches.items())
                ],
                "memory_usage": [],
                "instance_stats": [
                    {"instance": i, "execution_count": c[0], "inference_count": c[1]}
                    for i, c in sorted(self.instances.items())
                ],
            }
