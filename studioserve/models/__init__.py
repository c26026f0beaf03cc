"""Models: the Model protocol every served thing implements, one implementation per kind, and
the loader that picks one from a modeldir or a wrapper."""
