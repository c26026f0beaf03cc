"""Ensembles: a model whose steps run other served models, as Triton's ensemble_scheduling.

An :class:`EnsembleModel` is built from a validated
:class:`~studioserve.model_config.EnsemblePlan` (the ``[[ensemble.step]]`` tables of its
``serving.toml``). It has no pipe of its own: each step leases its model from the
:class:`~studioserve.serving.repository.ModelRepository` and calls that model's own
``predict``, so a step's items go through the step model's batching queue together with the
direct requests to that model (and count in its statistics), and a step model reloaded while
the ensemble serves is picked up at the next request.

One request key is one example flowing through every step: the ensemble's input tensors (one
value, or a dict of them when the ensemble takes several) are renamed into each step's inputs
by its ``input_map``, the step's outputs into ensemble tensors by its ``output_map``; the
answer for the key is the ensemble's output tensor (a dict of them when it has several).
All keys of a request go to a step in one ``predict`` call, so they batch together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput, RequestFailed
from ..model_config import EnsemblePlan, EnsembleStep
from ..models import Model
from ..tensors import TensorSpec
from .repository import ModelRepository

__all__ = ["EnsembleModel"]


class EnsembleModel(Model):
    """Runs ``plan``'s steps through the served models of ``repository``.

    :param plan: the validated ensemble.
    :param repository: where the step models are served.
    """

    kind: ClassVar[str] = "ensemble"

    def __init__(self, plan: EnsemblePlan, repository: ModelRepository) -> None:
        self.plan = plan
        self.repository = repository
        super().__init__(
            source=f"ensemble of {', '.join(s.model for s in plan.steps)}",
            inputs=[self._spec(n, inputs=True) for n in plan.inputs],
            outputs=[self._spec(n, inputs=False) for n in plan.outputs],
        )

    def _spec(self, tensor: str, *, inputs: bool) -> TensorSpec:
        """The ensemble tensor's spec, from the step model that reads (or writes) it."""
        for step in self.plan.steps:
            mapping = step.input_map if inputs else step.output_map
            for model_name, ensemble_name in mapping.items():
                if ensemble_name != tensor:
                    continue
                try:
                    model = self.repository.resolve(step.model, step.version).model
                except Exception:
                    continue
                for spec in model.inputs if inputs else model.outputs:
                    if spec.name == model_name:
                        return TensorSpec(tensor, spec.shape, spec.dtype)
        return TensorSpec(tensor, (None,), "float32")

    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        tensors: dict[str, dict[str, Any]] = {}
        names = self.plan.inputs
        for key, value in data.items():
            if isinstance(value, dict):
                missing = [n for n in names if n not in value]
                if missing:
                    raise InvalidInput(
                        f"key {key!r}: missing input(s) {', '.join(map(repr, missing))}; the "
                        f"ensemble takes {', '.join(map(repr, names))}",
                        key=key,
                    )
                tensors[key] = {n: value[n] for n in names}
            elif len(names) == 1:
                tensors[key] = {names[0]: value}
            else:
                raise InvalidInput(
                    f"key {key!r}: the ensemble takes several inputs "
                    f"({', '.join(map(repr, names))}): send a dict of them",
                    key=key,
                )
        for step in self.plan.steps:
            self._run(step, tensors, deadline)
        out: dict[str, Any] = {}
        outputs = self.plan.outputs
        for key, values in tensors.items():
            if len(outputs) == 1:
                out[key] = values[outputs[0]]
            else:
                out[key] = {n: values[n] for n in outputs}
        return out

    def _run(self, step: EnsembleStep, tensors: dict[str, dict[str, Any]], deadline: float) -> None:
        served = self.repository.lease(step.model, step.version)
        try:
            model = served.model
            request: dict[str, Any] = {}
            single = len(step.input_map) == 1
            for key, values in tensors.items():
                if single:
                    request[key] = values[next(iter(step.input_map.values()))]
                else:
                    request[key] = {m: values[e] for m, e in step.input_map.items()}
            try:
                result = model.predict(request, timeout=max(0.001, deadline - time.monotonic()))
            except RequestFailed as e:
                raise RequestFailed(
                    f"ensemble step {step.model!r}: {e}",
                    status=e.http_status,
                    error_type=e.error_type,
                    keys=e.keys,
                    retry_after=e.retry_after,
                ) from e
            for key, value in result.items():
                tensors[key].update(_outputs(step, value, model.outputs))
        finally:
            served.release()


def _outputs(step: EnsembleStep, value: Any, specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """One key's step result as ensemble tensors, by the step's ``output_map``."""
    mapping = step.output_map
    if isinstance(value, dict):
        return {e: value[m] for m, e in mapping.items() if m in value}
    if isinstance(value, (list, tuple)) and not isinstance(value, np.ndarray):
        names = [s.name for s in specs]
        return {e: value[names.index(m)] for m, e in mapping.items() if m in names}
    return {next(iter(mapping.values())): value} if mapping else {}
