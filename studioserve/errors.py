"""Every error studioserve raises on purpose.

The tree::

    StudioServeError                 base; ``str(e)`` says what happened and what to do
    ├── ConfigError                  bad option or setting (port in use, bad store URL, ...)
    ├── StoreError                   experiment store problems
    │   ├── InvalidKey               a key outside ``[A-Za-z0-9._-]{1,128}``
    │   ├── ExperimentNotFound       no such key (names the store and the closest keys)
    │   ├── ExperimentExists         ``add`` onto an existing key without ``--force``
    │   ├── UnsafePath               an object name that would escape the cache folder
    │   └── ChecksumMismatch         a download that does not match the store's size/checksum
    ├── ModelLoadError               a checkpoint or wrapper that cannot be loaded
    ├── ModelNotFound                a request for a model or version not served: HTTP 404
    ├── ModelNotChosen               ``POST /`` while several models are served: HTTP 400
    ├── NotReady                     the model is not loaded and warm yet: HTTP 503
    ├── PipelineError                raised by ModelPipe for one item (a future's exception)
    │   ├── ItemFailed               a stage raised for this item (names the item and stage)
    │   │   └── InvalidInput         the item does not fit the model (shape, dtype): HTTP 422
    │   ├── BatchSizeMismatch        a batched function returned the wrong number of rows
    │   ├── ItemFiltered             a stage's ``filterf`` dropped the item
    │   ├── Overloaded               the input queue is full: HTTP 503 + Retry-After
    │   │   └── Saturated            refused at admission (server saturated): 503 + Retry-After
    │   ├── DeadlineExceeded         the item's deadline passed before it ran: HTTP 504
    │   └── PipeClosed               ``submit`` after ``close()``
    ├── RequestFailed                one request's failure, with per-key messages and a status
    ├── WireError                    a request body that cannot be decoded: HTTP 400
    │   ├── TooLarge                 a body over --max-body (raw or decompressed): HTTP 413
    │   │   └── DecodedTooLarge      a body that would build more than its decode budget: HTTP 413
    │   │       └── PickleTooLarge   a pickle over its budget (also an UnsafePickle): HTTP 413
    │   ├── TooManyKeys              a body with more dict keys than --max-keys: HTTP 413
    │   ├── UnsafePickle             a pickle that names a forbidden global
    │   ├── UnsupportedMediaType     a Content-Type the server does not decode: HTTP 415
    │   ├── NotAcceptable            the Accept'ed format cannot carry this response: HTTP 406
    │   └── UnencodableResponse      the model returned what no wire format carries: HTTP 500
    ├── ClientError                  raised by :class:`studioserve.Client` for an error reply
    └── CloudError                   launching, deploying to or tearing down an instance
        ├── HostKeyMismatch          the instance's SSH host key is not the one it reported
        └── DeploymentFailed         a launch failed or was interrupted; all it made was deleted

Each class carries ``http_status`` so the server maps errors to statuses in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StudioServeError(Exception):
    """Base of every error studioserve raises on purpose."""

    http_status: int = 500
    #: a short machine-readable name used in JSON error bodies
    error_type: str = "internal"


class ConfigError(StudioServeError):
    """A bad option or setting; the message names it and the fix."""

    http_status = 400
    error_type = "config"


class StoreError(StudioServeError):
    """A problem with an experiment store."""

    error_type = "store"


class InvalidKey(StoreError):
    """An experiment key outside ``[A-Za-z0-9._-]{1,128}``."""

    http_status = 400
    error_type = "invalid_key"


class ExperimentNotFound(StoreError):
    """No experiment under that key in the store."""

    http_status = 404
    error_type = "not_found"


class ExperimentExists(StoreError):
    """An experiment already exists under that key."""

    http_status = 409
    error_type = "exists"


class UnsafePath(StoreError):
    """An object name or path that would escape its folder."""

    http_status = 400
    error_type = "unsafe_path"


class ChecksumMismatch(StoreError):
    """A downloaded file does not match the size or checksum the store reported."""


class ModelLoadError(StudioServeError):
    """A checkpoint or wrapper that cannot be loaded; the message names the file."""

    error_type = "model_load"


class ModelNotFound(StudioServeError):
    """A request names a model or version this server does not serve; the message lists
    what it does serve."""

    http_status = 404
    error_type = "not_found"


class ModelNotChosen(StudioServeError):
    """A request to ``POST /`` while several models are served; the message lists them."""

    http_status = 400
    error_type = "model_required"


class NotReady(StudioServeError):
    """The model is not loaded and warm yet (or the server is draining); retry shortly."""

    http_status = 503
    error_type = "not_ready"
    retry_after = 1.0

    def __init__(self, message: str = "the model is not loaded yet") -> None:
        super().__init__(message)


class PipelineError(StudioServeError):
    """An error for one item of a :class:`~studioserve.pipelines.ModelPipe`.

    :param key: the item's key (its position for a list, its key for a dict), if known.
    :param stage: the name of the stage that failed, if any.
    """

    error_type = "pipeline"

    def __init__(self, message: str, *, key: Any = None, stage: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.stage = stage


class ItemFailed(PipelineError):
    """A stage raised while computing this item."""

    http_status = 500
    error_type = "model_error"


class InvalidInput(ItemFailed):
    """The item does not fit the model: wrong shape, dtype or missing input."""

    http_status = 422
    error_type = "invalid_input"


class BatchSizeMismatch(PipelineError):
    """A batched function returned a different number of rows than it was given."""

    http_status = 500
    error_type = "batch_size_mismatch"


class ItemFiltered(PipelineError):
    """A stage's ``filterf`` rejected the item, so it has no result."""

    http_status = 422
    error_type = "filtered"


