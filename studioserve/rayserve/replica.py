"""One model's Ray Serve replica: the model loaded from the store, batching in its own pipe.

:class:`ModelReplica` is the user class of a model deployment (:mod:`.app` wraps it with
``serve.deployment``). Each replica, on whichever node Ray places it:

- opens the store and loads the model exactly as a local server does
  (:class:`~studioserve.runtime.catalog.ModelCatalog`: the verified cache of that node for
  S3/GCS, serving.toml, the version policy, ``KEY@V``, the trust rules), with one instance of
  the model stage (Ray's replicas are the copies);
- answers :meth:`ModelReplica.predict` for the ingress: the version leased, the request run
  through :meth:`Model.predict_async <studioserve.models.base.Model.predict_async>` on the
  replica's event loop, so calls that arrive together meet in one batch of the pipe (a lone
  call on an idle, cheap pipe is computed at once, as locally);
- never raises for a request's own failure: it answers a :class:`~.messages.Failure` (status,
  type, message), which the ingress raises again as the same error.

Ray calls :meth:`ModelReplica.check_health` periodically: a replica whose pipe has stopped
is reported unhealthy and replaced.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import ServeConfig, resolve_store_url
from ..errors import StudioServeError
from ..runtime.catalog import ModelCatalog
from ..serving.repository import ModelRepository
from ..store import open_store
from .messages import Answer, Failure, ReplicaCounts, VersionFacts

logger = logging.getLogger(__name__)

__all__ = ["ModelReplica"]

#: seconds between the counters an answer carries (the status page's per-replica figures)
COUNTS_EVERY = 0.25


def replica_config(config: ServeConfig, key: str) -> ServeConfig:
    """The server's config narrowed to one model with one instance (Ray runs the copies)."""
    spec = next((s for s in config.keys if s.partition("@")[0] == key), key)
    explicit = None if config.explicit is None else config.explicit | {"instances"}
    return config.replace(
        keys=(spec,),
        key=key,
        all_models=False,
        watch=None,
        instances=1,
        explicit=explicit,
        backend="local",
        replicas=None,
        autoscale=None,
        ray_address=None,
    )


class ModelReplica:
    """A model deployment's replica (see the module docstring).

    :param config: the server's configuration (what ``studio serve`` was given).
    :param key: the model this deployment serves.
    """

    def __init__(self, config: ServeConfig, key: str) -> None:
        self.key = key
        cfg = replica_config(config, key)
        self.store = open_store(resolve_store_url(cfg.store))
        self.repository = ModelRepository()
        self.catalog = ModelCatalog(cfg, self.store, self.repository)
        try:
            self.catalog.load_all()
            for served in self.repository.get(key).versions.values():
                served.model.start()
        except BaseException:
            self.close()
            raise
        self.replica = _replica_id()
        self._in_flight = 0
        self._counted_at = 0.0
        logger.info("replica %s serves %s", self.replica, self.describe())

    def describe(self) -> str:
        entry = self.repository.get(self.key)
        return "; ".join(v.model.describe() for v in entry.versions.values())

    def facts(self) -> list[VersionFacts]:
        """Every version this replica serves, as the ingress publishes it."""
        entry = self.repository.get(self.key)
        out = []
        for number, served in sorted(entry.versions.items()):
            model = served.model
            pipe = model.pipe
            out.append(
                VersionFacts(
                    name=self.key,
                    version=number,
                    kind=model.kind,
                    platform=model.platform,
                    source=model.source,
                    inputs=tuple(model.inputs),
                    outputs=tuple(model.outputs),
                    load_seconds=model.load_seconds,
                    batches=model.batches,
                    max_batch_size=pipe.max_batch_size if pipe is not None else 1,
                    available=tuple(entry.available),
                    settings=dict(entry.settings),
                )
            )
        return out

    async def predict(self, version: int | None, data: dict[str, Any], timeout: float) -> Answer:
        """Answer one request's data with ``version`` (None: the newest served)."""
        self._in_flight += 1
        try:
            target = self.repository.lease(self.key, version)
        except StudioServeError as e:
            self._in_flight -= 1
            return Answer(self.replica, failure=Failure.of(e), counts=self._counts())
        try:
            outputs = await target.model.predict_async(
                data, timeout=timeout, alone=self._in_flight == 1
            )
        except StudioServeError as e:
            return Answer(self.replica, failure=Failure.of(e), counts=self._counts())
        finally:
            target.release()
            self._in_flight -= 1
        return Answer(self.replica, outputs=outputs, counts=self._counts())

    def _counts(self) -> ReplicaCounts | None:
        now = time.monotonic()
        if now - self._counted_at < COUNTS_EVERY:
            return None
        self._counted_at = now
        batches = rows = 0
        for served in self.repository.get(self.key).versions.values():
            pipe, stage = served.model.pipe, served.model.model_stage
            if pipe is None or stage is None:
                continue
            stats = pipe.stats().stages.get(stage)
            if stats is not None:
                batches += stats.batches
                rows += stats.items
        return ReplicaCounts(batches=batches, rows=rows)

    def counts(self) -> tuple[str, ReplicaCounts | None]:
        """This replica's id and counters now (tests and ``studio ray status``)."""
        self._counted_at = 0.0
        return self.replica, self._counts()

    def check_health(self) -> None:
        """Raise when this replica cannot serve (Ray then replaces it)."""
        entry = self.repository.get(self.key)
        for served in entry.versions.values():
            pipe = served.model.pipe
            if pipe is not None and pipe.closed:
                raise RuntimeError(f"the pipe of {self.key!r} version {served.version} closed")

    def close(self) -> None:
        catalog = getattr(self, "catalog", None)
        if catalog is not None:
            catalog.close()
        self.repository.close()
        self.store.close()

    def __del__(self) -> None:  # Ray calls it when the replica is stopped
        try:
            self.close()
        except Exception:
            logger.exception("closing the replica of %r failed", self.key)


def _replica_id() -> str:
    """This replica's Ray Serve id (the process id outside Ray, for tests)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        import os

        return f"pid-{os.getpid()}"
