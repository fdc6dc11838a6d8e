"""Errors a user can cause, raised at the edge with a message that says what to fix."""


class ModelLoadError(Exception):
    """A model folder cannot be served: missing files, unknown architecture, bad weights."""
