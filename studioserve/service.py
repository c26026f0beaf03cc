"""One request's path through the model, without HTTP: validate, decompose, batch, reassemble.

:class:`ModelService` is shared by every HTTP route (the pickle endpoint and the Open Inference
Protocol). It turns a request dict into items, submits them to the shared
:class:`~studioserve.pipelines.ModelPipe` (so concurrent requests batch together), waits for
them under the request's deadline, and maps failures to one :class:`RequestFailed` with
per-key messages.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from .errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    PipelineError,
    RequestFailed,
    StudioServeError,
)
from .loader import LoadedModel, TensorSpec
from .pipelines.keras_stage import converts_safely

logger = logging.getLogger(__name__)

# When keys fail with different statuses, the answer takes the first of these that occurs.
_STATUS_ORDER = (400, 413, 422, 503, 504, 500)


class Activity:
    """Counts in-flight inference requests and remembers the last accepted one.

    The inactivity timer (see :mod:`studioserve.lifecycle`) reads it; only accepted inference
    requests touch it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last = time.monotonic()
        self.accepted = 0

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.accepted += 1
            self._last = time.monotonic()

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._last = time.monotonic()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def idle_seconds(self) -> float:
        """Seconds since the last accepted request began or ended; 0 while any is in flight."""
        with self._lock:
            if self._in_flight:
                return 0.0
            return time.monotonic() - self._last


def _fail(status: int, error_type: str, message: str, keys: dict[str, str]) -> RequestFailed:
    return RequestFailed(message, status=status, error_type=error_type, keys=keys)


