"""The Model protocol: what every served thing is, whatever framework or wrapper made it.

A :class:`Model` has a signature (:attr:`~Model.inputs` and :attr:`~Model.outputs`, each a
list of :class:`~studioserve.tensors.TensorSpec`), a :meth:`~Model.predict` that answers one
request dict, :meth:`~Model.describe` and :meth:`~Model.close`, and says whether it batches
(:attr:`~Model.batches`: it has a :class:`~studioserve.pipelines.ModelPipe` whose batching
stage gathers items across concurrent requests). The implementation is chosen once, when the
model is loaded (:mod:`studioserve.models.loader`); nothing above this layer branches on
what kind of model it serves.

:class:`PipeModel` is the base of every batching model: it validates each request key once
against the input signature, submits one item per key to the pipe (so keys of concurrent
requests meet in one batch), waits for them under the request's deadline and turns failures
into one :class:`~studioserve.errors.RequestFailed` with per-key messages.

A model may run as several instances (Triton's instance groups: copies of its batched stage
fed by one queue, each on its device); :attr:`~Model.instances` and :attr:`~Model.devices` say
how many and where, read from the pipe's model stage.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar

import numpy as np

from ..errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    PipelineError,
    RequestFailed,
)
from ..pipelines import ModelPipe
from ..pipelines.completion import deadline_watch
from ..tensors import TensorSpec, check_example

logger = logging.getLogger(__name__)

__all__ = ["Model", "PipeModel"]

# When keys fail with different statuses, the answer takes the first of these that occurs.
_STATUS_ORDER = (400, 413, 422, 503, 504, 500)


class Model(abc.ABC):
    """One served model.

    :param source: the checkpoint, folder or wrapper it came from (for messages).
    :param inputs: the per-example input signature, when known (requests are validated
        against it); empty: any dict is passed as sent.
    :param outputs: the per-example output signature, when known.
    :param load_seconds: how long loading and warm-up took.
    """

    #: a short name of the implementation, shown on the status page, in OIP metadata
    #: (``platform``) and metrics; descriptive only, never branched on
    kind: ClassVar[str] = "model"

    def __init__(
        self,
        *,
        source: str,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        load_seconds: float = 0.0,
    ) -> None:
        self.source = source
        self.inputs: list[TensorSpec] = list(inputs)
        self.outputs: list[TensorSpec] = list(outputs)
        #: seconds loading and warm-up took (set by the loader)
        self.load_seconds = load_seconds

    @property
    def pipe(self) -> ModelPipe | None:
        """The pipe that computes this model's items, when it has one."""
        return None

    @property
    def platform(self) -> str:
        """The platform name in OIP metadata and configuration (Triton's where it has one)."""
        return f"studioserve_{self.kind}"

    @property
    def batches(self) -> bool:
        """Whether items of concurrent requests are computed together (there is a pipe)."""
        return self.pipe is not None

    @property
    def model_stage(self) -> str | None:
        """The name of the pipe stage that runs the model itself (see ModelPipe.model_stage)."""
        pipe = self.pipe
        return None if pipe is None else pipe.model_stage

    @property
    def instances(self) -> int:
        """How many instances compute the model's batches at once (1 without a pipe)."""
        return 1

    @property
    def devices(self) -> tuple[str, ...]:
        """Each instance's device label ("CPU", "GPU:0", ...), in instance order; empty when
        the instances were not placed (the framework's default device, a plain function)."""
        return ()

    def start(self) -> None:
        """Start whatever threads the model needs before the first request."""
        pipe = self.pipe
        if pipe is not None:
            pipe.start()

    @abc.abstractmethod
    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Predict every key of ``data``; the result has the same keys.

        :param data: one request: key -> value (one task per key).
        :param timeout: seconds the request may wait for its results.
        :raises RequestFailed: with the status and per-key messages when any key fails.
        """

    async def predict_async(
        self, data: dict[str, Any], *, timeout: float, alone: bool = False
    ) -> dict[str, Any]:
        """:meth:`predict` for a coroutine on an event loop.

        By default :meth:`predict` runs in the loop's executor (a model that is one call per
        request: a callable, an ensemble); :class:`PipeModel` awaits its pipe instead, with no
        thread of its own per request.

        :param alone: no other request is in flight for this model (a hint: an idle, cheap
            pipe then computes the request in the calling thread).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, functools.partial(self.predict, data, timeout=timeout)
        )

    def report(self) -> dict[str, Any]:
        """Facts beyond the signature for the status page (a remote model's replicas); empty
        by default."""
        return {}

    def describe(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs) or "any"
        outs = ", ".join(s.describe() for s in self.outputs) or "any"
        text = f"{self.kind} model from {self.source}: inputs ({ins}) -> outputs ({outs})"
        n = self.instances
        if n > 1:
            text += f" x {n} instances"
            labels = self.devices
            if labels:
                where = labels[0] if len(set(labels)) == 1 else ", ".join(labels)
                text += f" on {where}"
        return text

    def close(self) -> None:
        """Release the model (join the pipe's threads)."""
        pipe = self.pipe
        if pipe is not None:
            pipe.close()


