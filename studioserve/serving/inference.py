"""The one request path: every inference request, whatever its transport and protocol.

:meth:`RequestHandler.handle` does, in this order and nowhere else:

1. the ready check (503 + Retry-After while loading or draining);
2. ``protocol.resolve``: the model (and version) the URL names, leased from the service's
   :class:`~studioserve.serving.repository.ModelRepository` until the request is answered
   (404 for an unknown model or version, 400 for ``POST /`` while several are served);
3. the size limit on the declared length (413 before a byte is read);
4. admission (:class:`~studioserve.serving.admission.AdmissionController`): 503 +
   Retry-After at once when the server is saturated, before the body is read; an admitted
   request holds its slot until it is answered;
5. reads the body; ``protocol.decode``: body to a request dict (400/415 for what cannot be
   decoded);
6. the leased model's ``predict``, counted by the service's
   :class:`~studioserve.serving.activity.Activity` (the inactivity timer);
7. ``protocol.encode``: the result to the protocol's body;
8. one ``on_request`` for the observers, with the status, the time taken and the model.

Errors become replies in one place per protocol (``protocol.error``: its status table and its
error body). The transports (:mod:`studioserve.http.pickle_routes`'s WSGI fast path and Flask
route, :mod:`studioserve.http.oip_routes`) only turn their request into an
:class:`InferenceRequest` and a :class:`Reply` into their response.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from ..errors import Saturated, StudioServeError, TooLarge
from .admission import AdmissionController
from .observer import Observers
from .repository import ModelRepository, ServedVersion
from .service import ModelService

logger = logging.getLogger(__name__)

__all__ = ["InferenceRequest", "Protocol", "Reply", "RequestHandler"]

_perf = time.perf_counter


def _no_header(name: str) -> str | None:
    return None


@dataclass(slots=True)
class InferenceRequest:
    """One inference request, as the transport hands it over.

    :param length: the declared body length (Content-Length), None when unknown (chunked).
    :param read: reads the whole body; raises :class:`~studioserve.errors.TooLarge` when it
        is over the limit.
    :param header: a request header by its HTTP name (``"Content-Type"``), or None.
    :param model: the model the URL names, if any (``POST /`` names none).
    :param version: the model version the URL names, if any.
    :param aread: reads the whole body on an event loop (an asynchronous transport), used by
        :meth:`RequestHandler.handle_async` instead of ``read``.
    :param target: the version the request runs on, set by the request path once resolved.
    """

    length: int | None
    read: Callable[[], bytes]
    header: Callable[[str], str | None] = _no_header
    model: str | None = None
    version: str | None = None
    aread: Callable[[], Awaitable[bytes]] | None = None
    target: ServedVersion | None = None


@dataclass(slots=True)
class Reply:
    """What to answer: a status, headers and the body."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class Protocol(abc.ABC):
    """One wire protocol: how a request body becomes a request dict and back, and its errors.

    Implementations: :class:`~studioserve.serving.protocols.PickleProtocol` (``POST /``) and
    :class:`~studioserve.serving.protocols.OipProtocol` (the Open Inference Protocol).
    """

    #: the route label observers see (metrics: ``route``)
    route: str = ""

    def resolve(self, request: InferenceRequest, repository: ModelRepository) -> ServedVersion:
        """The version the request runs on, leased (the request path releases it).

        :raises ModelNotFound: for a model or version not served.
        """
        return repository.lease(request.model, request.version)

    @abc.abstractmethod
    def decode(self, body: bytes, request: InferenceRequest) -> tuple[dict[str, Any], Any]:
        """``(request dict, context for encode)``; the context may carry ``timeout``."""

    @abc.abstractmethod
    def encode(
        self, result: dict[str, Any], context: Any, request: InferenceRequest
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """``(body, headers)`` of the answer to a request that succeeded."""

    @abc.abstractmethod
    def error(self, e: StudioServeError) -> Reply:
        """The reply for an error: the protocol's status for it and its error body."""


class _Predict:
    """What the request path yields to its driver when it needs the model: run it."""

    __slots__ = ("alone", "data", "model", "timeout")

    def __init__(self, model: Any, data: dict[str, Any], timeout: float, alone: bool) -> None:
        self.model = model
        self.data = data
        self.timeout = timeout
        #: no other request is in flight for this model (predict_async's hint)
        self.alone = alone


#: what the request path yields to its driver when it needs the body
_READ = object()
#: what it yields for the body of a request it refused: drop it (the WSGI driver reads it;
#: on the loop the transport drops it after the reply, streamed, never held whole)
_DROP = object()

#: one request's path: yields ``_READ`` (sent the body), ``_DROP`` and ``_Predict`` (sent the
#: result), returns the reply; an error of either is thrown into it
_Steps = Generator[object, Any, Reply]


class RequestHandler:
    """The request path for one protocol over one :class:`ModelService`.

    The path is written once, as a generator (:meth:`_steps`) that yields where it waits:
    for the body and for the model. :meth:`handle` drives it on the calling thread (WSGI);
    :meth:`handle_async` drives it on an event loop, awaiting the body and the model, with no
    thread of its own. Both run the same checks in the same order.

    :param service: the model service.
    :param protocol: the wire protocol.
    :param max_body: the largest body in bytes (413 above).
    :param observers: told about every request answered.
    :param admission: refuses requests while the server is saturated (None: admit all);
        share one between the handlers of a server.
    """

    def __init__(
        self,
        service: ModelService,
        protocol: Protocol,
        *,
        max_body: int,
        observers: Observers,
        admission: AdmissionController | None = None,
    ) -> None:
        self.service = service
        self.protocol = protocol
        self.max_body = max_body
        self.observers = observers
        self.admission = admission

    def handle(self, request: InferenceRequest) -> Reply:
        """Answer one inference request on this thread (never raises)."""
        start = _perf()
        steps = self._steps(request)
        try:
            need = steps.send(None)
            while True:
                try:
                    if need is _READ or need is _DROP:
                        value = request.read()
                    else:
                        assert isinstance(need, _Predict)
                        value = need.model.predict(need.data, timeout=need.timeout)
                except Exception as e:
                    need = steps.throw(e)
                else:
                    need = steps.send(value)
        except StopIteration as stop:
            return self._answered(request, stop.value, start)
        except Exception as e:  # a bug in a codec or the model layer: keep serving
            return self._answered(request, self._internal(e), start)

    async def handle_async(self, request: InferenceRequest) -> Reply:
        """Answer one inference request on the running event loop (never raises).

        The body comes from ``request.aread`` when it has one (else ``read``), the result
        from the model's ``predict_async``.
        """
        start = _perf()
        steps = self._steps(request)
        try:
            need = steps.send(None)
            while True:
                try:
                    if need is _READ or need is _DROP:
                        aread = request.aread
                        if aread is None:
                            value = request.read()
                        elif need is _READ:
                            value = await aread()
                        else:  # the transport drops what it did not read
                            value = b""
                    else:
                        assert isinstance(need, _Predict)
                        value = await need.model.predict_async(
                            need.data, timeout=need.timeout, alone=need.alone
                        )
                except Exception as e:
                    need = steps.throw(e)
                else:
                    need = steps.send(value)
        except StopIteration as stop:
            return self._answered(request, stop.value, start)
        except Exception as e:  # a bug in a codec or the model layer: keep serving
            return self._answered(request, self._internal(e), start)
        finally:
            steps.close()  # a cancelled request (client gone) releases its lease and slot

    def _answered(self, request: InferenceRequest, reply: Reply, start: float) -> Reply:
        """Tell the observers about the reply (one record) and return it."""
        self.observers.on_request(
            self.protocol.route, reply.status, _perf() - start, request.target
        )
        return reply

    def _internal(self, e: Exception) -> Reply:
        logger.error("unexpected error in the %s request path", self.protocol.route, exc_info=e)
        return self.protocol.error(StudioServeError(f"internal server error: {type(e).__name__}"))

    def _steps(self, request: InferenceRequest) -> _Steps:
        protocol = self.protocol
        service = self.service
        try:
            if not service.ready:
                raise service.not_ready()
            target = protocol.resolve(request, service.repository)
        except StudioServeError as e:
            return protocol.error(e)
        request.target = target
        try:
            return (yield from self._admitted(request, target))
        finally:
            target.release()

    def _admitted(self, request: InferenceRequest, target: ServedVersion) -> _Steps:
        protocol = self.protocol
        admission = self.admission
        pipe = target.model.pipe
        length = request.length
        nbytes = length or 0
        try:
            if length is not None and length > self.max_body:
                raise TooLarge(self.max_body, length)
            if admission is not None:
                admission.admit(pipe, nbytes)
        except Saturated as e:
            # drop the body of a refused request, so its keep-alive connection stays usable:
            # a server that answers before reading the body must close the connection, and a
            # client already sending its next request on it gets a connection error instead
            # of the 503; reading a body (at most --max-body, checked above) costs far less
            # than decoding it
            try:
                yield _DROP
            except Exception:  # TooLarge, a client gone: the reply is what matters
                pass
            return protocol.error(e)
        except StudioServeError as e:
            return protocol.error(e)
        if admission is None:
            return (yield from self._serve(request, target))
        try:
            return (yield from self._serve(request, target))
        finally:
            admission.release(pipe, nbytes)

    def _serve(self, request: InferenceRequest, target: ServedVersion) -> _Steps:
        protocol = self.protocol
        service = self.service
        try:
            data, context = protocol.decode((yield _READ), request)
        except StudioServeError as e:
            return protocol.error(e)
        activity = service.activity
        activity.begin()
        try:
            timeout = getattr(context, "timeout", None)
            admission = self.admission
            result = yield _Predict(
                target.model,
                data,
                service.request_timeout if timeout is None else timeout,
                admission is not None and admission.alone(target.model.pipe),
            )
            payload, headers = protocol.encode(result, context, request)
        except StudioServeError as e:
            return protocol.error(e)
        finally:
            activity.end()
        return Reply(200, headers, payload)
