"""Fixtures for the store layer: moto's S3 server and the GCS fake (tests/fakes/stores.py)."""

from tests.fakes.stores import *  # noqa: F403 - the fixtures
