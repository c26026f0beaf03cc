"""What the ingress and the model replicas send each other (plain, picklable, no Ray).

A model replica describes each version it serves once (:class:`VersionFacts`: the signature
and what the status page and OIP metadata show) and answers every call with an
:class:`Answer`: the outputs, or the request's error as a :class:`Failure` (its status, type,
message, per-key messages and Retry-After), which the ingress raises again as the same
:class:`~studioserve.errors.RequestFailed`, so a remote model fails exactly like a local one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import RequestFailed, StudioServeError
from ..tensors import TensorSpec

__all__ = ["Answer", "Failure", "ReplicaCounts", "VersionFacts"]


@dataclasses.dataclass(frozen=True)
class VersionFacts:
    """One model version as a replica serves it."""

    name: str
    version: int
    kind: str
    platform: str
    source: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    load_seconds: float
    batches: bool
    max_batch_size: int
    available: tuple[int, ...]
    settings: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request's error, as it crosses from a replica to the ingress."""

    status: int
    error_type: str
    message: str
    keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retry_after: float | None = None

    @classmethod
    def of(cls, e: StudioServeError) -> Failure:
        return cls(
            status=e.http_status,
            error_type=e.error_type,
            message=str(e),
            keys=dict(getattr(e, "keys", None) or {}),
            retry_after=getattr(e, "retry_after", None),
        )

    def error(self) -> RequestFailed:
        return RequestFailed(
            self.message,
            status=self.status,
            error_type=self.error_type,
            keys=dict(self.keys),
            retry_after=self.retry_after,
        )


@dataclasses.dataclass(frozen=True)
class ReplicaCounts:
    """A replica's own counters: the model stage's batches and rows since it started."""

    batches: int
    rows: int


@dataclasses.dataclass(frozen=True)
class Answer:
    """One call's answer: ``outputs`` or ``failure``, from ``replica`` (its Ray replica id).

    ``counts`` rides along at most every few tenths of a second (the status page's
    per-replica figures), None otherwise.
    """

    replica: str
    outputs: dict[str, Any] | None = None
    failure: Failure | None = None
    counts: ReplicaCounts | None = None
