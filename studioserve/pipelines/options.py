"""The options of one :meth:`~studioserve.pipelines.ModelPipe.add`, checked before it builds.

:class:`StageOptions` is what ``add()`` was asked for, frozen and checked on construction (its
errors are ``add()``'s), plus what follows from it: whether it makes a new stage at all
(Studio.ML's rule: any option, or a Keras model, does), whether that stage batches, its batch
bound, its name and its instances (the copies its workers call, and their devices).
:class:`~studioserve.pipelines.stage.Stage` is built from one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .keras_stage import is_keras_model

__all__ = ["DEFAULT_KERAS_BATCH_SIZE", "StageOptions"]

#: max_batch_size of a Keras model stage when add() is not given one
DEFAULT_KERAS_BATCH_SIZE = 64


@dataclass(frozen=True)
class StageOptions:
    """One ``add()``'s function and options; see :meth:`ModelPipe.add` for what each means.

    ``batch_size`` is Studio.ML's name for ``max_batch_size``; :attr:`rows` is the one bound.
    ``instances`` and ``devices`` decide the stage's instances (:attr:`workers`, :attr:`copies`,
    :attr:`device_labels`): worker ``i`` is instance ``i``.

    :raises ValueError: for invalid options (the same messages as ``add()``).
    :raises TypeError: when ``func`` is neither a callable nor a Keras model.
    """

    func: Any
    num_workers: int | None = None
    batch_size: int | None = None
    filterf: Callable[[Any], Any] | None = None
    batcher: Callable[[list[Any]], Any] | None = None
    timeout: float | None = None
    max_batch_size: int | None = None
    max_delay: float = 0.0
    preferred_batch_sizes: Sequence[int] | None = None
    adaptive: bool = False
    latency_objective: float | None = None
    splitter: Callable[[Any, list[int]], Sequence[Any]] | None = None
    name: str | None = None
    linger: float = 0.25
    instances: int | Sequence[Any] | None = None
    devices: Sequence[str] | None = None
    #: whether ``func`` is a Keras model (found without importing Keras)
    keras: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keras", is_keras_model(self.func))
        bs, mbs = self.batch_size, self.max_batch_size
        if bs is not None and mbs is not None and bs != mbs:
            raise ValueError(
                f"batch_size={bs} and max_batch_size={mbs} disagree; "
                f"pass one of them (they are aliases)"
            )
        mbs = mbs if mbs is not None else bs
        if mbs is not None and (not isinstance(mbs, int) or mbs < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1, not {mbs!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {self.num_workers!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, not {self.timeout!r}")
        if self.adaptive and mbs is None and not self.keras:
            raise ValueError("adaptive batching needs max_batch_size (the largest batch allowed)")
        if not callable(self.func):
            raise TypeError(
                f"add() needs a callable or a Keras model, not {type(self.func).__name__}"
            )
        if self.adaptive and not self.batching:
            raise ValueError("adaptive batching needs max_batch_size > 1")
        self._check_instances()

    def _check_instances(self) -> None:
        """Check ``instances`` and ``devices`` (and ``num_workers`` against them)."""
        inst = self.instances
        if isinstance(inst, bool) or not (
            inst is None or isinstance(inst, int) or _is_sequence(inst)
        ):
            raise TypeError(
                f"instances must be a number of instances or a list of copies of the stage's "
                f"function, not {type(inst).__name__}"
            )
        if isinstance(inst, int) and inst < 1:
            raise ValueError(f"instances must be >= 1, not {inst!r}")
        if _is_sequence(inst):
            copies = list(inst)  # type: ignore[arg-type]
            if not copies:
                raise ValueError("instances is an empty list; give at least one copy")
            for i, copy in enumerate(copies):
                if not callable(copy):
                    raise TypeError(
                        f"instances[{i}] is a {type(copy).__name__}; every instance must be a "
                        f"callable or a Keras model"
                    )
                if is_keras_model(copy) != self.keras:
                    kind = "a Keras model" if self.keras else "a plain function"
                    raise TypeError(
                        f"instances[{i}] is not the same kind as the stage's function ({kind}); "
                        f"give copies of one kind: all Keras models or all functions"
                    )
        count = self.workers
        nw = self.num_workers
        if inst is not None and nw is not None and nw != count:
            raise ValueError(
                f"num_workers={nw} and {count} instances disagree; each instance is one "
                f"worker, so pass one of them"
            )
        devices = self.devices
        if devices is None:
            return
        if isinstance(devices, str) or not _is_sequence(devices):
            raise TypeError(
                f'devices must be a list of device labels ("CPU", "GPU:0", ...), one per '
                f"instance, not {type(devices).__name__}"
            )
        labels = list(devices)
        if len(labels) != count:
            raise ValueError(
                f"devices has {len(labels)} labels for {count} instances; give one per instance"
            )
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise ValueError(
                    f'device labels must be non-empty strings such as "CPU" or "GPU:0", '
                    f"not {label!r}"
                )

    @property
    def rows(self) -> int | None:
        """Most rows per call: ``max_batch_size`` (or ``batch_size``), 64 for a Keras model
        given neither; None when neither is given."""
        mbs = self.max_batch_size if self.max_batch_size is not None else self.batch_size
        if mbs is None and self.keras:
            return DEFAULT_KERAS_BATCH_SIZE
        return mbs

    @property
    def batching(self) -> bool:
        """Whether the stage calls its function on batches (``max_batch_size=1`` without a
        ``batcher`` is one item per call, as Studio.ML's ``batch_size=1``)."""
        rows = self.rows
        return rows is not None and (rows > 1 or self.batcher is not None or self.keras)

    @property
    def new_stage(self) -> bool:
        """Whether ``add()`` starts a stage; without, ``func`` composes with the function
        before it (Studio.ML's rule)."""
        return bool(
            self.num_workers is not None
            or self.rows is not None
            or self.filterf is not None
            or self.batcher is not None
            or self.timeout is not None
            or self.splitter is not None
            or self.max_delay
            or self.preferred_batch_sizes
            or self.adaptive
            or self.keras
            or self.instances is not None
            or self.devices is not None
        )

    @property
    def workers(self) -> int:
        """Worker threads for the stage, one per instance (at least one): the number of
        ``instances`` when given, else ``num_workers``, else one per label of ``devices``."""
        inst = self.instances
        if isinstance(inst, int):
            return max(1, inst)
        if inst is not None:
            return max(1, len(inst))
        if self.num_workers:
            return self.num_workers
        if self.devices is not None and not isinstance(self.devices, str):
            return max(1, len(self.devices))
        return 1

    @property
    def copies(self) -> tuple[Any, ...] | None:
        """The copies given in ``instances`` (worker ``i`` calls copy ``i``); None when the
        workers share ``func`` (for a Keras model, the stage clones it per instance)."""
        inst = self.instances
        if inst is None or isinstance(inst, int):
            return None
        return tuple(inst)

    @property
    def device_labels(self) -> tuple[str | None, ...]:
        """One device label per instance (None for each when ``devices`` is not given)."""
        if self.devices is None:
            return (None,) * self.workers
        return tuple(str(d).strip() for d in self.devices)

    @property
    def stage_name(self) -> str:
        """``name``, else one made from the function's (or the Keras model's) name."""
        if self.name:
            return self.name
        func = self.func
        name = getattr(func, "name", None) if self.keras else None
        name = name or getattr(func, "__name__", None) or type(func).__name__
        name = re.sub(r"[^A-Za-z0-9_.]+", "_", str(name)).strip("_")
        return name or "stage"


def _is_sequence(obj: object) -> bool:
    """A list-like of copies or labels (a str or a mapping is not)."""
    return isinstance(obj, Sequence) and not isinstance(obj, (str, bytes))
