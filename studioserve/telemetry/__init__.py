"""Telemetry: the observer interface and its consumers (live series, Prometheus, Triton stats)."""
