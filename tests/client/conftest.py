"""Fixtures for the Python client (see the root conftest)."""
