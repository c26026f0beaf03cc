"""Fixtures for the cloud layer: moto, the GCE fake and a loopback sshd (tests/cloud/helpers.py)."""
