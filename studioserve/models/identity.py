"""The identity model: each value is returned as sent (a modeldir without a checkpoint)."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import Model

__all__ = ["IdentityModel"]


class IdentityModel(Model):
    """Answers every request with the request itself (Studio.ML's default without a model)."""

    kind: ClassVar[str] = "identity"

    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        return dict(data)
