"""Fixtures for the pipelines layer: threads and queues, no HTTP (see the root conftest)."""
