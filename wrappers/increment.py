"""Studio.ML's simplest wrapper: a model that adds 1 to every value it is sent.

``create_model`` returns a plain ``dict -> dict`` callable, which studioserve calls once per
request (Studio.ML's contract)::

    studio serve my-experiment --wrapper wrappers/increment.py
"""

from __future__ import annotations

from typing import Any

import numpy as np


def create_model(modeldir: str) -> Any:
    """Ignore ``modeldir`` and return a callable that adds 1 to each value."""

    def increment(data: dict[str, Any]) -> dict[str, Any]:
        return {key: np.asarray(value) + 1 for key, value in data.items()}

    return increment
