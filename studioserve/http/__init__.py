"""The HTTP layer: the Flask app, its state, thin route adapters and the embedded HTTP servers."""
