"""ModelService: the served model behind every protocol, its readiness and its activity.

Every route (the pickle endpoint, the Open Inference Protocol) reaches the model through one
:class:`ModelService` and :func:`studioserve.serving.inference.handle`: a request dict in, a
result dict (or one :class:`~studioserve.errors.RequestFailed`) out.
"""

from __future__ import annotations

from typing import Any

from ..errors import NotReady
from ..models import Model
from ..tensors import TensorSpec
from .activity import Activity

__all__ = ["ModelService"]


class ModelService:
    """The model behind every route.

    :param model: what :func:`studioserve.models.load_model` returned.
    :param request_timeout: seconds a request may wait for its results (then 504).
    """

    def __init__(self, model: Model, *, request_timeout: float = 60.0) -> None:
        self.model = model
        self.request_timeout = request_timeout
        self.activity = Activity()
        self.ready = False
        #: set when the server stops: requests are refused as "shutting down", not "loading"
        self.draining = False

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.model.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.model.outputs

    def not_ready(self) -> NotReady:
        """The error for a request that arrives while the service is not ready."""
        if self.draining:
            return NotReady("the server is shutting down; retry on another replica or later")
        return NotReady()

    def close(self) -> None:
        self.ready = False
        self.model.close()

    def predict(self, data: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Predict every key of ``data``; the result has the same keys.

        :param timeout: seconds the request may wait (default: the service's request timeout).
        :raises RequestFailed: with the status and per-key messages when any key fails.
        """
        return self.model.predict(
            data, timeout=self.request_timeout if timeout is None else timeout
        )
