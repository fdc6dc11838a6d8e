"""What every route shares: the engine, the tokenizer, the served names, metrics, and the drain switch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.async_engine import EngineClient
from engine.tokenizer import Tokenizer
from server.errors import APIError, unavailable
from server.logprobs import TokenTexts
from server.metrics import Metrics
from server.request_body import MAX_REQUEST_BYTES

if TYPE_CHECKING:
    from server.generation import Generation


@dataclass
class ServerState:
    engine: EngineClient  # AsyncEngine (a thread) or ProcessEngine (a process of its own)
    tokenizer: Tokenizer
    served_names: list[str]  # the first is the name answers carry
    model_path: Path
    vocab_size: int
    max_model_len: int | None
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    max_request_bytes: int = MAX_REQUEST_BYTES  # a longer body is refused with 413 (request_body.read_body)
    draining: bool = False  # set on SIGTERM: /health says 503, new work is refused, running work finishes
    active: set[Generation] = field(default_factory=set)
    texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.texts = TokenTexts(self.tokenizer)

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_serving(self) -> None:
        """503 while draining, and for good once the engine process has died (a supervisor restarts us)."""
        if self.draining:
            raise unavailable("the server is shutting down")
        if self.engine.error is not None:
            raise unavailable(f"the engine is gone: {self.engine.error}; restart the server")

    def check_accepting(self) -> None:
        if self.draining:
            self.metrics.reject("draining")
        self.check_serving()
