"""The engine as the server uses it: submit a request, take its outputs, abort.

The step loop runs off the event loop: in a background thread here (AsyncEngine), or in a process of
its own (engine/engine_process.py). Either way coroutines hand it commands, and what each step produces
comes back to the requests' inboxes in one event-loop wake-up, in the form the engine delivers it (the
engine process's compact tuples are made into RequestOutputs only when taken, one per taking). A
consumer that leaves early (a client that went away) aborts its request, which frees its slots before
the next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from engine.engine import LLMEngine, RequestLimits
from engine.request import RequestOutput, merge_outputs
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)

# What a request gets from the engine: an output, or the error that ends it.
Delivery = tuple[str, RequestOutput | BaseException]
# To the step loop: ("add", (request_id, prompt_ids, params)), ("abort", request_id) or ("stop", None).
Command = tuple[str, object]


class EngineOverloaded(Exception):
    """The waiting queue is full; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class EngineDead(Exception):
    """The engine process exited while serving; nothing more can be generated."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # requests admitted (holding slots)
    num_waiting: int  # requests queued for a slot
    slots_used: int
    slots_total: int
    alive: bool = True  # False once the engine process has died
    steps: int = 0  # engine steps since start-up (engine.engine.StepCounters)
    step_seconds: float = 0.0
    overlapped_steps: int = 0
    kernel_builds: int = 0
    kernel_build_seconds: float = 0.0


def engine_stats(engine: LLMEngine) -> EngineStats:
    sched, pool, counters = engine.scheduler, engine.pool, engine.counters
    return EngineStats(len(sched.running), len(sched.waiting), pool.capacity - pool.num_free, pool.capacity,
                       steps=counters.steps, step_seconds=counters.step_seconds,
                       overlapped_steps=counters.overlapped_steps, kernel_builds=counters.kernel_builds,
                       kernel_build_seconds=counters.kernel_build_seconds)


# ---- the step loop, in a thread or in the engine process ---------------------------------------------


def run_step_loop(engine: LLMEngine, take: Callable[[bool], list[Command]],
                  emit: Callable[[list[Delivery]], None]) -> None:
    """Until a stop command: take the pending commands (take(block) waits for one only when the engine
    is idle), apply them, step, and emit everything this produced as one list. On stop, every request
    still in the engine ends with EngineStopped."""
    while True:
        deliveries: list[Delivery] = []
        for kind, payload in take(not engine.has_work()):
            if kind == "stop":
                emit(deliveries + _fail_all(engine, EngineStopped("the engine stopped")))
                return
            deliveries += _apply(engine, kind, payload)
        if engine.has_work():
            try:
                deliveries += [(output.request_id, output) for output in engine.step()]
            except Exception as err:  # a bug or an OOM: fail what was running, keep serving
                log.exception("engine step failed")
                deliveries += _fail_all(engine, RuntimeError(f"engine step failed: {err}"))
        emit(deliveries)


def _apply(engine: LLMEngine, kind: str, payload) -> list[Delivery]:
    if kind == "add":
        request_id, prompt_ids, params = payload
        try:
            engine.add_request(request_id, prompt_ids, params)
        except ValueError as err:
            return [(request_id, ValueError(str(err)))]
        except Exception as err:  # as a plain RuntimeError: it may cross a process boundary
            return [(request_id, RuntimeError(f"the engine refused the request: {err}"))]
        return []
    assert kind == "abort", f"unknown engine command {kind!r}"
    output = engine.abort(payload)
    return [] if output is None else [(payload, output)]


def _fail_all(engine: LLMEngine, error: Exception) -> list[Delivery]:
    failed = []
    for request_id in list(engine.requests):
        engine.abort(request_id)
        failed.append((request_id, error))
    return failed


# ---- streams, on the event loop -----------------------------------------------------------------------


class Inbox:
    """What the engine delivered to one consumer, not yet taken; taken all at once, so that a consumer
    that fell behind the engine gets what queued up in one piece (under load: one streamed event per
    request per wake-up, not one per token). Lighter than asyncio.Queue, which this replaces on the
    per-token path: one future per wait, none per item. Used on its event loop's thread only."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list = []
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class StreamTable:
    """Where every open request's deliveries go: an Inbox, and the tag they carry there. Filled from the
    thread that receives the engine's deliveries; one step's deliveries reach each event loop in one
    wake-up (not one per request: each wake-up costs the loop a self-pipe read and a callback while it
    should be writing responses)."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Inbox, object]] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, inbox: Inbox, tag: object) -> None:
        with self._lock:
            assert request_id not in self._streams, f"duplicate request id {request_id}"
            self._streams[request_id] = (asyncio.get_running_loop(), inbox, tag)

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def deliver(self, deliveries: list[tuple[str, object]]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Inbox, tuple[object, object]]]] = {}
        with self._lock:
            streams = self._streams
            for request_id, item in deliveries:
                target = streams.get(request_id)
                if target is not None:
                    loop, inbox, tag = target
                    batch = batches.get(loop)
                    if batch is None:
                        batch = batches[loop] = []
                    batch.append((inbox, (tag, item)))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these streams
                pass

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            request_ids = list(self._streams)
        self.deliver([(request_id, error) for request_id in request_ids])


def _put_all(items: list[tuple[Inbox, tuple[object, object]]]) -> None:
    for inbox, item in items:
        inbox.put(item)


class EngineClient:
    """What the server needs from an engine, wherever its step loop runs: open/close a request whose
    deliveries land in an Inbox (or iterate one with generate), merge, abort, validate, max_model_len,
    stats, start and stop. Subclasses submit commands and deliver into self._streams."""

    def __init__(self, max_queued_requests: int):
        self.max_queued_requests = max_queued_requests
        self._streams = StreamTable()
        self._stopping = False
        self._error: BaseException | None = None  # set when the engine can no longer run anything

    # ---- to provide -----------------------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        raise NotImplementedError

    def num_queued(self) -> int:
        """Requests submitted and not yet admitted by the scheduler."""
        raise NotImplementedError

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def merge(self, request_id: str, items: list) -> RequestOutput:
        """A request's deliveries that are outputs (as they arrived, in the form this engine delivers
        them) as one RequestOutput: each choice's deltas joined in order."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------

    @property
    def error(self) -> BaseException | None:
        """Why the engine can no longer run anything (its process died), or None."""
        return self._error

    @property
    def max_model_len(self) -> int | None:
        return self.limits.max_model_len

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError with a user-facing message for a request that can never run."""
        self.limits.check(prompt_ids, params)

    def open(self, request_id: str, prompt_ids: list[int], params: SamplingParams, inbox: Inbox,
             tag: object = None) -> None:
        """Submit a request; each of its deliveries lands in inbox as (tag, item), item being an output
        (give a run of them to merge) or the exception that ends it. Call close when done with it. Raises
        ValueError for a request that can never run, EngineOverloaded when the queue is full,
        EngineStopped when shutting down, EngineDead when the engine process is gone."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        self.validate(prompt_ids, params)
        if self.num_queued() >= self.max_queued_requests:
            raise EngineOverloaded(f"{self.max_queued_requests} requests are already waiting")
        self._streams.open(request_id, inbox, tag)
        if self._error is not None:  # checked after open: a failure from now on reaches this stream
            self._streams.close(request_id)
            raise self._error
        self._submit(request_id, prompt_ids, params)

    def close(self, request_id: str, finished: bool) -> None:
        """Stop delivering to the request's inbox; abort it (free its slots now) unless it finished."""
        if not finished and self._error is None:
            self.abort(request_id)
        self._streams.close(request_id)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced, what queued up merged; the last has
        finished=True. Raises as open does; a consumer that stops iterating aborts the request."""
        inbox = Inbox()
        finished = False
        self.open(request_id, prompt_ids, params, inbox)
        try:
            while not finished:
                items = [item for _, item in await inbox.take()]
                failed = next((i for i, item in enumerate(items) if isinstance(item, BaseException)), len(items))
                if failed:
                    output = self.merge(request_id, items[:failed])
                    output.prompt_token_ids = prompt_ids  # the engine process does not send it back
                    finished = output.finished
                    yield output
                if failed < len(items):
                    raise items[failed]
        finally:
            self.close(request_id, finished)


class AsyncEngine(EngineClient):
    """The step loop in a thread of this process: the model and the slot pool belong to that thread."""

    def __init__(self, engine: LLMEngine, max_queued_requests: int = 1024):
        super().__init__(max_queued_requests)
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _pending between the event loop and the thread
        self._pending = 0  # submitted, not yet taken by the step loop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=run_step_loop, args=(self.engine, self._take, self._streams.deliver),
                                        name="deltaserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> EngineStats:
        stats = engine_stats(self.engine)
        return replace(stats, num_waiting=stats.num_waiting + self._pending)

    @property
    def limits(self) -> RequestLimits:
        return self.engine.limits

    def num_queued(self) -> int:
        return self._pending + len(self.engine.scheduler.waiting)

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            self._pending += 1
        self._commands.put(("add", (request_id, prompt_ids, params)))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def merge(self, request_id: str, items: list[RequestOutput]) -> RequestOutput:
        return functools.reduce(merge_outputs, items)

    def _take(self, block: bool) -> list[Command]:
        commands = []
        try:
            commands.append(self._commands.get(block=block))
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        adds = sum(kind == "add" for kind, _ in commands)
        if adds:
            with self._lock:
                self._pending -= adds
        return commands
