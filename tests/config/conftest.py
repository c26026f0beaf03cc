"""Fixtures for the config layer (see the root conftest)."""
