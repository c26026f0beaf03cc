"""The models a server loads from its store: versions, settings, reloads and the store watch.

:class:`ModelCatalog` is the runtime's side of the
:class:`~studioserve.serving.repository.ModelRepository`: it knows the store, the keys asked
for (``KEY``, ``KEY@V``, ``--all``), the wrapper and the command line's settings, and turns
them into published model versions. For one model it:

1. reads the store's fingerprint of the experiment (names, sizes, mtimes or ETags), fetches
   the modeldir (through the verified cache for S3/GCS) and its ``serving.toml``;
2. merges the settings: the command line's options given on purpose override the file's
   (:meth:`ServeConfig.is_explicit <studioserve.config.ServeConfig.is_explicit>`);
3. lists the versions (:func:`~studioserve.models.versions.list_versions`) and selects the
   served ones with the version policy (``KEY@V`` pins one);
4. loads and warms each selected version that is new or was rewritten, *beside* what serves
   (a version whose files did not change keeps serving as it is), then publishes the new set
   in one atomic switch; the versions left out finish their requests and are unloaded.

Any failure in steps 1-4 of a *reload* leaves what served serving: it is logged, counted
(``studioserve_model_load_failures``) and shown on the status page and in the repository
index. At startup it is an error that names the model.

``--watch S`` runs :meth:`ModelCatalog.poll` every S seconds in one thread: a changed
fingerprint reloads that model; with ``--all``, experiments that appear in the store are
loaded and those removed are unloaded. Ensembles (a ``serving.toml`` with ``[[ensemble.step]]``)
are built after the models they run (:mod:`studioserve.serving.ensemble`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ServeConfig
from ..errors import ConfigError, ModelNotFound, StudioServeError
from ..model_config import ModelConfig, TensorEntry, validate_ensemble
from ..models import Model
from ..models.batched import example_batch
from ..models.devices import visible_gpu_count
from ..models.versions import ModelVersionSource, VersionPolicy, list_versions, load_version
from ..serving.ensemble import EnsembleModel
from ..serving.handles import ServedModels
from ..serving.repository import LOADING, ModelRepository, ServedVersion
from ..store import Store
from ..tensors import TensorSpec

logger = logging.getLogger(__name__)

__all__ = ["ModelCatalog"]

#: ServeConfig fields that are also serving.toml settings (the file's, unless given)
_OVERRIDABLE = ("max_batch_size", "max_delay_ms", "version_policy", "instances", "framework")


@dataclass
class _Loaded:
    """What the catalog remembers of a served model between polls."""

    fingerprint: str
    sources: dict[int, str]  # version -> that version's own fingerprint
    settings: ModelConfig
    ensemble: bool = False


class ModelCatalog:
    """Loads the configured models from ``store`` into ``repository``; see the module docstring.

    :param config: the server's configuration (keys, wrapper, batching, overrides).
    :param store: the open store (the catalog does not close it).
    :param repository: where versions are published.
    :param model: an already loaded model to serve as ``config.key`` (embedding and tests:
        no store access for it).
    """

    def __init__(
        self,
        config: ServeConfig,
        store: Store | None,
        repository: ModelRepository,
        *,
        model: Model | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.repository = repository
        self._model = model
        self._pins: dict[str, int | None] = dict(config.models())
        self._loaded: dict[str, _Loaded] = {}
        self._seen: dict[str, str] = {}  # fingerprint at the previous poll
        self._broken: dict[str, str] = {}  # fingerprint whose load failed (not retried)
        self._lock = threading.RLock()  # one load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: modeldir of each model, once fetched
        self.modeldirs: dict[str, Path] = {}
        #: what a wrapper's ``create_model(modeldir, models)`` gets
        self.handles = ServedModels(repository, timeout=config.request_timeout)
        #: called after every successful load with the model's name (the CLI prints)
        self.on_loaded: Callable[[str], None] | None = None

    # -- what to serve -----------------------------------------------------------------------
    def wanted(self) -> list[str]:
        """The keys to serve now: those named, or the store's with ``--all``."""
        if self.config.all_models and self.store is not None:
            return sorted(set(self.store.keys()) | set(self._pins))
        return list(self._pins)

    def loadable(self) -> list[str]:
        """Every key :meth:`load` can load (the store's, and the embedded model's)."""
        keys = set(self._pins)
        if self.store is not None:
            try:
                keys |= set(self.store.keys())
            except StudioServeError:
                logger.exception("listing the store failed")
        return sorted(keys)

    # -- loading -----------------------------------------------------------------------------
    def load_all(self) -> None:
        """Load every wanted model (startup): models first, then the ensembles over them.

        :raises StudioServeError: naming the model that could not be loaded.
        """
        if self._model is not None:
            self.repository.publish(self.config.key, {1: self._model}, settings={})
            self._model = None
        keys = [k for k in self.wanted() if k not in self.repository]
        if not keys and not len(self.repository):
            raise ConfigError(
                "the store holds no experiment to serve; add one with 'studio experiments add'"
            )
        ensembles: list[str] = []
        for key in keys:
            if self._stop.is_set():
                return
            if self._load(key, startup=True) == "ensemble":
                ensembles.append(key)
        for key in ensembles:
            self._build_ensemble(key, startup=True)

    def load(self, name: str) -> None:
        """Load or reload ``name`` from the store now (OIP's load; ``--watch``)."""
        if self.store is None:
            raise StudioServeError("this server has no store to load models from")
        if name not in self.loadable():
            raise ModelNotFound(
                f"unknown model {name!r}; the store holds {', '.join(map(repr, self.loadable()))}"
            )
        with self._lock:
            self._loaded.pop(name, None)  # an explicit load always reloads
            self._broken.pop(name, None)
            kind = self._load(name, startup=False, raise_errors=True)
            if kind == "ensemble":
                self._build_ensemble(name, startup=False, raise_errors=True)

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (OIP's unload); it finishes its requests, then is released."""
        with self._lock:
            self.repository.remove(name)
            self._loaded.pop(name, None)
            logger.info("unloaded model %r (on request)", name)

    def _settled(self, name: str, fingerprint: str) -> bool:
        """Whether ``name``'s store content is the same as at the previous poll.

        A checkpoint being written into the store (a local training run saving in place, a
        SavedModel uploaded file by file) changes between polls: it is loaded one poll after
        it stopped changing, never half-written.
        """
        last = self._seen.get(name)
        self._seen[name] = fingerprint
        return last == fingerprint

    def settings(self, name: str) -> ModelConfig:
        """The model's serving.toml, with the command line's given options laid over it."""
        cfg = self.config
        file = ModelConfig()
        if self.store is not None:
            found = self.store.serving_config(name)
            if found is not None:
                data, where = found
                file = ModelConfig.from_toml(data, source=where)
        given: dict[str, Any] = {f: getattr(cfg, f) for f in _OVERRIDABLE if cfg.is_explicit(f)}
        given = {k: v for k, v in given.items() if v is not None}
        overrides = ModelConfig(**given) if given else ModelConfig()
        return file.merged(overrides)

    def _load(self, name: str, *, startup: bool, raise_errors: bool = False) -> str | None:
        """Load ``name`` if it changed; "ensemble" for an ensemble (built separately)."""
        assert self.store is not None
        with self._lock:
            fingerprint = ""
            try:
                fingerprint = self.store.fingerprint(name)
                known = self._loaded.get(name)
                if known is not None and known.fingerprint == fingerprint:
                    return "ensemble" if known.ensemble else None
                if not raise_errors and self._broken.get(name) == fingerprint:
                    return None  # failed as it is: retried once the store changes
                if name not in self.repository:
                    self.repository.update(name, state=LOADING, reason="loading")
                settings = self.settings(name)
                if settings.ensemble:
                    self._loaded[name] = _Loaded(fingerprint, {}, settings, ensemble=True)
                    return "ensemble"
                if not startup and not raise_errors and not self._settled(name, fingerprint):
                    return None  # changed since the last poll: load once it stops changing
                modeldir = self.store.fetch(
                    name, refresh=self.config.refresh, quiet=self.config.quiet
                )
                self.modeldirs[name] = modeldir
                self._publish_versions(name, modeldir, settings, fingerprint, known)
            except Exception as e:
                self._broken[name] = fingerprint  # the store as it failed: not retried as is
                error = e if isinstance(e, StudioServeError) else None
                if error is None:
                    logger.exception("loading model %r failed", name)
                    error = StudioServeError(
                        f"loading model {name!r} failed: {type(e).__name__}: {e}"
                    )
                self._failed(name, error, startup=startup or raise_errors)
                return None
        if self.on_loaded is not None:
            self.on_loaded(name)
        return None

    def _publish_versions(
        self,
        name: str,
        modeldir: Path,
        settings: ModelConfig,
        fingerprint: str,
        known: _Loaded | None,
    ) -> None:
        cfg = self.config
        sources = list_versions(
            modeldir, wrapped=cfg.wrapper is not None, framework=settings.framework
        )
        pinned = self._pins.get(name)
        policy = (
            VersionPolicy.specific(pinned)
            if pinned is not None
            else VersionPolicy.parse(settings.version_policy or "latest")
        )
        selected = policy.select(sources, model=name)
        current = self.repository.get(name).versions if name in self.repository else {}
        versions: dict[int, Model | ServedVersion] = {}
        fresh: list[Model] = []
        try:
            for source in selected:
                served = current.get(source.version)
                if (
                    served is not None
                    and known is not None
                    and known.sources.get(source.version) == source.fingerprint
                ):
                    versions[source.version] = served  # unchanged: keeps serving as it is
                    continue
                model = self._load_version(name, source, settings)
                fresh.append(model)
                versions[source.version] = model
        except BaseException:
            for model in fresh:  # nothing half-loaded stays behind
                model.close()
            raise
        for model in fresh:
            model.start()  # worker threads up before the switch
            _prime(model)
        self.repository.publish(
            name,
            versions,
            available=[s.version for s in sources],
            settings=_settings_json(settings, policy),
            pinned=pinned,
        )
        self.repository.update(name, reason="")
        self._loaded[name] = _Loaded(
            fingerprint, {s.version: s.fingerprint for s in selected}, settings
        )
        logger.info(
            "serving %s version(s) %s (%s)",
            name,
            ", ".join(str(v) for v in versions),
            policy.describe(),
        )

    def _load_version(self, name: str, source: ModelVersionSource, settings: ModelConfig) -> Model:
        cfg = self.config
        logger.info("loading %s %s", name, source.describe())
        instances = settings.instances
        if instances is None:
            # a checkpoint on a machine with several GPUs: one instance per GPU by default
            instances = 1
            if cfg.wrapper is None and source.kind != "modeldir":
                instances = max(1, visible_gpu_count())
        return load_version(
            source,
            cfg.wrapper,
            max_batch_size=settings.max_batch_size or cfg.max_batch_size,
            max_delay=(
                settings.max_delay_ms if settings.max_delay_ms is not None else cfg.max_delay_ms
            )
            / 1000.0,
            queue_size=cfg.queue_size,
            instances=instances,
            models=self.handles,
            framework=settings.framework,
            trust=cfg.trust_artifact or bool(settings.trust),
            inputs=_specs(settings.inputs),
            outputs=_specs(settings.outputs),
        )

    def _build_ensemble(self, name: str, *, startup: bool, raise_errors: bool = False) -> None:
        known = self._loaded.get(name)
        if known is None or not known.settings.ensemble:
            return
        steps = known.settings.ensemble
        try:
            signatures = {
                entry.name: (
                    [s.name for s in entry.latest.model.inputs],
                    [s.name for s in entry.latest.model.outputs],
                )
                for entry in self.repository.models()
                if entry.latest is not None and entry.name != name
            }
            others = {
                key: loaded.settings.ensemble
                for key, loaded in self._loaded.items()
                if loaded.settings.ensemble and key != name
            }
            plan = validate_ensemble(name, steps, signatures, ensembles=others)
            model = EnsembleModel(plan, self.repository)
            self.repository.publish(
                name,
                {1: model},
                available=[1],
                settings=_settings_json(known.settings, VersionPolicy.latest()),
                steps=tuple(_triton_step(s) for s in plan.steps),
            )
            self.repository.update(name, reason="")
            logger.info("serving ensemble %s: %s", name, " -> ".join(s.model for s in plan.steps))
        except StudioServeError as e:
            self._loaded.pop(name, None)
            self._failed(name, e, startup=startup or raise_errors)

    def _failed(self, name: str, error: StudioServeError, *, startup: bool) -> None:
        served = name in self.repository and self.repository.get(name).ready
        message = str(error)
        self.repository.failed(name, message)
        if startup:
            if not served:
                try:
                    self.repository.remove(name)
                except ModelNotFound:
                    pass
            raise error
        logger.error(
            "reloading model %r failed; %s: %s",
            name,
            "the served version(s) keep serving" if served else "it is not served",
            message,
        )

    # -- the watch ---------------------------------------------------------------------------
    def poll(self) -> None:
        """One look at the store: reload what changed; with ``--all``, add and remove models."""
        if self.store is None:
            return
        try:
            wanted = set(self.wanted())
        except StudioServeError as e:
            logger.error("listing the store failed: %s", e)
            return
        served = set(self.repository.names())
        ensembles: list[str] = []
        for name in sorted(wanted):
            if self._stop.is_set():
                return
            if self._load(name, startup=False) == "ensemble":
                ensembles.append(name)
        for name in ensembles:
            if name not in served or name not in self.repository:
                self._build_ensemble(name, startup=False)
        if self.config.all_models:
            for name in sorted(served - wanted):
                if name in self._pins:
                    continue
                try:
                    self.unload(name)
                    logger.info("model %r left the store; unloaded", name)
                except ModelNotFound:
                    pass
        self.repository.reap()

    def watch(self, interval: float) -> None:
        """Poll the store every ``interval`` seconds, in one thread, until :meth:`close`."""
        if self._thread is not None or self.store is None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:
                    logger.exception("polling the store failed")

        self._thread = threading.Thread(target=run, name="studioserve-watch", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Load nothing more (a stop was requested; thread- and signal-safe)."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)
            self._thread = None


def _prime(model: Model, calls: int = 3) -> None:
    """Run a few one-example requests through a new version's own pipe before it serves.

    The warm-up of the loader calls the model directly; this goes through the batching stage,
    so the stage has measured its batch time when the first request arrives. Admission control
    reads that time: a version swapped in under load would otherwise look unmeasured and
    be capped (503s in the seconds after a hot reload).
    """
    if model.pipe is None or not model.inputs:
        return
    example = example_batch(model.inputs, rows=1)
    try:
        for _ in range(calls):
            model.predict({"prime": example}, timeout=30.0)
    except Exception as e:  # the model serves anyway; its first batches will measure it
        logger.debug("priming %s failed: %s", model.source, e)


def _specs(entries: tuple[TensorEntry, ...] | None) -> list[TensorSpec] | None:
    """serving.toml's signature entries as the models' TensorSpecs."""
    if entries is None:
        return None
    return [TensorSpec(e.name, e.shape, e.dtype) for e in entries]


def _settings_json(settings: ModelConfig, policy: VersionPolicy) -> dict[str, Any]:
    out = settings.to_json()
    out["version_policy"] = policy.text()
    return out


def _triton_step(step: Any) -> dict[str, Any]:
    """A step as Triton's ensemble_scheduling writes it (model config)."""
    return {
        "model_name": step.model,
        "model_version": step.version if step.version is not None else -1,
        "input_map": dict(step.input_map),
        "output_map": dict(step.output_map),
    }
