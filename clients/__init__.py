"""Clients for a deltaserve server: a typed Python client (sync and async), the `deltaserve chat` /
`deltaserve complete` terminal client, and the `deltaserve bench-serve` load generator."""

from clients.client import AsyncClient, Client, Sampling
from clients.streams import AsyncTextStream, TextStream
from clients.types import (Choice, Completion, DeltaserveConnectionError, DeltaserveError, Model, TokenizerInfo,
                           Tokens, Usage)

__all__ = ["AsyncClient", "AsyncTextStream", "Choice", "Client", "Completion", "DeltaserveConnectionError",
           "DeltaserveError", "Model", "Sampling", "TextStream", "TokenizerInfo", "Tokens", "Usage"]
