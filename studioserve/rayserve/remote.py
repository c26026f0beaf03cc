"""The ingress's view of a model that runs in a Ray Serve deployment: :class:`RemoteModel`.

A :class:`RemoteModel` is a :class:`~studioserve.models.base.Model` like any other, so the
ingress serves it through the one request path (the ready check, the lease, the size limit,
admission, decode, encode, observers): only its ``predict`` differs. That sends the decoded
request to the model's deployment (Ray routes it to a replica with room, where it batches
with the other calls that replica gets) and maps what can go wrong on the way:

- the replica's own answer for a failed request (a :class:`~.messages.Failure`): raised again
  as the same :class:`~studioserve.errors.RequestFailed` (422, 500, 504, ...);
- every replica's queue full (Ray's ``BackPressureError``): 503 with Retry-After;
- the replica died or went away mid-call (``RayActorError``, ``ActorUnavailableError``): the
  call is sent once more, to another replica (inference is idempotent), then 503 with
  Retry-After;
- the request timeout: the call is cancelled and the request gets 504;
- anything else Ray raises: 500 naming it.

:class:`ReplicaBoard` keeps, per model, the replica counts the driver last reported
(``RUNNING``, ``STARTING``, ...) and what each replica answered (requests, and the batches and
rows its pipe counted): the status page's ``replicas``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from ..errors import RequestFailed
from ..models import Model
from .messages import Answer, VersionFacts

logger = logging.getLogger(__name__)

__all__ = ["RemoteModel", "ReplicaBoard"]

#: seconds a client is told to wait when every replica is busy or one just died
RETRY_AFTER = 1.0
_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)


class ReplicaBoard:
    """Per model: the replica states the driver reported and each replica's answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, int]] = {}
        self._replicas: dict[str, dict[str, dict[str, int]]] = {}

    def set_states(self, states: Mapping[str, Mapping[str, int]]) -> None:
        """``{model: {"RUNNING": 2, ...}}``, as Ray Serve's status has them."""
        with self._lock:
            self._states = {m: dict(s) for m, s in states.items()}

    def running(self, model: str) -> int:
        with self._lock:
            return self._states.get(model, {}).get("RUNNING", 0)

    def answered(self, model: str, answer: Answer) -> None:
        with self._lock:
            mine = self._replicas.setdefault(model, {})
            row = mine.get(answer.replica)
            if row is None:
                row = mine[answer.replica] = {"requests": 0, "batches": 0, "rows": 0}
            row["requests"] += 1
            counts = answer.counts
            if counts is not None:
                row["batches"] = counts.batches
                row["rows"] = counts.rows

    def report(self, model: str) -> dict[str, Any]:
        with self._lock:
            return {
                "states": dict(self._states.get(model, {})),
                "running": self._states.get(model, {}).get("RUNNING", 0),
                "per_replica": {k: dict(v) for k, v in self._replicas.get(model, {}).items()},
            }


class RemoteModel(Model):
    """One version of a model served by a Ray Serve deployment (see the module docstring).

    :param facts: the version as its replicas described it.
    :param handle: the model deployment's handle.
    :param board: where replica states and answers are kept.
    """

    kind: ClassVar[str] = "ray"

    def __init__(self, facts: VersionFacts, handle: Any, board: ReplicaBoard) -> None:
        super().__init__(
            source=facts.source,
            inputs=facts.inputs,
            outputs=facts.outputs,
            load_seconds=facts.load_seconds,
        )
        self.facts = facts
        self._handle = handle.options(method_name="predict")
        self._board = board

    @property
    def platform(self) -> str:
        return self.facts.platform

    @property
    def batches(self) -> bool:
        return self.facts.batches

    @property
    def instances(self) -> int:
        """The replicas running now (as the driver last saw them; at least 1)."""
        return max(1, self._board.running(self.facts.name))

    def report(self) -> dict[str, Any]:
        return {
            "runs_as": self.facts.kind,
            "replicas": self._board.report(self.facts.name),
        }

    def describe(self) -> str:
        n = self._board.running(self.facts.name)
        return f"{self.facts.kind} model from {self.source} on Ray Serve ({n} replica(s) running)"

    async def predict_async(
        self, data: dict[str, Any], *, timeout: float, alone: bool = False
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            response = self._handle.remote(self.facts.version, data, timeout)
            try:
                answer = await asyncio.wait_for(
                    _awaited(response), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                response.cancel()
                raise _late(timeout) from None
            except Exception as e:
                if attempt == 1 and isinstance(e, _GONE):
                    logger.warning("a replica of %r went away (%s); retrying", self.facts.name, e)
                    continue
                raise _failed(self.facts.name, e) from None
            return self._unwrap(answer)
        raise AssertionError("unreachable")  # pragma: no cover

    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            response = self._handle.remote(self.facts.version, data, timeout)
            try:
                answer = response.result(timeout_s=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                response.cancel()
                raise _late(timeout) from None
            except Exception as e:
                if attempt == 1 and isinstance(e, _GONE):
                    continue
                raise _failed(self.facts.name, e) from None
            return self._unwrap(answer)
        raise AssertionError("unreachable")  # pragma: no cover

    def _unwrap(self, answer: Answer) -> dict[str, Any]:
        self._board.answered(self.facts.name, answer)
        if answer.failure is not None:
            raise answer.failure.error()
        assert answer.outputs is not None
        return answer.outputs

    def close(self) -> None:
        """Nothing here: the replicas go with the application."""


async def _awaited(response: Any) -> Answer:
    answer: Answer = await response
    return answer


def _late(timeout: float) -> RequestFailed:
    return RequestFailed(
        f"no result within the request timeout of {timeout:g}s",
        status=504,
        error_type="deadline_exceeded",
    )


def _failed(name: str, e: Exception) -> RequestFailed:
    """What a Ray error means for the request."""
    if isinstance(e, BackPressureError):
        return RequestFailed(
            f"every replica of {name!r} is busy (its queue is full); retry after {RETRY_AFTER:g}s",
            status=503,
            error_type="overloaded",
            retry_after=RETRY_AFTER,
        )
    if isinstance(e, _GONE):
        return RequestFailed(
            f"the replica computing this request of {name!r} went away ({type(e).__name__}); "
            f"Ray is replacing it: retry after {RETRY_AFTER:g}s",
            status=503,
            error_type="replica_unavailable",
            retry_after=RETRY_AFTER,
        )
    if isinstance(e, RayTaskError):
        cause = e.cause if isinstance(e.cause, BaseException) else e
        logger.error("a replica of %r raised: %s", name, cause)
        return RequestFailed(
            f"the model replica failed: {type(cause).__name__}: {cause}",
            status=500,
            error_type="model_error",
        )
    if isinstance(e, RayError):
        return RequestFailed(
            f"Ray could not run this request of {name!r}: {type(e).__name__}: {e}",
            status=503,
            error_type="replica_unavailable",
            retry_after=RETRY_AFTER,
        )
    logger.exception("calling a replica of %r failed", name, exc_info=e)
    return RequestFailed(
        f"calling the model's replica failed: {type(e).__name__}", status=500, error_type="internal"
    )
