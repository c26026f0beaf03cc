"""The model repository: every served model, its versions, and the atomic swap of a reload.

A :class:`ModelRepository` maps a model name (the experiment key) to a :class:`ServedModel`:
the versions being served (each a :class:`ServedVersion`, one loaded
:class:`~studioserve.models.Model`), the versions the store holds, its serving settings and
its load state as Triton's repository index reports it (``READY``, ``LOADING``,
``UNAVAILABLE``).

Reads never lock: the repository's mapping and each model's versions are immutable snapshots
replaced whole (:meth:`ModelRepository.publish`), so a request sees either the old versions
or the new ones, never a mix. A request *leases* the version it runs on
(:meth:`ModelRepository.lease`, released when it is answered); a version replaced or unloaded
is *retired*: it takes no new lease, finishes the requests that hold one, and is closed (its
pipe's threads joined, the model released) once the last is released. A lease taken in the
instant between a swap and the retirement simply resolves again, on the new snapshot.

Loading is not done here: the runtime loads models from the store and calls
:meth:`ModelRepository.publish`; requests that ask to load or unload (the OIP repository
extension) go through the :class:`ModelControl` the runtime sets on the repository.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ModelNotChosen, ModelNotFound, StudioServeError
from ..models import Model

logger = logging.getLogger(__name__)

__all__ = [
    "ModelControl",
    "ModelRepository",
    "ServedModel",
    "ServedVersion",
]

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"


class ServedVersion:
    """One loaded version of a served model, counted by the requests that lease it.

    :param name: the model's name.
    :param version: the version number (1 = the oldest checkpoint).
    :param model: the loaded model; this object owns it from now on.
    """

    def __init__(self, name: str, version: int, model: Model) -> None:
        self.name = name
        self.version = version
        self.model = model
        self.loaded_at = time.time()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._retired = False
        self._closed = False
        self._closer: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<ServedVersion {self.name}@{self.version}>"

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def retired(self) -> bool:
        return self._retired

    def acquire(self) -> bool:
        """Take a lease; False once the version is retired (resolve again)."""
        with self._lock:
            if self._retired:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Give the lease back; the last one of a retired version closes it."""
        with self._lock:
            self._in_flight -= 1
            close = self._retired and self._in_flight == 0 and not self._closed
            if close:
                self._closed = True
        if close:
            self._close_soon()

    def retire(self) -> None:
        """Take no new lease; close once the leases held are released."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            close = self._in_flight == 0 and not self._closed
            if close:
                self._closed = True
        if close:
            self._close_soon()

    def _close_soon(self) -> None:
        # closing joins the pipe's threads: never in the thread that answers a request
        self._closer = threading.Thread(
            target=self._close, name=f"studioserve-unload-{self.label}", daemon=True
        )
        self._closer.start()

    def _close(self) -> None:
        model = self.model
        try:
            model.close()
            logger.info("unloaded %s", self.label)
        except Exception:
            logger.exception("closing %s failed", self.label)
        # let the model go (its weights are the memory an unload gives back), keeping its facts
        # for whoever still reads them (an observer finishing the last request's bookkeeping)
        self.model = _Released(model)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until a retired version is closed; True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            closer = self._closer
            if closer is not None:
                closer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                return not closer.is_alive()
            if not self._retired:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


class _Released(Model):
    """What a closed version keeps of its model: the facts, not the weights."""

    kind = "released"

    def __init__(self, model: Model) -> None:
        super().__init__(
            source=model.source,
            inputs=model.inputs,
            outputs=model.outputs,
            load_seconds=model.load_seconds,
        )
        self.kind = model.kind  # type: ignore[misc]

    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        raise ModelNotFound("this model version was unloaded")


@dataclass(frozen=True)
class ServedModel:
    """One model name: the versions served (a snapshot), what the store holds, its state.

    :ivar versions: version number -> the loaded version, ascending.
    :ivar available: every version the store holds (served or not), ascending.
    :ivar state: ``READY`` (at least one version serves), ``LOADING`` or ``UNAVAILABLE``.
    :ivar reason: why it is not ready, or why its last (re)load failed.
    :ivar failures: (re)loads that failed since the start.
    :ivar settings: the model's serving settings, JSON-ready (status page, repository index).
    :ivar pinned: the version ``KEY@V`` asked for, if any.
    """

    name: str
    versions: Mapping[int, ServedVersion] = field(default_factory=dict)
    available: tuple[int, ...] = ()
    state: str = READY
    reason: str = ""
    failures: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)
    pinned: int | None = None
    #: ensemble models run other models: their steps (JSON-ready), else empty
    steps: tuple[Mapping[str, Any], ...] = ()

    @property
    def latest(self) -> ServedVersion | None:
        """The newest served version (requests without a version go there)."""
        if not self.versions:
            return None
        return self.versions[max(self.versions)]

    @property
    def ready(self) -> bool:
        return bool(self.versions)


class ModelControl(Protocol):
    """What the runtime lets requests do to the repository (OIP's explicit model control)."""

    def load(self, name: str) -> None:
        """Load (or reload) model ``name`` from the store; raises a StudioServeError."""

    def unload(self, name: str) -> None:
        """Stop serving model ``name``; raises ModelNotFound when it is not served."""

    def loadable(self) -> list[str]:
        """Every model name that :meth:`load` could load (the store's keys)."""


Listener = Callable[[ServedVersion], None]


class ModelRepository:
    """Every served model by name; see the module docstring.

    :param default_name: the name :meth:`single` gives a one-model repository built from a
        bare model (``ModelService(model)``).
    """

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._retired: list[ServedVersion] = []
        #: set by the runtime: load and unload on request (None: the repository is fixed)
        self.control: ModelControl | None = None

    # -- reads (lock-free: snapshots) --------------------------------------------------------
    def names(self) -> list[str]:
        """The served model names, sorted."""
        return sorted(self._models)

    def models(self) -> list[ServedModel]:
        """Every model entry, by name."""
        snapshot = self._models
        return [snapshot[n] for n in sorted(snapshot)]

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel:
        """The entry of ``name``; :class:`ModelNotFound` naming the served models if absent."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self._served_list()}")
        return entry

    def _served_list(self) -> str:
        names = self.names()
        return ", ".join(map(repr, names)) if names else "no model"

    def default_name(self) -> str:
        """The name a request without one goes to: the only model served.

        :raises ModelNotChosen: when several models are served (the message lists them).
        :raises ModelNotFound: when none is.
        """
        snapshot = self._models
        if len(snapshot) == 1:  # the common case, without sorting per request
            return next(iter(snapshot))
        names = sorted(snapshot)
        if not names:
            raise ModelNotFound("this server serves no model at the moment")
        raise ModelNotChosen(
            f"this server serves {len(names)} models: send the request to "
            f"/models/<key> (or /v2/models/<key>/infer), one of {', '.join(map(repr, names))}"
        )

    def resolve(self, name: str | None, version: str | int | None = None) -> ServedVersion:
        """The version a request for ``name`` (and ``version``) runs on, without a lease."""
        entry = self.get(self.default_name() if name is None else name)
        if version is None or version == "":
            latest = entry.latest
            if latest is None:
                raise ModelNotFound(
                    f"model {entry.name!r} has no version ready"
                    + (f": {entry.reason}" if entry.reason else "")
                )
            return latest
        try:
            number = int(version)
        except (TypeError, ValueError):
            number = -1
        served = entry.versions.get(number)
        if served is None:
            have = ", ".join(str(v) for v in entry.versions) or "none"
            raise ModelNotFound(
                f"unknown version {version!r} of model {entry.name!r}; served versions: {have}"
            )
        return served

    def lease(self, name: str | None, version: str | int | None = None) -> ServedVersion:
        """:meth:`resolve` and take a lease on the version (``release()`` it when answered).

        :raises ModelNotFound: unknown model or version (the message lists what exists).
        :raises ModelNotChosen: no name given while several models are served.
        """
        for _ in range(100):
            served = self.resolve(name, version)
            if served.acquire():
                return served
            # retired between the read and the lease: the new snapshot is already published
        raise ModelNotFound(f"model {name!r} is being unloaded")  # pragma: no cover

    # -- changes -----------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every version published from now on (and those served now)."""
        with self._lock:
            self._listeners.append(listener)
            current = [v for m in self._models.values() for v in m.versions.values()]
        for served in current:
            listener(served)

    def publish(
        self,
        name: str,
        versions: Mapping[int, Model | ServedVersion],
        *,
        available: Iterable[int] | None = None,
        settings: Mapping[str, Any] | None = None,
        pinned: int | None = None,
        steps: tuple[Mapping[str, Any], ...] = (),
    ) -> ServedModel:
        """Serve exactly ``versions`` of ``name`` from now on, atomically.

        Entries that are :class:`ServedVersion` objects already served keep serving (their
        leases untouched); every served version not in ``versions`` is retired. Listeners
        hear about each new version before requests can reach it.
        """
        fresh: dict[int, ServedVersion] = {}
        for number, item in sorted(versions.items()):
            fresh[number] = (
                item if isinstance(item, ServedVersion) else ServedVersion(name, number, item)
            )
        with self._lock:
            old = self._models.get(name)
            listeners = list(self._listeners)
        keep = {id(v) for v in fresh.values()}
        for served in fresh.values():
            if old is None or id(served) not in {id(v) for v in old.versions.values()}:
                for listener in listeners:
                    try:
                        listener(served)
                    except Exception:
                        logger.exception("repository listener %r failed", listener)
        entry = ServedModel(
            name,
            versions=dict(fresh),
            available=tuple(sorted(available if available is not None else fresh)),
            state=READY if fresh else UNAVAILABLE,
            reason="" if fresh else "no version loaded",
            failures=old.failures if old is not None else 0,
            settings=dict(settings if settings is not None else (old.settings if old else {})),
            pinned=pinned if pinned is not None else (old.pinned if old else None),
            steps=steps or (old.steps if old else ()),
        )
        with self._lock:
            models = dict(self._models)
            models[name] = entry
            self._models = models  # the atomic switch
        if old is not None:
            self._retire(v for v in old.versions.values() if id(v) not in keep)
        return entry

    def update(self, name: str, **changes: Any) -> ServedModel:
        """Change an entry's facts (``state``, ``reason``, ``failures``, ``available``, ...)."""
        with self._lock:
            old = self._models.get(name) or ServedModel(name, state=UNAVAILABLE)
            fields = {f: getattr(old, f) for f in old.__dataclass_fields__}
            fields.update(changes)
            entry = ServedModel(**fields)
            models = dict(self._models)
            models[name] = entry
            self._models = models
        return entry

    def failed(self, name: str, reason: str) -> ServedModel:
        """Record a (re)load of ``name`` that failed: counted, shown; what served keeps serving."""
        with self._lock:
            old = self._models.get(name)
        failures = (old.failures if old else 0) + 1
        if old is not None and old.versions:
            return self.update(name, reason=reason, failures=failures)
        return self.update(name, state=UNAVAILABLE, reason=reason, failures=failures)

    def remove(self, name: str) -> None:
        """Stop serving ``name``: it disappears at once; its versions finish and close."""
        with self._lock:
            old = self._models.get(name)
            if old is None:
                raise ModelNotFound(
                    f"unknown model {name!r}; this server serves {self._served_list()}"
                )
            models = dict(self._models)
            del models[name]
            self._models = models
        self._retire(old.versions.values())

    def _retire(self, versions: Iterable[ServedVersion]) -> None:
        self.reap()
        for served in versions:
            with self._lock:
                self._retired.append(served)
            served.retire()

    def close(self, timeout: float = 30.0) -> None:
        """Retire every model and wait until each version is closed."""
        with self._lock:
            models, self._models = self._models, {}
        for entry in models.values():
            self._retire(entry.versions.values())
        deadline = time.monotonic() + timeout
        with self._lock:
            retired, self._retired = self._retired, []
        for served in retired:
            if not served.wait_closed(max(0.0, deadline - time.monotonic())):
                logger.warning("%s still busy after %gs; left to close", served.label, timeout)

    def reap(self) -> None:
        """Forget retired versions that have closed (called now and then)."""
        with self._lock:
            self._retired = [v for v in self._retired if not _closed(v)]

    # -- control (OIP repository extension) ----------------------------------------------
    def request_load(self, name: str) -> None:
        if self.control is None:
            raise StudioServeError(
                "this server's model repository is fixed (no explicit model control)"
            )
        self.control.load(name)

    def request_unload(self, name: str) -> None:
        if self.control is None:
            self.get(name)
            raise StudioServeError(
                "this server's model repository is fixed (no explicit model control)"
            )
        self.control.unload(name)

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model (served or loadable) with its state."""
        out: list[dict[str, Any]] = []
        served = self._models
        for entry in (served[n] for n in sorted(served)):
            if entry.versions:
                for number in sorted(entry.versions):
                    out.append({"name": entry.name, "version": str(number), "state": READY})
            else:
                out.append({"name": entry.name, "state": entry.state, "reason": entry.reason})
            if entry.reason and entry.versions:
                out[-1]["reason"] = entry.reason
        if self.control is not None:
            try:
                loadable = self.control.loadable()
            except Exception:
                logger.exception("listing the loadable models failed")
                loadable = []
            for name in sorted(set(loadable) - set(served)):
                out.append({"name": name, "state": UNAVAILABLE, "reason": "unloaded"})
        return out


def _closed(served: ServedVersion) -> bool:
    closer = served._closer
    return closer is not None and not closer.is_alive()
