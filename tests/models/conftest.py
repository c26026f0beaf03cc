"""Fixtures for the models layer: the Model protocol and its implementations (root conftest)."""