class PipeModel(Model):
    """A model whose items are computed by a :class:`~studioserve.pipelines.ModelPipe`.

    Used as is for a wrapper's ``create_model`` that returns a pipe, and as the base of the
    checkpoint models, which build their pipe around the framework's batched call.

    :param pipe: the pipe; this model owns it from now on (:meth:`close` closes it).
    """

    kind: ClassVar[str] = "pipe"

    def __init__(
        self,
        pipe: ModelPipe,
        *,
        source: str,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        load_seconds: float = 0.0,
    ) -> None:
        super().__init__(source=source, inputs=inputs, outputs=outputs, load_seconds=load_seconds)
        self._pipe = pipe

    @property
    def pipe(self) -> ModelPipe:
        return self._pipe

    @property
    def instances(self) -> int:
        """The number of instances of the pipe's model stage (its workers)."""
        return max(1, len(self._pipe.devices()))

    @property
    def devices(self) -> tuple[str, ...]:
        """The device label of each instance of the pipe's model stage; empty unless every
        instance has one."""
        labels = self._pipe.devices()
        placed = tuple(d for d in labels if d is not None)
        return placed if len(placed) == len(labels) else ()

    def _items(self, data: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
        """Each key's item, checked against the signature (``(item, unwrap its result)``)."""
        specs = self.inputs
        items: dict[str, tuple[Any, bool]] = {}
        bad: dict[str, PipelineError] = {}
        for key, value in data.items():
            try:
                items[key] = check_example(key, specs, value)
            except InvalidInput as e:
                bad[key] = e
        if bad:
            raise _failure(bad, len(data))
        return items

    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        pipe = self._pipe
        items = self._items(data)
        deadline = time.monotonic() + timeout
        futures: dict[str, Future[Any]] = {}
        try:
            for key, (item, _) in items.items():
                futures[key] = pipe.submit(item, key=key, deadline=deadline)
        except PipelineError as e:
            for f in futures.values():
                f.cancel()
            raise _refused(e) from e
        out: dict[str, Any] = {}
        bad: dict[str, PipelineError] = {}
        for key, fut in futures.items():
            try:
                result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                fut.cancel()
                bad[key] = _late(key, timeout)
                continue
            except Exception as e:
                bad[key] = _key_error(key, e)
                continue
            out[key] = _unwrap(result) if items[key][1] else result
        if bad:
            raise _failure(bad, len(data))
        return out

    async def predict_async(
        self, data: dict[str, Any], *, timeout: float, alone: bool = False
    ) -> dict[str, Any]:
        """:meth:`predict` on an event loop: the items are awaited on the loop (completed a
        batch at a time by the pipe's worker), and the loop's deadline watch fails what is
        left at the deadline. A lone one-key request on an idle, cheap pipe is computed right
        here (``alone``, :meth:`ModelPipe.submit_async`): its future is done on return, so it
        needs no hand-off and no watch, and awaiting it does not suspend."""
        pipe = self._pipe
        items = self._items(data)
        deadline = time.monotonic() + timeout
        futures: dict[str, asyncio.Future[Any]] = {}
        inline = alone and len(items) == 1
        try:
            for key, (item, _) in items.items():
                futures[key] = pipe.submit_async(item, key=key, deadline=deadline, inline=inline)
        except PipelineError as e:
            for f in futures.values():
                f.cancel()
            raise _refused(e) from e
        watch = token = None
        if not all(f.done() for f in futures.values()):  # computed inline: nothing to watch
            watch = deadline_watch(asyncio.get_running_loop())
            token = watch.add(deadline, functools.partial(_expire, futures, timeout))
        out: dict[str, Any] = {}
        bad: dict[str, PipelineError] = {}
        try:
            for key, fut in futures.items():
                try:
                    result = await fut
                except Exception as e:
                    bad[key] = _key_error(key, e)
                    continue
                out[key] = _unwrap(result) if items[key][1] else result
        finally:
            if watch is not None and token is not None:
                watch.discard(token)
            for f in futures.values():  # an abandoned request leaves nothing for the worker
                f.cancel()
        if bad:
            raise _failure(bad, len(data))
        return out


def _expire(futures: dict[str, asyncio.Future[Any]], timeout: float) -> None:
    """At the deadline: fail every item still waiting (the loop's timer)."""
    for key, fut in futures.items():
        if not fut.done():
            fut.set_exception(_late(key, timeout))


def _late(key: str, timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"key {key!r}: no result within the request timeout of {timeout:g}s", key=key
    )


def _key_error(key: str, e: Exception) -> PipelineError:
    """A key's failure as a PipelineError (a pipe bug is logged and kept apart)."""
    if isinstance(e, PipelineError):
        return e
    logger.exception("key %r failed unexpectedly", key)
    return PipelineError(f"key {key!r}: {type(e).__name__}: {e}", key=key)


def _refused(e: PipelineError) -> RequestFailed:
    """The request's answer when the pipe would not take one of its items."""
    if isinstance(e, Overloaded):
        return RequestFailed(
            f"the server is overloaded ({e}); retry after {e.retry_after:g}s",
            status=503,
            error_type="overloaded",
            retry_after=e.retry_after,
        )
    return RequestFailed(str(e), status=e.http_status, error_type=e.error_type)


def _failure(bad: dict[str, PipelineError], total: int) -> RequestFailed:
    """One RequestFailed for the keys that failed: the most telling status, every message."""
    statuses = {e.http_status for e in bad.values()}
    status = next((s for s in _STATUS_ORDER if s in statuses), max(statuses))
    first = next(e for e in bad.values() if e.http_status == status)
    keys = {k: str(e) for k, e in bad.items()}
    message = (
        f"{len(bad)} of {total} key(s) failed: {first}" if len(bad) > 1 or total > 1 else str(first)
    )
    return RequestFailed(message, status=status, error_type=first.error_type, keys=keys)


def _unwrap(result: Any) -> Any:
    """The single row of a one-example result (arrays, lists or dicts of arrays)."""
    if isinstance(result, dict):
        return {k: _unwrap(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return type(result)(_unwrap(v) for v in result)
    if isinstance(result, np.ndarray) and result.ndim >= 1 and result.shape[0] == 1:
        return result[0]
    return result
