"""Fixtures for the serving layer: the transport-free request path (see the root conftest)."""
