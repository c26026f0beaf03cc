"""The handle a wrapper's ``create_model(modeldir, models)`` gets to the other served models.

:class:`ServedModels` reads the repository at call time, so a model reloaded, added or
unloaded later is what the wrapper's next call sees; each call leases the version it runs on
(as a request does) and goes through that model's own pipe, batching with direct requests.
"""

from __future__ import annotations

from typing import Any

from .repository import ModelRepository

__all__ = ["ServedModels"]


class ServedModels:
    """The other models of the server, for a wrapper that chains models in code.

    :param repository: the server's model repository.
    :param timeout: the default seconds a call may wait for its results.
    """

    def __init__(self, repository: ModelRepository, *, timeout: float = 60.0) -> None:
        self._repository = repository
        self.timeout = timeout

    def names(self) -> list[str]:
        """The models served now."""
        return self._repository.names()

    def __contains__(self, name: object) -> bool:
        return name in self._repository

    def predict(
        self,
        name: str,
        data: dict[str, Any],
        *,
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Predict every key of ``data`` with model ``name`` (its newest served version).

        :raises ModelNotFound: for a model or version not served.
        :raises RequestFailed: when the model fails any key (the status and per-key messages).
        """
        served = self._repository.lease(name, version)
        try:
            return served.model.predict(data, timeout=self.timeout if timeout is None else timeout)
        finally:
            served.release()
