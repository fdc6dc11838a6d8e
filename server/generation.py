"""One API request on the engine: its prompts submitted together, their outputs merged in arrival order.

A completion request may carry many prompts (lm-eval sends batches of them); each becomes one engine
request, all submitted at once so the scheduler batches them. Every output passes through here, which
is where metrics are fed and the request's log line is written. A client that goes away (watched while
no response has started; Starlette watches once a stream has) cancels the feeders, and leaving
the engine's generate early aborts the engine requests and frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from engine.async_engine import EngineOverloaded, EngineStopped
from engine.request import RequestOutput
from engine.sampling import SamplingParams, TokenLogprob
from server.errors import APIError, unavailable
from server.params import engine_error
from server.state import ServerState

request_log = logging.getLogger("deltaserve.requests")

_CLIENT_GONE = object()  # queue sentinel from the disconnect watcher


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


@dataclass
class Choice:
    """Everything one choice produced, for a non-streaming answer."""

    index: int  # prompt_index * n + the engine's choice index
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class _PromptTrack:
    prompt_tokens: int
    completion_tokens: int = 0
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)  # per choice
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False


class Generation:
    def __init__(self, state: ServerState, request_id: str, route: str, prompts: list[list[int]],
                 params: SamplingParams):
        self.state = state
        self.id = request_id
        self.route = route
        self.prompts = prompts
        self.params = params
        self.arrival = time.monotonic()
        self.tracks = [_PromptTrack(len(p)) for p in prompts]
        self.finish_reasons: dict[int, str] = {}
        self.status = 200  # for the log line: 4xx/5xx on refusal, 499 when the client left
        self._queue: asyncio.Queue = asyncio.Queue()
        self._feeders: list[asyncio.Task] = []
        self._watcher: asyncio.Task | None = None
        self._first: tuple | None = None
        self._open = len(prompts)
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, request: Request) -> None:
        """Submit every prompt and wait for the first output, so that a refusal (bad request, full
        queue, shutdown) is still an HTTP error and not a broken stream. Closes itself on failure."""
        try:
            self.state.check_accepting()
            for ids in self.prompts:  # refuse the whole request before any part of it runs
                try:
                    self.state.engine.validate(ids, self.params)
                except ValueError as err:
                    raise engine_error(err) from None
            self.state.active.add(self)
            self._watcher = asyncio.create_task(self._watch(request))
            self._feeders = [asyncio.create_task(self._feed(i, ids)) for i, ids in enumerate(self.prompts)]
            self._first = await self._next()
        except APIError as err:
            self.status = err.status
            self.close()
            raise
        except ClientGone:
            self.status = 499
            self.close()
            raise

    def stop_watching(self) -> None:
        """Hand disconnect detection over to the streaming response, which reads the socket itself."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def abort(self) -> None:
        """End every unfinished choice now (finish_reason "abort"); used when a drain runs out of time."""
        for i, track in enumerate(self.tracks):
            if not track.finished:
                self.state.engine.abort(self._engine_id(i))

    def close(self) -> None:
        """Idempotent and synchronous (it may run inside a cancelled scope): cancelling a feeder makes
        the engine's generate abort its request."""
        if self._closed:
            return
        self._closed = True
        self.stop_watching()
        for task in self._feeders:
            task.cancel()
        self.state.active.discard(self)
        if self._open and self._feeders:  # it ran, and ended early (client left, or failed): the rest is aborted
            self.status = 499 if self.status == 200 else self.status
            for index in range(len(self.prompts) * self.params.n):
                if index not in self.finish_reasons:
                    self.finish_reasons[index] = "abort"
                    self.state.metrics.choice_finished("abort")
        self._log()

    # ---- outputs --------------------------------------------------------------------------------

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) until every prompt is finished. Raises APIError, ClientGone."""
        item, self._first = self._first, None
        while True:
            if item is None:
                if not self._open:
                    return
                item = await self._next()
            prompt_index, output = item
            item = None
            self._observe(prompt_index, output)
            yield prompt_index, output

    async def collect(self) -> list[Choice]:
        """Run to the end and gather each choice's text, tokens and logprobs."""
        n = self.params.n
        choices = [Choice(i * n + c, i) for i in range(len(self.prompts)) for c in range(n)]
        async for prompt_index, output in self.outputs():
            for delta in output.outputs:
                choice = choices[prompt_index * n + delta.index]
                choice.text += delta.text
                choice.token_ids.extend(delta.token_ids)
                if delta.logprobs is not None:
                    choice.logprobs = (choice.logprobs or []) + delta.logprobs
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        return choices

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.tracks)

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens for t in self.tracks)

    # ---- internals ------------------------------------------------------------------------------

    def _engine_id(self, prompt_index: int) -> str:
        return f"{self.id}-{prompt_index}"

    async def _feed(self, prompt_index: int, ids: list[int]) -> None:
        try:
            async for output in self.state.engine.generate(self._engine_id(prompt_index), ids, self.params):
                self._queue.put_nowait((prompt_index, output))
        except Exception as err:  # handed to the consumer, which turns it into an HTTP error
            self._queue.put_nowait((prompt_index, err))

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._queue.put_nowait(_CLIENT_GONE)

    async def _next(self) -> tuple[int, RequestOutput]:
        item = await self._queue.get()
        if item is _CLIENT_GONE:
            raise ClientGone()
        prompt_index, output = item
        if isinstance(output, BaseException):
            raise self._as_api_error(output)
        return prompt_index, output

    def _as_api_error(self, err: BaseException) -> APIError:
        if isinstance(err, APIError):
            return err
        if isinstance(err, ValueError):
            return engine_error(err)
        if isinstance(err, EngineOverloaded):
            self.state.metrics.reject("queue_full")
            return unavailable(f"the server is busy ({err}); retry later")
        if isinstance(err, EngineStopped):
            return unavailable("the server is shutting down")
        return APIError(500, f"generation failed: {err}")

    def _observe(self, prompt_index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        metrics, track = self.state.metrics, self.tracks[prompt_index]
        if output.prompt_logprobs is not None:
            track.prompt_logprobs = output.prompt_logprobs
        new_tokens = any(delta.token_ids for delta in output.outputs)
        if new_tokens and track.first_token is None:
            track.first_token = now
            metrics.first_token(now - self.arrival, track.prompt_tokens)
        for delta in output.outputs:
            if delta.token_ids:
                last = track.last_token.get(delta.index)
                metrics.tokens(len(delta.token_ids), None if last is None else now - last)
                track.last_token[delta.index] = now
            if delta.finish_reason is not None:
                metrics.choice_finished(delta.finish_reason)
                self.finish_reasons[prompt_index * self.params.n + delta.index] = delta.finish_reason
        track.completion_tokens = output.num_generated_tokens
        if output.finished and not track.finished:
            track.finished = True
            self._open -= 1
            metrics.request_finished(now - self.arrival)

    def _log(self) -> None:
        firsts = [t.first_token for t in self.tracks if t.first_token is not None]
        # a refused request has no choices, and its n is unchecked: it may be 10**30
        choices = len(self.prompts) * self.params.n if self._feeders else 0
        request_log.info(json.dumps({
            "request_id": self.id, "route": self.route, "status": self.status,
            "prompts": len(self.prompts), "n": self.params.n,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": round(min(firsts) - self.arrival, 4) if firsts else None,
            "latency_s": round(time.monotonic() - self.arrival, 4),
            "finish_reasons": [self.finish_reasons.get(i) for i in range(choices)],
        }))
