"""Fixtures for the wire layer: pure codecs, no server.

The decoder fuzzing suite (``test_fuzz_decoders.py``) runs under a hypothesis profile:
``short`` by default (what ``make test`` runs: a fixed seed, so every run tries the same
inputs), ``long`` with ``HYPOTHESIS_PROFILE=long`` (``make fuzz``: many more, randomized), and
``medium`` in between. None keeps an example database in the working tree.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
}
settings.register_profile("short", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("medium", max_examples=1500, **_COMMON)
settings.register_profile("long", max_examples=20_000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "short"))
