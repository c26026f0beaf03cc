"""ModelService: the served models behind every protocol, their readiness and activity.

Every route (the pickle endpoint, the Open Inference Protocol) reaches a model through one
:class:`ModelService` and :class:`studioserve.serving.inference.RequestHandler`: a request dict
in, a result dict (or one :class:`~studioserve.errors.RequestFailed`) out. The models live in
the service's :class:`~studioserve.serving.repository.ModelRepository` (one or many, each with
its versions); the service adds what is server-wide: readiness, the drain, the activity that
the inactivity timer reads, the request timeout.
"""

from __future__ import annotations

from typing import Any

from ..errors import NotReady
from ..models import Model
from ..tensors import TensorSpec
from .activity import Activity
from .repository import ModelRepository

__all__ = ["ModelService"]

#: the name of the model of a service built from a bare model (``ModelService(model)``)
DEFAULT_NAME = "model"


class ModelService:
    """The models behind every route.

    :param models: a repository, or one model (served as ``name``, version 1).
    :param request_timeout: seconds a request may wait for its results (then 504).
    :param name: the name of a single ``model`` (the experiment key).
    """

    def __init__(
        self,
        models: Model | ModelRepository,
        *,
        request_timeout: float = 60.0,
        name: str = DEFAULT_NAME,
    ) -> None:
        if isinstance(models, ModelRepository):
            self.repository = models
        else:
            self.repository = ModelRepository()
            self.repository.publish(name, {1: models})
        self.request_timeout = request_timeout
        self.activity = Activity()
        self.ready = False
        #: set when the server stops: requests are refused as "shutting down", not "loading"
        self.draining = False

    # -- the one model of a single-model server (status page, tests, embedding) ---------------
    @property
    def model(self) -> Model:
        """The model a request without a model name goes to (the only one served)."""
        return self.repository.resolve(None).model

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
        self.repository.close()

    def predict(
        self,
        data: dict[str, Any],
        *,
        timeout: float | None = None,
        model: str | None = None,
        version: str | int | None = None,
    ) -> dict[str, Any]:
        """Predict every key of ``data`` with ``model`` (default: the only one served).

        :param timeout: seconds the request may wait (default: the service's request timeout).
        :raises RequestFailed: with the status and per-key messages when any key fails.
        :raises ModelNotFound: for a model or version not served.
        """
        served = self.repository.lease(model, version)
        try:
            return served.model.predict(
                data, timeout=self.request_timeout if timeout is None else timeout
            )
        finally:
            served.release()
