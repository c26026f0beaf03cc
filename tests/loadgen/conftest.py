"""Fixtures for the load generator (studioserve.loadgen; see the root conftest)."""
