"""Fixtures for the CLI: click in-process and `studio` subprocesses (tests/helpers.py)."""
