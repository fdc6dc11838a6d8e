"""Errors a user can cause, raised at the edge with a message that says what to fix."""


class ModelLoadError(Exception):
    """A model folder cannot be served: missing files, unknown architecture, bad weights."""


class ContextLengthExceeded(ValueError):
    """A request whose prompt and max_tokens together do not fit the context (OpenAI's
    context_length_exceeded, which clients look for to trim a conversation and retry)."""


class InvalidPrompt(ValueError):
    """A prompt the engine can never run (empty, or holding token ids outside the vocabulary): the server
    names the route's prompt field (prompt, or messages for chat) as the param at fault."""


class TooManyChoices(ValueError):
    """A request for more choices (n) than the sequences the engine decodes at once."""
