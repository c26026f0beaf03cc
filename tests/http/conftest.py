"""Fixtures for the HTTP layer: real servers on ephemeral loopback ports (tests/helpers.py)."""
