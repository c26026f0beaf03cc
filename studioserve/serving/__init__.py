"""Serving without a transport: ModelService, activity counting and the one request path."""
