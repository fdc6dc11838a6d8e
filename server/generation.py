"""One API request on the engine: its prompts submitted together, their outputs taken in arrival order.

A completion request may carry many prompts (lm-eval sends batches of them); each becomes one engine
request, all submitted at once so the scheduler batches them, all delivering into this request's one
inbox. What queued up there since the consumer last looked is taken at once, each prompt's outputs
merged into one (under load: one streamed event per choice per wake-up, not one per token). Every
output passes through here, which is where metrics are fed and the request's log line is written. A
client that goes away (watched from submission to the end, streaming or not) ends the consumer with
ClientGone, and closing aborts the engine requests still running, which frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from engine.async_engine import EngineOverloaded, EngineStopped, Inbox
from engine.request import RequestOutput
from engine.sampling import SamplingParams, TokenLogprob
from server.errors import APIError, bad_request, unavailable
from server.params import engine_error
from server.state import ServerState

request_log = logging.getLogger("deltaserve.requests")

_CLIENT_GONE = object()  # put in the inbox by the disconnect watcher


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
        self.prompt_param = "messages" if route == "chat" else "prompt"  # the field prompt errors name
        self.prompts = prompts
        self.params = params
        self.arrival = time.monotonic()
        self.tracks = [_PromptTrack(len(p)) for p in prompts]
        self.finish_reasons: dict[int, str] = {}
        self.status = 200  # for the log line: 4xx/5xx on refusal, 499 when the client left
        self._engine_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._inbox = Inbox()  # (prompt index, engine delivery), and (None, _CLIENT_GONE)
        self._submitted = 0  # prompts opened on the engine
        self._watcher: asyncio.Task | None = None
        self._first: tuple[list[tuple[int, RequestOutput]], Exception | None] | None = None
        self._open = len(prompts)
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, request: Request) -> None:
        """Submit every prompt and wait for the first output, so that a refusal (bad request, full
        queue, shutdown) is still an HTTP error and not a broken stream. Closes itself on failure."""
        try:
            self.state.check_accepting()
            queue = self.state.engine.max_queued_requests
            if len(self.prompts) > queue:  # each prompt queues as a request: not even an idle server takes them all
                raise bad_request(f"{len(self.prompts)} prompts in one request, more than the {queue} requests this "
                                  f"server queues; send them in smaller batches", "prompt")
            for ids in self.prompts:  # refuse the whole request before any part of it runs
                try:
                    self.state.engine.validate(ids, self.params)
                except ValueError as err:
                    raise engine_error(err, self.prompt_param) from None
            self.state.active.add(self)
            self._watcher = asyncio.create_task(self._watch(request))
            for i, ids in enumerate(self.prompts):
                try:
                    self.state.engine.open(self._engine_ids[i], ids, self.params, self._inbox, i)
                except Exception as err:
                    raise self._as_api_error(err) from None
                self._submitted += 1
            self._first = await self._take()
            if not self._first[0]:
                raise self._first[1]
        except APIError as err:
            self.status = err.status
            self.close()
            raise
        except ClientGone:
            self.status = 499
            self.close()
            raise

    def abort(self) -> None:
        """End every unfinished choice now (finish_reason "abort"); used when a drain runs out of time."""
        for i, track in enumerate(self.tracks[:self._submitted]):
            if not track.finished:
                self.state.engine.abort(self._engine_ids[i])

    def close(self) -> None:
        """Idempotent and synchronous (it may run inside a cancelled scope): what is still running on the
        engine is aborted."""
        if self._closed:
            return
        self._closed = True
        self._stop_watching()
        for i, track in enumerate(self.tracks[:self._submitted]):
            if not track.finished:
                self.state.engine.close(self._engine_ids[i], finished=False)
        self.state.active.discard(self)
        if self._open and self._submitted:  # it ran, and ended early (client left, or failed): the rest is aborted
            self.status = 499 if self.status == 200 else self.status
            # only the choices of prompts that reached the engine: a full queue may have refused the rest
            for index in range(self._submitted * self.params.n):
                if index not in self.finish_reasons:
                    self.finish_reasons[index] = "abort"
                    self.state.metrics.choice_finished("abort")
        self._log()

    # ---- outputs --------------------------------------------------------------------------------

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) until every prompt is finished. Raises APIError, ClientGone."""
        taken, self._first = self._first, None
        while True:
            if taken is None:
                if not self._open:
                    return
                taken = await self._take()
            merged, failure = taken
            taken = None
            for prompt_index, output in merged:
                self._observe(prompt_index, output)
                yield prompt_index, output
            if failure is not None:
                raise failure

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

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._inbox.put((None, _CLIENT_GONE))

    async def _take(self) -> tuple[list[tuple[int, RequestOutput]], Exception | None]:
        """What arrived since the last take: each prompt's outputs merged into one (in the order the
        prompts first appear), and the failure that came after them (APIError, ClientGone), if any."""
        runs: dict[int, list] = {}
        failure = None
        for prompt_index, item in await self._inbox.take():
            if item is _CLIENT_GONE:
                failure = ClientGone()
                break
            if isinstance(item, BaseException):
                failure = self._as_api_error(item)
                break
            run = runs.get(prompt_index)
            if run is None:
                runs[prompt_index] = [item]
            else:
                run.append(item)
        merge = self.state.engine.merge
        return [(i, merge(self._engine_ids[i], run)) for i, run in runs.items()], failure

    def _as_api_error(self, err: BaseException) -> APIError:
        if isinstance(err, APIError):
            return err
        if isinstance(err, ValueError):
            return engine_error(err, self.prompt_param)
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
            self.state.engine.close(self._engine_ids[prompt_index], finished=True)
            metrics.request_finished(now - self.arrival)

    def _log(self) -> None:
        if not request_log.isEnabledFor(logging.INFO):  # --no-request-log: not even the line's JSON (~10 us)
            return
        firsts = [t.first_token for t in self.tracks if t.first_token is not None]
        # a refused request has no choices, and its n is unchecked: it may be 10**30
        choices = len(self.prompts) * self.params.n if self._submitted else 0
        request_log.info(json.dumps({
            "request_id": self.id, "route": self.route, "status": self.status,
            "prompts": len(self.prompts), "n": self.params.n,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": round(min(firsts) - self.arrival, 4) if firsts else None,
            "latency_s": round(time.monotonic() - self.arrival, 4),
            "finish_reasons": [self.finish_reasons.get(i) for i in range(choices)],
        }))