def _check_dtype(key: str, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    want = np.dtype(spec.dtype)
    got = arr.dtype
    if got == want:
        return arr
    if not converts_safely(got, want):
        raise InvalidInput(
            f"key {key!r}: input {spec.name!r} expects {want.name} values, got {got.name}",
            key=key,
            stage="validate",
        )
    return arr.astype(want, copy=False)


def _rows(key: str, spec: TensorSpec, arr: np.ndarray) -> int | None:
    """None when ``arr`` is one example of ``spec``, else its number of examples."""
    want = spec.shape

    def fits(shape: tuple[int, ...]) -> bool:
        if len(shape) != len(want):
            return False
        return all(w is None or w == g for w, g in zip(want, shape, strict=True))

    if fits(arr.shape):
        return None
    if arr.ndim == len(want) + 1 and fits(arr.shape[1:]):
        if arr.shape[0] == 0:
            raise InvalidInput(
                f"key {key!r}: input {spec.name!r} has 0 examples (shape {arr.shape})",
                key=key,
                stage="validate",
            )
        return int(arr.shape[0])
    one = (
        "("
        + ", ".join("n" if d is None else str(d) for d in want)
        + ("," if len(want) == 1 else "")
        + ")"
    )
    many = "(n, " + ", ".join("?" if d is None else str(d) for d in want) + ")"
    raise InvalidInput(
        f"key {key!r}: input {spec.name!r} expects shape {one} for one example or {many} "
        f"for n examples, got {tuple(arr.shape)}",
        key=key,
        stage="validate",
    )


def _as_array(key: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"key {key!r}: not an array: {e}", key=key, stage="validate") from e
    if arr.dtype.kind not in "biufc":
        raise InvalidInput(
            f"key {key!r}: expected a numeric or bool array, got dtype {arr.dtype}",
            key=key,
            stage="validate",
        )
    return arr


class ModelService:
    """The model behind every route.

    :param model: what :func:`studioserve.loader.load_model` returned.
    :param request_timeout: seconds a request may wait for its results (then 504).
    """

    def __init__(self, model: LoadedModel, *, request_timeout: float = 60.0) -> None:
        self.model = model
        self.request_timeout = request_timeout
        self.activity = Activity()
        self.ready = False

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.model.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.model.outputs

    def close(self) -> None:
        self.ready = False
        self.model.close()

    # -- request decomposition -------------------------------------------------------------

    def prepare(self, key: str, value: Any) -> tuple[Any, bool]:
        """Validate one key's value against the input signature.

        :returns: ``(item, squeeze)``: the item to submit and whether it was one example
            (so its single output row is unwrapped).
        :raises InvalidInput: when it does not fit the model.
        """
        specs = self.model.inputs
        if not specs:
            return value, False
        if len(specs) == 1:
            spec = specs[0]
            arr = _check_dtype(key, spec, _as_array(key, value))
            rows = _rows(key, spec, arr)
            return (arr[np.newaxis] if rows is None else arr), rows is None
        if not isinstance(value, dict):
            names = ", ".join(s.name for s in specs)
            raise InvalidInput(
                f"key {key!r}: the model has {len(specs)} inputs ({names}); send a dict "
                "mapping each input name to its array",
                key=key,
                stage="validate",
            )
        missing = [s.name for s in specs if s.name not in value]
        if missing:
            raise InvalidInput(
                f"key {key!r}: missing input(s) {', '.join(missing)}", key=key, stage="validate"
            )
        item: dict[str, np.ndarray] = {}
        counts: set[int | None] = set()
        for spec in specs:
            arr = _check_dtype(key, spec, _as_array(key, value[spec.name]))
            counts.add(_rows(key, spec, arr))
            item[spec.name] = arr
        if len(counts) != 1:
            raise InvalidInput(
                f"key {key!r}: inputs disagree on the number of examples", key=key, stage="validate"
            )
        squeeze = counts == {None}
        if squeeze:
            item = {k: v[np.newaxis] for k, v in item.items()}
        return item, squeeze

    # -- prediction ------------------------------------------------------------------------

    def predict(self, data: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Predict every key of ``data``; the result has the same keys.

        :raises RequestFailed: with the status and per-key messages when any key fails.
        """
        kind = self.model.kind
        if kind == "identity":
            return dict(data)
        if kind == "callable":
            return self._call(data)
        return self._through_pipe(data, self.request_timeout if timeout is None else timeout)

    def _call(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self.model.func is not None
        try:
            out = self.model.func(data)
        except StudioServeError as e:
            raise _fail(e.http_status, e.error_type, str(e), {}) from e
        except Exception as e:
            logger.exception("wrapper %s raised", self.model.source)
            raise _fail(500, "model_error", f"the model raised {type(e).__name__}: {e}", {}) from e
        if not isinstance(out, dict):
            raise _fail(
                500,
                "model_error",
                f"the wrapper's model returned {type(out).__name__}; it must return a dict",
                {},
            )
        return out

    def _through_pipe(self, data: dict[str, Any], timeout: float) -> dict[str, Any]:
        pipe = self.model.pipe
        items: dict[str, tuple[Any, bool]] = {}
        bad: dict[str, PipelineError] = {}
        for key, value in data.items():
            try:
                items[key] = self.prepare(key, value)
            except InvalidInput as e:
                bad[key] = e
        if bad:
            raise self._failure(bad, len(data))
        deadline = time.monotonic() + timeout
        futures: dict[str, Future[Any]] = {}
        try:
            for key, (item, _) in items.items():
                futures[key] = pipe.submit(item, key=key, deadline=deadline)
        except Overloaded as e:
            for f in futures.values():
                f.cancel()
            raise RequestFailed(
                f"the server is overloaded ({e}); retry after {e.retry_after:g}s",
                status=503,
                error_type="overloaded",
                retry_after=e.retry_after,
            ) from e
        except PipelineError as e:
            for f in futures.values():
                f.cancel()
            raise _fail(e.http_status, e.error_type, str(e), {}) from e
        out: dict[str, Any] = {}
        for key, fut in futures.items():
            try:
                result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                fut.cancel()
                bad[key] = DeadlineExceeded(
                    f"key {key!r}: no result within the request timeout of {timeout:g}s",
                    key=key,
                )
                continue
            except PipelineError as e:
                bad[key] = e
                continue
            except Exception as e:  # a pipe bug; keep serving
                logger.exception("key %r failed unexpectedly", key)
                bad[key] = PipelineError(f"key {key!r}: {type(e).__name__}: {e}", key=key)
                continue
            out[key] = _unwrap(result) if items[key][1] else result
        if bad:
            raise self._failure(bad, len(data))
        return out

    @staticmethod
    def _failure(bad: dict[str, PipelineError], total: int) -> RequestFailed:
        statuses = {e.http_status for e in bad.values()}
        status = next((s for s in _STATUS_ORDER if s in statuses), max(statuses))
        first = next(e for e in bad.values() if e.http_status == status)
        keys = {k: str(e) for k, e in bad.items()}
        message = (
            f"{len(bad)} of {total} key(s) failed: {first}"
            if len(bad) > 1 or total > 1
            else str(first)
        )
        return _fail(status, first.error_type, message, keys)


def _unwrap(result: Any) -> Any:
    """The single row of a one-example result (arrays, lists or dicts of arrays)."""
    if isinstance(result, dict):
        return {k: _unwrap(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return type(result)(_unwrap(v) for v in result)
    if isinstance(result, np.ndarray) and result.ndim >= 1 and result.shape[0] == 1:
        return result[0]
    return result
