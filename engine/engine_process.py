"""The engine in a process of its own, so that its step loop and the server's per-token work (SSE
events, JSON, socket writes) do not take turns on one GIL: the engine never waits for the event loop.

The engine process loads the model, builds the LLMEngine and reports ready (or the one-line load
error); then it takes every pending command, steps, and sends the step's deliveries as one message
with a stats snapshot (run_step_loop, as the thread of AsyncEngine runs it). In the server process a
writer thread sends the commands, and a reader thread hands each step's deliveries, still packed, to
the event loop in one wake-up (StreamTable); a consumer merges what it takes into one RequestOutput.

The engine process ignores SIGINT and SIGTERM: the server drains, then stops it. If it dies (a crash,
the OOM killer), every open stream fails at once and stats() says alive=False. If the server process
dies, the engine process reads end-of-file on its command pipe (or a broken pipe on its events) and exits.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

from engine.async_engine import (Command, Delivery, EngineClient, EngineDead, EngineStats, EngineStopped, engine_stats,
                                 run_step_loop)
from engine.engine import EngineConfig, LLMEngine, RequestLimits
from engine.errors import ModelLoadError
from engine.loader import LoadedModel, load_model
from engine.request import CompletionOutput, RequestOutput, merge_outputs
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What the engine process loads: the arguments of engine.loader.load_model."""

    path: Path
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"

    def load(self) -> LoadedModel:
        return load_model(self.path, device=self.device, dtype=self.dtype, backend=self.backend)


def build_llm_engine(model: ModelSpec, config: EngineConfig) -> LLMEngine:
    return LLMEngine(model.load(), config)


BuildEngine = Callable[[ModelSpec, EngineConfig], LLMEngine]


class ProcessEngine(EngineClient):
    """build: what the engine process steps, made there (a top-level function, as it is pickled): the real
    engine, or a stand-in with the same step interface that measures the server alone
    (bench/server_overhead.py)."""

    def __init__(self, model: ModelSpec, config: EngineConfig = EngineConfig(), max_queued_requests: int = 1024,
                 stop_timeout_s: float = 30.0, build: BuildEngine = build_llm_engine):
        super().__init__(max_queued_requests)
        self.model = model
        self.config = config
        self.build = build
        self.stop_timeout_s = stop_timeout_s
        self._process: mp.process.BaseProcess | None = None
        self._commands: Connection | None = None  # to the engine process
        self._events: Connection | None = None  # from it
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # commands for the writer thread
        self._threads: list[threading.Thread] = []
        self._limits: RequestLimits | None = None
        self._adds_sent = 0
        self._snapshot: tuple[EngineStats, int] | None = None  # the latest stats, and the adds they include

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process and wait until its model is loaded; ModelLoadError if it cannot be."""
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        their_commands, self._commands = ctx.Pipe(duplex=False)
        self._events, their_events = ctx.Pipe(duplex=False)
        _widen(self._events)
        self._process = ctx.Process(target=_engine_main, name="deltaserve-engine", daemon=True,
                                    args=(self.build, self.model, self.config, their_commands, their_events,
                                          logging.getLogger().getEffectiveLevel()))
        try:
            self._process.start()
            their_commands.close()  # the engine process holds the only other ends: its exit is our end-of-file
            their_events.close()
            ready = self._receive_ready()
        except BaseException:
            self._kill()
            self._close_pipes()
            raise
        _, self._limits, stats = ready
        self._snapshot = (stats, 0)
        self._threads = [threading.Thread(target=self._read, name="deltaserve-engine-reader", daemon=True),
                         threading.Thread(target=self._write, name="deltaserve-engine-writer", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask the engine process to stop (what still runs ends with EngineStopped), then reap it."""
        self._stopping = True
        if self._process is None:
            return
        self._outbox.put(("stop", None))
        self._process.join(self.stop_timeout_s)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %.0f s: killing it", self.stop_timeout_s)
        self._kill()
        for thread in self._threads:  # the reader ends at the pipe's end-of-file, the writer after "stop"
            thread.join(timeout=5)
        self._close_pipes()
        self._streams.fail_all(EngineStopped("the engine stopped"))

    def stats(self) -> EngineStats:
        """The engine process's latest snapshot (one arrives with every step), plus what is on its way there."""
        stats = self._snapshot[0]
        if self._error is not None:
            return replace(stats, num_running=0, num_waiting=0, slots_used=0, alive=False)
        return replace(stats, num_waiting=self.num_queued())

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # ---- requests -------------------------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        assert self._limits is not None, "start() the engine first"
        return self._limits

    def num_queued(self) -> int:
        stats, adds_seen = self._snapshot
        return stats.num_waiting + self._adds_sent - adds_seen

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._adds_sent += 1
        self._outbox.put(("add", (request_id, prompt_ids, params)))

    def abort(self, request_id: str) -> None:
        self._outbox.put(("abort", request_id))

    def merge(self, request_id: str, items: list[tuple]) -> RequestOutput:
        return _merge_packed(request_id, items)

    # ---- the server-side threads ----------------------------------------------------------------

    def _receive_ready(self) -> tuple:
        try:
            message = self._events.recv()
        except EOFError:
            self._process.join()
            raise ModelLoadError(f"the engine process exited while loading the model "
                                 f"({_exit_reason(self._process.exitcode)})") from None
        if message[0] == "failed":
            self._process.join(timeout=10)  # it exits on its own after reporting
            raise ModelLoadError(message[1])
        assert message[0] == "ready", f"unexpected first message {message[0]!r} from the engine process"
        return message

    def _write(self) -> None:
        """Commands go out in batches: whatever queued up while the last send ran."""
        while True:
            batch = [self._outbox.get()]
            try:
                while True:
                    batch.append(self._outbox.get_nowait())
            except queue.Empty:
                pass
            try:
                self._commands.send(batch)
            except OSError:  # the engine process is gone; the reader reports it
                return
            if any(kind == "stop" for kind, _ in batch):
                return

    def _read(self) -> None:
        try:
            while True:
                try:
                    _, deliveries, stats, adds_seen = self._events.recv()
                except (EOFError, OSError):
                    break
                self._snapshot = (stats, adds_seen)
                self._streams.deliver(deliveries)  # as packed: made into RequestOutputs by merge, when taken
        except Exception:  # a bug here would leave every stream waiting: end the engine process and fail them
            log.exception("reading the engine process's outputs failed")
            self._process.kill()
        if self._stopping:
            return
        self._process.join(timeout=5)  # reaped, for its exit code
        self._error = EngineDead(f"the engine process exited unexpectedly ({_exit_reason(self._process.exitcode)})")
        log.error("%s; open requests fail, /health answers 503", self._error)
        self._streams.fail_all(self._error)

    def _kill(self) -> None:
        if self._process is None or self._process.pid is None:  # never started
            return
        if self._process.is_alive():
            self._process.kill()
        self._process.join()

    def _close_pipes(self) -> None:
        for conn in (self._commands, self._events):
            if conn is not None:
                conn.close()


