"""What every route needs, in one object: :class:`AppState` (and the typed :class:`ServerInfo`).

The app factory (:func:`studioserve.http.app.create_app`) builds one AppState per app and keeps
it in ``app.extensions["studioserve"]``; routes reach it with :func:`current_state`.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app

from ..config import DEFAULT_MAX_KEYS
from ..serving.admission import AdmissionController, default_max_queue_time
from ..serving.inference import RequestHandler
from ..serving.protocols import OipProtocol, PickleProtocol
from ..serving.service import ModelService
from ..telemetry import Telemetry
from ..wire import DecodeLimits

__all__ = ["AppState", "ServerInfo", "current_state", "state_of"]

_EXTENSION = "studioserve"


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """Facts about the server shown on the status page and used in OIP metadata.

    :param experiment: the served experiment key, or the served keys joined with ", " when
        there are several (each model's name in URLs is its own key).
    :param store: the store URL it came from.
    :param max_batch_size: the batch bound of checkpoint models.
    :param max_delay_ms: how long a batch waits for more items.
    :param killafter_seconds: the inactivity timeout (0: never).
    :param auth: whether bearer-token auth is on.
    """

    experiment: str = "model"
    store: str | None = None
    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    killafter_seconds: float | None = None
    auth: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"experiment": self.experiment}
        if self.store is not None:
            out["store"] = self.store
        if self.max_batch_size is not None or self.max_delay_ms is not None:
            out["batching"] = {
                "max_batch_size": self.max_batch_size,
                "max_delay_ms": self.max_delay_ms,
            }
        if self.killafter_seconds is not None:
            out["killafter_seconds"] = self.killafter_seconds
        out["auth"] = self.auth
        return out


class AppState:
    """The service, auth, facts, telemetry and the two request paths of one app.

    :param service: the model service.
    :param token: the bearer token, or None when auth is off.
    :param info: facts for the status page and OIP.
    :param max_body: the largest request body in bytes.
    :param max_queue_time: seconds of queued work a new inference request may find ahead of
        it before it is refused with 503 (None: a quarter of the request timeout, at most
        1 s; see :mod:`studioserve.serving.admission`).
    :param max_in_flight: the most inference requests served at once, the rest refused with
        503 (None: no cap; ``studio serve`` passes
        :func:`~studioserve.serving.admission.default_max_in_flight` of its ``--threads``).
    :param max_keys: the most keys one request body may carry (``--max-keys``).
    """

    def __init__(
        self,
        service: ModelService,
        token: str | None,
        info: ServerInfo,
        *,
        max_body: int,
        max_queue_time: float | None = None,
        max_in_flight: int | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.service = service
        self.token = token
        self.info = info
        self.max_body = max_body
        #: what every decoder may build for one request
        limits = DecodeLimits(max_body=max_body, max_keys=max_keys)
        #: admission control, shared by both request paths
        self.admission = AdmissionController(
            None,
            max_queue_time=(
                default_max_queue_time(service.request_timeout)
                if max_queue_time is None
                else max_queue_time
            ),
            max_in_flight=max_in_flight,
        )
        self.started = time.time()
        #: when the inactivity timer fires (``time.monotonic()``); set by the runtime
        self.shutdown_at: Callable[[], float | None] = lambda: None
        #: where the same app's gRPC server listens (``host:port``); set by the runtime
        self.grpc_address: str | None = None
        self.telemetry = Telemetry(
            service,
            experiment=info.experiment,
            started=self.started,
            shutdown_at=lambda: self.shutdown_at(),
        )
        observers = self.telemetry.observers
        admission = self.admission
        self.pickle = RequestHandler(
            service,
            PickleProtocol(limits),
            max_body=max_body,
            observers=observers,
            admission=admission,
        )
        self.oip_protocol = OipProtocol(max_body=max_body, limits=limits)
        self.oip = RequestHandler(
            service, self.oip_protocol, max_body=max_body, observers=observers, admission=admission
        )

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (always, with auth off)."""
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())


def state_of(app: Flask) -> AppState:
    """The AppState of ``app``."""
    state: AppState = app.extensions[_EXTENSION]
    return state


def current_state() -> AppState:
    """The AppState of the app handling the current request."""
    return state_of(current_app)


def attach_state(app: Flask, state: AppState) -> None:
    app.extensions[_EXTENSION] = state