class Overloaded(PipelineError):
    """The pipe's input queue is full; retry later."""

    http_status = 503
    error_type = "overloaded"

    def __init__(
        self,
        message: str,
        *,
        key: Any = None,
        stage: str | None = None,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(message, key=key, stage=stage)
        self.retry_after = retry_after


class Saturated(Overloaded):
    """The server is saturated: a request refused at admission, before its body was read.

    Raised by :class:`studioserve.serving.admission.AdmissionController` when as many
    inference requests are in flight as it admits, when the work queued ahead of a new request
    would keep it waiting longer than the bounded queue time, or when the pipe's queue is full.
    Same status and type as :class:`Overloaded` (503, ``overloaded``), so clients handle one
    error; ``retry_after`` (seconds, at least 1) comes from the measured backlog.

    :param reason: which limit refused it: ``"in_flight"``, ``"queue_time"`` or ``"queue_full"``.
    """

    def __init__(self, message: str, *, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.reason = reason


class DeadlineExceeded(PipelineError):
    """The item's deadline passed before it could be computed."""

    http_status = 504
    error_type = "deadline_exceeded"


class PipeClosed(PipelineError):
    """The pipe was closed; it accepts no more items."""

    http_status = 503
    error_type = "closed"


class RequestFailed(StudioServeError):
    """A request failed; carries the HTTP status, an error type and per-key messages.

    :param status: the HTTP status to answer with.
    :param error_type: the JSON error body's ``type``.
    :param keys: ``{key: message}`` for each key that failed.
    :param retry_after: seconds for a ``Retry-After`` header (503), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str,
        keys: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = status
        self.error_type = error_type
        self.keys = dict(keys or {})
        self.retry_after = retry_after


class WireError(StudioServeError):
    """A request or response body that cannot be decoded."""

    http_status = 400
    error_type = "bad_request"


class TooLarge(WireError):
    """A request body larger than the server's limit (``--max-body``).

    :param limit: the limit in bytes.
    :param length: the body's size, when known (its Content-Length).
    :param what: what was too large ("request body", "decompressed request", ...).
    """

    http_status = 413
    error_type = "too_large"

    def __init__(self, limit: int, length: int | None = None, what: str = "request body") -> None:
        size = f" of {length} bytes" if length is not None else ""
        super().__init__(
            f"{what}{size} is larger than the limit of {limit} bytes; send fewer examples per "
            "request or start the server with a larger --max-body"
        )
        self.limit = limit
        self.length = length


class DecodedTooLarge(TooLarge):
    """A body within ``--max-body`` that would build more than its decode budget (the memory a
    body of its size may make the decoders allocate; see :mod:`studioserve.wire.budget`).

    :param message: what would be built and the budget it exceeds (the wire layer writes it).
    :param limit: the budget in bytes.
    :param length: the body's size in bytes.
    """

    def __init__(self, message: str, *, limit: int, length: int | None = None) -> None:
        WireError.__init__(self, message)
        self.limit = limit
        self.length = length


class TooManyKeys(WireError):
    """A body whose dicts hold more keys than the server's limit (``--max-keys``).

    :param limit: the limit.
    :param count: how many keys the body has, when counted (None: more than the limit).
    :param what: what holds them ("the request", "the npz body", ...).
    """

    http_status = 413
    error_type = "too_many_keys"

    def __init__(self, limit: int, count: int | None = None, what: str = "the request") -> None:
        has = f"{count} keys" if count is not None else f"more than {limit} keys"
        super().__init__(
            f"{what} has {has}, more than the limit of {limit}; send fewer keys per request "
            "(a key may hold many examples) or start the server with a larger --max-keys"
        )
        self.limit = limit
        self.count = count


class UnsafePickle(WireError):
    """A pickle that asks for a global outside the allowed numpy/builtin set."""

    error_type = "unsafe_pickle"


class PickleTooLarge(DecodedTooLarge, UnsafePickle):
    """A pickle that would build more than its decode budget: more objects than its opcodes
    may make, or our numpy and builtin stand-ins called again and again to copy one memoized
    value. Both a :class:`DecodedTooLarge` (HTTP 413) and an :class:`UnsafePickle`."""


class UnsupportedMediaType(WireError):
    """A request ``Content-Type`` that is not pickle, JSON or npz."""

    http_status = 415
    error_type = "unsupported_media_type"


class NotAcceptable(WireError):
    """The format the client asked for cannot carry this response (JSON and bytes, npz and a
    nested dict, ...): HTTP 406. The message says which format can."""

    http_status = 406
    error_type = "not_acceptable"


class UnencodableResponse(WireError):
    """The model returned a value no wire format may carry (an object array, a custom class):
    HTTP 500. Fix the model or wrapper so it returns arrays, numbers, strings or containers."""

    http_status = 500
    error_type = "unencodable_response"


class ClientError(StudioServeError):
    """An error reply from a studioserve server, raised by :class:`studioserve.Client`.

    :param status: the HTTP status (0 when the server could not be reached).
    :param error_type: the server's error type.
    :param keys: per-key messages, when the server gave them.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        error_type: str = "client",
        keys: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = status
        self.error_type = error_type
        self.keys = dict(keys or {})


class CloudError(StudioServeError):
    """Launching, deploying to or tearing down a cloud instance failed."""

    error_type = "cloud"


class HostKeyMismatch(CloudError):
    """The instance's SSH host key is not the one its console reported: refuse to connect."""


class DeploymentFailed(CloudError):
    """A deployment failed or was interrupted; everything it created was deleted.

    :param step: the step that failed (one of :data:`studioserve.cloud.STEPS`).
    :param summary: one line per resource removed (or left behind, with the reason).
    :param interrupted: True when Ctrl-C (KeyboardInterrupt) stopped the launch.
    """

    def __init__(
        self, message: str, *, step: str, summary: Sequence[str], interrupted: bool = False
    ) -> None:
        super().__init__(message)
        self.step = step
        self.summary = list(summary)
        self.interrupted = interrupted
