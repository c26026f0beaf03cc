"""The ingress deployment: the local server's HTTP contract behind Ray Serve's HTTP proxy.

:class:`Ingress` is the user class of the application's ingress deployment (:mod:`.app` wraps
it with ``serve.ingress`` and ``serve.deployment``). Its replica builds exactly what a local
server builds (:func:`~studioserve.http.app.create_app`: auth, probes, ``/metrics``, the status
page, the pickle and OIP routes, the request handlers and their admission) over a
:class:`~studioserve.serving.repository.ModelRepository` whose models are
:class:`~.remote.RemoteModel` objects, one per version each model deployment serves, and
answers through :class:`~studioserve.http.asgi.AsgiApp`: Ray's proxy hands it each request
as ASGI, the inference routes run as coroutines through the one request path
(:class:`~studioserve.serving.inference.RequestHandler`), the rest in Flask.

The driver (:mod:`.backend`) calls two methods through the deployment's handle: :meth:`tick`
(every second: the replica states Ray reports, which make ``/readyz`` 200 only while every model
has a running replica; it answers the activity counters the inactivity timer reads) and
:meth:`drain` (SIGTERM, Ctrl-C, ``--killafter``: refuse new inference requests, finish the
ones in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from ..config import ServeConfig, resolve_store_url
from ..http.app import create_app, drain_of
from ..http.asgi import AsgiApp
from ..http.state import ServerInfo, state_of
from ..serving.admission import default_max_in_flight
from ..serving.repository import ModelRepository
from ..serving.service import ModelService
from .messages import VersionFacts
from .remote import RemoteModel, ReplicaBoard

logger = logging.getLogger(__name__)

__all__ = ["Ingress"]


class Ingress:
    """The application's HTTP front (see the module docstring).

    :param config: the server's configuration.
    :param token: the bearer token, or None when auth is off.
    :param models: each model's deployment handle, by model name.
    """

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self, config: ServeConfig, token: str | None, models: Mapping[str, Any]
    ) -> None:
        self.config = config
        self.board = ReplicaBoard()
        repository = ModelRepository()
        for name, handle in models.items():
            facts: list[VersionFacts] = await handle.facts.remote()
            repository.publish(
                name,
                {f.version: RemoteModel(f, handle, self.board) for f in facts},
                available=facts[0].available if facts else (),
                settings=facts[0].settings if facts else {},
            )
        self.names = list(models)
        # each model's facts came from a running replica
        self.board.set_states({name: {"RUNNING": 1} for name in self.names})
        self.service = ModelService(repository, request_timeout=config.request_timeout)
        names = repository.names()
        threads = config.threads
        self.flask = create_app(
            self.service,
            token=token,
            max_body=config.max_body,
            info=ServerInfo(
                experiment=", ".join(names),
                store=resolve_store_url(config.store),
                max_batch_size=config.max_batch_size,
                max_delay_ms=config.max_delay_ms,
                killafter_seconds=config.killafter,
                auth=token is not None,
            ),
            max_queue_time=None if config.max_queue_ms is None else config.max_queue_ms / 1000.0,
            max_keys=config.max_keys,
        )
        state = state_of(self.flask)
        state.shutdown_at = self.shutdown_at
        # no thread is held per request here either: bound the bytes of the bodies in flight
        state.admission.threads_per_request = False
        state.admission.max_body_bytes = default_max_in_flight(threads) * config.max_body
        self.asgi = AsgiApp(self.flask, state, drain_of(self.flask), threads=threads)
        self.service.ready = True
        logger.info("ingress serves %s", ", ".join(names))

    def __serve_build_asgi_app__(self) -> AsgiApp:  # Ray Serve's late-bound ingress hook
        return self.asgi

    def shutdown_at(self) -> float | None:
        """When the inactivity timer will fire (``time.monotonic()``), for the status page."""
        killafter = self.config.killafter
        if killafter <= 0:
            return None
        idle = self.service.activity.idle_seconds()
        return time.monotonic() + max(0.0, killafter - idle)

    async def tick(self, states: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
        """The driver's second: Ray's replica states in, the activity counters out."""
        self.board.set_states(states)
        service = self.service
        if not service.draining:
            service.ready = all(self.board.running(name) > 0 for name in self.names)
        state = state_of(self.flask)
        state.telemetry.flush(wait=False)
        activity = service.activity
        return {
            "accepted": float(activity.accepted),
            "in_flight": float(activity.in_flight),
            "idle_seconds": activity.idle_seconds(),
        }

    async def drain(self, timeout: float) -> int:
        """Refuse new inference requests (503), wait for those in flight; how many are left."""
        service = self.service
        service.draining = True
        service.ready = False
        drain_of(self.flask).start()
        deadline = time.monotonic() + timeout
        while service.activity.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return service.activity.in_flight

    async def counts(self) -> dict[str, Any]:
        """Per model, the replica report the status page shows."""
        return {name: self.board.report(name) for name in self.names}

    def __del__(self) -> None:
        asgi = getattr(self, "asgi", None)
        if asgi is not None:
            asgi.close()
