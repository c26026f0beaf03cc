"""A wrapper's ``dict -> dict`` callable as a model (Studio.ML's contract: one call a request)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import RequestFailed, StudioServeError
from .base import Model

logger = logging.getLogger(__name__)

__all__ = ["CallableModel"]


class CallableModel(Model):
    """Calls ``func(data)`` once per request, in the request's thread; it does not batch.

    :param func: maps the request dict to the response dict.
    """

    kind: ClassVar[str] = "callable"

    def __init__(self, func: Callable[[dict[str, Any]], Any], *, source: str) -> None:
        super().__init__(source=source)
        self.func = func

    def predict(self, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        try:
            out = self.func(data)
        except StudioServeError as e:
            raise RequestFailed(str(e), status=e.http_status, error_type=e.error_type) from e
        except Exception as e:
            logger.exception("wrapper %s raised", self.source)
            raise RequestFailed(
                f"the model raised {type(e).__name__}: {e}", status=500, error_type="model_error"
            ) from e
        if not isinstance(out, dict):
            raise RequestFailed(
                f"the wrapper's model returned {type(out).__name__}; it must return a dict",
                status=500,
                error_type="model_error",
            )
        return out
