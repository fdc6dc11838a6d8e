"""Start the server: start the engine (in a thread of this process, or in a process of its own that
loads the weights while this one reads only the config and tokenizer), run uvicorn; drain on SIGTERM.

Draining: the first SIGTERM (or Ctrl-C) sets the drain switch, so /health answers 503 and new requests
get 503, while requests already running finish, for up to the drain timeout; what is still running
then is aborted (its streams end with finish_reason "abort"), and uvicorn shuts down. A second signal
stops at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from engine.async_engine import AsyncEngine, EngineClient
from engine.config import ModelConfig
from engine.engine import EngineConfig, LLMEngine
from engine.engine_process import ModelSpec, ProcessEngine
from engine.loader import LoadedModel, read_config_and_tokenizer
from engine.tokenizer import Tokenizer
from server.app import build_app
from server.cli import host_port
from server.metrics import Metrics
from server.request_body import MAX_REQUEST_BYTES
from server.state import ServerState

log = logging.getLogger(__name__)

_ABORT_GRACE_S = 2.0  # after aborting what outlived the drain, time for those streams to send their end


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # default: the model folder's name
    max_queued_requests: int = 1024
    drain_timeout_s: float = 30.0
    log_level: str = "warning"
    log_requests: bool = True
    max_request_bytes: int = MAX_REQUEST_BYTES


def build_state(loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig) -> ServerState:
    """The state of a server whose engine runs in a thread of this process (not started yet)."""
    engine = AsyncEngine(LLMEngine(loaded, engine_config), max_queued_requests=config.max_queued_requests)
    return state_for(engine, Path(loaded.path), loaded.config, loaded.tokenizer, config)


def state_for(engine: EngineClient, model_path: Path, model_config: ModelConfig, tokenizer: Tokenizer,
              config: ServerConfig) -> ServerState:
    """engine.max_model_len must be known: a ProcessEngine learns it when it starts."""
    names = list(config.served_model_names) or [model_path.name]
    return ServerState(engine=engine, tokenizer=tokenizer, served_names=names, model_path=model_path,
                       vocab_size=model_config.vocab_size, max_model_len=engine.max_model_len,
                       metrics=Metrics(names[0]), max_request_bytes=config.max_request_bytes)


def _http_url(host: str, port: int) -> str:
    """The server's address as a URL (an IPv6 host in brackets: http://[::1]:8000)."""
    return f"http://{host_port(host, port)}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            engine = self.state.engine
            where = f", engine process {engine.pid}" if isinstance(engine, ProcessEngine) else ""
            print(f"deltaserve: serving {self.state.model_name!r} on {_http_url(host, port)} "
                  f"({engine.stats().slots_total} slots{where})", file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal, or one before start-up: stop now
            self.force_exit = True
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.drain()))

    async def drain(self) -> None:
        log.warning("draining: %d request(s) in flight, waiting up to %.0f s", len(self.state.active),
                    self.drain_timeout_s)
        deadline = time.monotonic() + self.drain_timeout_s
        while self.state.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.active:
            log.warning("drain timeout: aborting %d request(s)", len(self.state.active))
            for gen in list(self.state.active):
                gen.abort()
            deadline = time.monotonic() + _ABORT_GRACE_S
            while self.state.active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True


def make_server(state: ServerState, config: ServerConfig) -> DrainingServer:
    app = build_app(state)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    return DrainingServer(uv_config, state, config.drain_timeout_s)


def settle_garbage_collector() -> None:
    """Call once start-up is done. Streaming makes a few short-lived objects per token and stream, so the
    cyclic collector runs every few hundred allocations, and its older generations walk everything the
    imports, the app and the tokenizer built, which lives as long as the process: freeze that, and run
    the collector a tenth as often (cut the server's CPU per streamed token by ~10% on CPU)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def setup_request_log(enabled: bool) -> None:
    """The per-request JSON lines go to stderr as they are, whatever the general log level."""
    logger = logging.getLogger("deltaserve.requests")
    logger.propagate = False
    logger.handlers.clear()
    if enabled:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.CRITICAL + 1)


def serve(model: ModelSpec, engine_config: EngineConfig, config: ServerConfig, engine_process: bool) -> None:
    """Block until the server has drained and stopped. engine_process: the engine steps in a process of its
    own, so that its Python work and the event loop's per-token work do not share one GIL."""
    setup_request_log(config.log_requests)
    engine: EngineClient
    if engine_process:
        _, model_config, tokenizer = read_config_and_tokenizer(model.path)  # every cheap check, before the spawn
        engine = ProcessEngine(model, engine_config, max_queued_requests=config.max_queued_requests)
    else:
        loaded = model.load()
        model_config, tokenizer = loaded.config, loaded.tokenizer
        engine = AsyncEngine(LLMEngine(loaded, engine_config), max_queued_requests=config.max_queued_requests)
    engine.start()
    try:
        server = make_server(state_for(engine, model.path, model_config, tokenizer, config), config)
        settle_garbage_collector()
        server.run()
    finally:
        engine.stop()
