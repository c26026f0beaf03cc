"""Serving without a transport: ModelService, activity counting, admission control and the one
request path."""