def _pack(item: RequestOutput | BaseException) -> tuple | BaseException:
    """An output as plain tuples, which (un)pickle several times faster than dataclasses: with hundreds of
    streams this is most of what crosses the pipe each step. The common one (one choice, one token, no
    logprobs, not finished) is 4 numbers and a string. The prompt is left out: the server has it."""
    if isinstance(item, BaseException):
        return item
    outputs = item.outputs
    if len(outputs) == 1 and not item.finished and item.prompt_logprobs is None:
        c = outputs[0]
        if c.index == 0 and len(c.token_ids) == 1 and c.logprobs is None and c.finish_reason is None:
            return c.text, c.token_ids[0], item.num_prompt_tokens, item.num_generated_tokens
    return ([(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in outputs],
            item.prompt_logprobs, item.finished, item.num_prompt_tokens, item.num_generated_tokens)


def _merge_packed(request_id: str, items: list[tuple]) -> RequestOutput:
    """Successive packed outputs of one request as one RequestOutput (see _pack)."""
    if all(len(item) == 4 for item in items):  # one token each: the common case, built directly
        last = items[-1]
        text = items[0][0] if len(items) == 1 else "".join(item[0] for item in items)
        return RequestOutput(request_id, [CompletionOutput(0, text, [item[1] for item in items], None, None)], [],
                             None, False, last[2], last[3])
    return functools.reduce(merge_outputs, [_unpack(item, request_id) for item in items])


def _unpack(item: tuple, request_id: str) -> RequestOutput:
    if len(item) == 4:
        text, token_id, num_prompt_tokens, num_generated_tokens = item
        return RequestOutput(request_id, [CompletionOutput(0, text, [token_id], None, None)], [], None, False,
                             num_prompt_tokens, num_generated_tokens)
    outputs, prompt_logprobs, finished, num_prompt_tokens, num_generated_tokens = item
    return RequestOutput(request_id, [CompletionOutput(*c) for c in outputs], [], prompt_logprobs, finished,
                         num_prompt_tokens, num_generated_tokens)


def _widen(pipe: Connection) -> None:
    """A 1 MiB pipe instead of 64 KiB (Linux): dozens of steps' outputs, so that the engine process does not
    block on a send while the reader thread here waits its turn for the GIL."""
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (AttributeError, OSError):  # not Linux, or above the system's pipe-max-size: the default will do
        pass


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit status {code}"


# ---- the engine process ------------------------------------------------------------------------------


def _engine_main(build: BuildEngine, model: ModelSpec, config: EngineConfig, commands: Connection,
                 events: Connection, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = build(model, config)
    except ModelLoadError as err:
        events.send(("failed", str(err)))
        return
    except Exception as err:
        log.exception("the engine failed to start")
        events.send(("failed", f"the engine failed to start: {type(err).__name__}: {err}"))
        return
    adds_seen = 0

    def take(block: bool) -> list[Command]:
        nonlocal adds_seen
        batch: list[Command] = []
        while block or commands.poll():  # end-of-file (the server process is gone) raises EOFError here
            batch += commands.recv()
            block = False
        adds_seen += sum(kind == "add" for kind, _ in batch)
        return batch

    def emit(deliveries: list[Delivery]) -> None:
        events.send(("step", [(request_id, _pack(item)) for request_id, item in deliveries], engine_stats(engine),
                     adds_seen))

    try:
        events.send(("ready", engine.limits, engine_stats(engine)))
        run_step_loop(engine, take, emit)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.warning("the server process is gone: the engine process exits")
