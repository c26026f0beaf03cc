"""The bundled demo experiment: a small Keras classifier added to the local store."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from .config import resolve_store_url
from .models.keras import build_mlp
from .store import ExperimentInfo, open_store

logger = logging.getLogger(__name__)

DEMO_INPUTS = 4
DEMO_CLASSES = 3


def build_demo_model(seed: int = 7) -> object:
    """A small Keras MLP: 4 float32 features -> 16 relu -> 3-class softmax."""
    return build_mlp(
        DEMO_INPUTS,
        16,
        DEMO_CLASSES,
        seed=seed,
        input_name="features",
        output_name="probs",
        name="demo_mlp",
    )


def add_demo_experiment(key: str = "demo-mlp", store: str | None = None) -> ExperimentInfo:
    """Build the demo model, save it as ``model.keras`` and add it to the store as ``key``.

    An existing experiment under ``key`` is replaced.
    """
    model = build_demo_model()
    with tempfile.TemporaryDirectory(prefix="studioserve-demo-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)  # type: ignore[attr-defined]
        return open_store(resolve_store_url(store)).add(
            key,
            Path(tmp),
            description="studioserve demo: 4 features -> 3-class softmax",
            framework="keras",
            force=True,
        )


def client_snippet(url: str, token: str | None = None) -> str:
    """Copy-paste Python and curl lines that query the demo server at ``url``."""
    auth = f", token={token!r}" if token else ""
    header = f" -H 'Authorization: Bearer {token}'" if token else ""
    return (
        "Try it from Python:\n"
        "    import numpy as np\n"
        "    from studioserve import Client\n"
        f"    print(Client({url!r}{auth}).predict("
        "{'a': np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)}))\n"
        "or with curl (JSON in, JSON out):\n"
        f"    curl -s -X POST{header} -H 'Content-Type: application/json' "
        f"-d '{{\"a\": [0.1, 0.2, 0.3, 0.4]}}' {url}/"
    )
