"""Fixtures for the wire layer: pure codecs, no server (nothing yet beyond the root conftest)."""
