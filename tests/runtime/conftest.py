"""Fixtures for the runtime layer (ModelServer, `studio serve`): remote stores from tests/fakes."""

from tests.fakes.stores import *  # noqa: F403 - the fixtures
