"""The engine as the server uses it: submit a request, iterate its outputs, abort.

The step loop runs in one background thread (the model and the slot pool belong to it alone);
coroutines talk to it through a command queue, and it hands outputs back to each request's
asyncio queue on the event loop. A consumer that stops iterating (a client that went away)
aborts its request, which frees its slots before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.engine import LLMEngine
from engine.request import RequestOutput, merge_outputs
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The waiting queue is full; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # requests admitted (holding slots)
    num_waiting: int  # requests queued for a slot
    slots_used: int
    slots_total: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int = 1024):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams and _pending between loop and thread
        self._pending = 0  # submitted, not yet admitted by the scheduler
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> EngineStats:
        sched, pool = self.engine.scheduler, self.engine.pool
        return EngineStats(len(sched.running), len(sched.waiting) + self._commands.qsize(),
                           pool.capacity - pool.num_free, pool.capacity)

    # ---- requests -------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced; the last has finished=True. Raises
        ValueError for a request that can never run, EngineOverloaded when the queue is full."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        self.engine.validate(prompt_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._pending + len(self.engine.scheduler.waiting) >= self.max_queued_requests:
                raise EngineOverloaded(f"{self.max_queued_requests} requests are already waiting")
            self._pending += 1
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", (request_id, prompt_ids, params)))
        finished = False
        held = None  # an error taken from the queue behind outputs that go out first
        try:
            while not finished:
                item = held if held is not None else await stream.get()
                held = None
                if isinstance(item, BaseException):
                    raise item
                # Whatever else queued up while this consumer was busy goes out with it: under
                # load the event loop then handles one event per request per wake-up, not one per
                # token, and keeps pace with the engine.
                while not item.finished and not stream.empty():
                    later = stream.get_nowait()
                    if isinstance(later, BaseException):
                        held = later
                        break
                    item = merge_outputs(item, later)
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (or failed): free the slots now
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            block = not self.engine.has_work()
            try:
                command = self._commands.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._fail_all(EngineStopped("the engine stopped"))
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_work():
                try:
                    outputs = self.engine.step()
                except Exception as err:  # a bug or an OOM: fail what was running, keep serving
                    log.exception("engine step failed")
                    self._fail_all(RuntimeError(f"engine step failed: {err}"))
                    continue
                self._deliver_step(outputs)

    def _handle(self, command: tuple) -> None:
        kind, payload = command
        if kind == "add":
            request_id, prompt_ids, params = payload
            with self._lock:
                self._pending -= 1
            if request_id not in self._streams:
                return  # aborted before it arrived
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except Exception as err:
                self._deliver(request_id, err)
        elif kind == "abort":
            output = self.engine.abort(payload)
            if output is not None:
                self._deliver(payload, output)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, error)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs in one wake-up of each event loop (not one per request: each wake-up
        costs the loop a self-pipe read and a callback while it should be writing responses)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for output in outputs:
                target = self._streams.get(output.request_id)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], output))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
