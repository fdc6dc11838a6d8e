"""`deltaserve bench-serve`: load a running server with streaming completions and measure what users feel.

Each request is a synthetic prompt of exactly --input-len tokens, sent as token ids (sampled from the
server's own tokenization of a fixed English text, so no special tokens), asking for exactly
--output-len tokens (greedy, ignore_eos). Requests go out either as N concurrent streams (a new one as
soon as one ends) or as a Poisson process at --request-rate per second (optionally capped at
--concurrency in flight). The run is bounded by --num-requests and by --max-duration seconds; what is
still running then is cancelled and counted as unfinished. Ctrl-C stops the run the same way, and the
report (and --json) still covers what finished before it. A run in which every request that ran failed
reports as usual, then ends with an error (status 2), so a script cannot take it for a measurement. It only
ever talks to the URL it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from clients.bench_report import UNFINISHED, RequestRecord, render, summarize
from clients.client import DEFAULT_URL, AsyncClient
from clients.types import DeltaserveError

MAX_REQUESTS = 100_000
MAX_CONNECTIONS = 1024  # open connections at most, whatever the rate; beyond it requests wait for one
DEFAULT_CONCURRENCY = 8

# text the prompts' token ids are drawn from: ordinary words, so every id is an ordinary token
SOURCE_TEXT = (
    "A Gated DeltaNet layer keeps a fixed-size state for each head and updates it with every token: "
    "it decays what it remembers by a learned gate, then writes the new key and value with the delta "
    "rule, which first removes what the state already predicts for that key. The server keeps these "
    "states in slots, prefills prompts in chunks, and advances all running requests one token per step. "
    "Rivers carry sand to the sea; mountains rise slowly and wear away; the weather changes every day, "
    "and the market in the old town sells bread, cheese, apples, fish and flowers from early morning."
)


@dataclass(frozen=True)
class BenchConfig:
    url: str = DEFAULT_URL
    model: str | None = None  # None: the first model the server lists
    num_requests: int = 100
    concurrency: int | None = None  # most requests in flight; None: DEFAULT_CONCURRENCY without a rate
    request_rate: float | None = None  # requests per second, Poisson arrivals; None: as fast as concurrency allows
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    max_duration_s: float = 600.0
    timeout_s: float = 300.0  # per request, for connecting and between streamed events
    progress_interval_s: float = 10.0  # how often a progress line is written when stderr is not a terminal

    def __post_init__(self) -> None:
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"--num-requests must be between 1 and {MAX_REQUESTS}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--input-len and --output-len must be at least 1")
        # `not > 0` refuses NaN too: a NaN --max-duration ended the run at once with every request unfinished
        if not (self.max_duration_s > 0 and self.timeout_s > 0 and self.progress_interval_s > 0):
            raise ValueError("--max-duration, --timeout and --progress-interval must be > 0")

    @property
    def in_flight_limit(self) -> int:
        if self.concurrency is not None:
            return min(self.concurrency, MAX_CONNECTIONS)
        return MAX_CONNECTIONS if self.request_rate is not None else DEFAULT_CONCURRENCY


async def synthetic_prompts(client: AsyncClient, config: BenchConfig, rng: random.Random) -> list[list[int]]:
    """num_requests prompts of exactly input_len token ids, each drawn at random from SOURCE_TEXT's tokens."""
    tokens = await client.tokenize(SOURCE_TEXT, add_special_tokens=False)
    if tokens.max_model_len is not None and config.input_len + config.output_len > tokens.max_model_len:
        raise ValueError(f"--input-len + --output-len is {config.input_len + config.output_len}, more than the "
                         f"server's context limit of {tokens.max_model_len} tokens")
    pool = sorted(set(tokens.tokens))
    if not pool:
        raise ValueError("the server's tokenizer gave no tokens for the prompt text")
    return [rng.choices(pool, k=config.input_len) for _ in range(config.num_requests)]


class Progress:
    """A bar redrawn in place on a terminal; otherwise a plain line every interval."""

    def __init__(self, total: int, out: TextIO, interval_s: float):
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self.done = self.failed = self.running = 0

    def line(self, elapsed_s: float) -> str:
        status = (f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
                  f"{elapsed_s:.1f} s")
        if not self.tty:
            return f"bench-serve: {status}"
        width = 30
        filled = width * self.done // self.total
        return f"[{'#' * filled}{'.' * (width - filled)}] {status}"

    async def tick(self, start: float) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.show(time.perf_counter() - start)

    def show(self, elapsed_s: float, final: bool = False) -> None:
        if self.tty:
            self.out.write("\r\033[K" + self.line(elapsed_s) + ("\n" if final else ""))
        else:
            self.out.write(self.line(elapsed_s) + "\n")
        self.out.flush()


async def _one(client: AsyncClient, model: str, prompt: list[int], record: RequestRecord, config: BenchConfig,
               start: float, gate: asyncio.Semaphore, progress: Progress) -> None:
    async with gate:
        progress.running += 1
        sent = time.perf_counter()
        record.start_s = sent - start
        try:
            stream = await client.stream_complete(prompt, model=model, max_tokens=config.output_len,
                                                  temperature=0.0, ignore_eos=True)
            last = None
            async with stream:
                async for _delta in stream:
                    now = time.perf_counter()
                    if last is None:
                        record.ttft_s = now - sent
                    else:
                        record.itl_s.append(now - last)
                    last = now
            record.e2e_s = time.perf_counter() - sent
            record.output_tokens = stream.usage.completion_tokens if stream.usage else len(stream.parts)
            record.finish_reason = stream.finish_reason
        except asyncio.CancelledError:
            record.error = UNFINISHED  # bench() adds what cut it off
            raise
        except DeltaserveError as err:
            record.error = str(err)
        except Exception as err:  # a malformed answer: count it, keep loading
            record.error = f"{type(err).__name__}: {err}"
        finally:
            progress.running -= 1
            progress.done += record.ok
            progress.failed += record.error is not None and not record.error.startswith(UNFINISHED)


async def _drive(client: AsyncClient, model: str, prompts: list[list[int]], records: list[RequestRecord],
                 config: BenchConfig, rng: random.Random, start: float, progress: Progress) -> None:
    gate = asyncio.Semaphore(config.in_flight_limit)
    tasks: list[asyncio.Task] = []
    next_at = 0.0
    try:
        for prompt, record in zip(prompts, records, strict=True):
            if config.request_rate is not None:
                await asyncio.sleep(max(0.0, start + next_at - time.perf_counter()))
                next_at += rng.expovariate(config.request_rate)
            tasks.append(asyncio.create_task(_one(client, model, prompt, record, config, start, gate, progress)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _served_model(client: AsyncClient) -> str:
    """The first model the server lists; DeltaserveError when it lists none (a server that is not ours)."""
    models = await client.models()
    if not models:
        raise DeltaserveError("the server lists no models: name one with --model", status=None)
    return models[0].id


async def bench(config: BenchConfig, progress_out: TextIO) -> dict[str, Any]:
    """Run the load and return the full record: config, model, summary, one entry per request."""
    rng = random.Random(config.seed)
    async with AsyncClient(config.url, timeout=config.timeout_s, max_connections=config.in_flight_limit) as client:
        model = config.model or await _served_model(client)
        prompts = await synthetic_prompts(client, config, rng)
        records = [RequestRecord(index=i, prompt_tokens=len(p)) for i, p in enumerate(prompts)]
        progress = Progress(config.num_requests, progress_out, config.progress_interval_s)
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        ticker = asyncio.create_task(progress.tick(start))
        stopped_by = None  # what ended the run before every request did
        try:
            await asyncio.wait_for(_drive(client, model, prompts, records, config, rng, start, progress),
                                   config.max_duration_s)
        except asyncio.TimeoutError:
            stopped_by = "--max-duration"  # the requests still running were cancelled and marked unfinished
        except asyncio.CancelledError:
            # Ctrl-C: asyncio.run cancels this task (Python 3.11+; once, a second Ctrl-C ends it outright; on
            # 3.10 Ctrl-C is a KeyboardInterrupt that never comes here). Minutes of measurements would be lost
            # with it, so take the cancellation and report like --max-duration.
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # 3.11+: no longer counted as cancelling, so the awaits below run
                task.uncancel()
            stopped_by = "Ctrl-C"
        finally:
            ticker.cancel()
        duration = time.perf_counter() - start
        progress.show(duration, final=True)
    for record in records:
        if record.start_s is None:
            record.error = f"{UNFINISHED}: never sent before {stopped_by}"
        elif record.error == UNFINISHED:
            record.error = f"{UNFINISHED}: cut off by {stopped_by}"
    return {"tool": "deltaserve bench-serve", "started_at": started_at, "config": asdict(config), "model": model,
            "stopped_by": stopped_by, "summary": summarize(records, duration),
            "requests": [asdict(r) | {"tpot_s": r.tpot_s} for r in records]}


def _title(config: BenchConfig, model: str) -> str:
    mode = (f"Poisson rate {config.request_rate:g} req/s" if config.request_rate is not None else "")
    if config.concurrency is not None or config.request_rate is None:
        mode += (", " if mode else "") + f"concurrency {config.in_flight_limit}"
    return (f"deltaserve bench-serve: {config.num_requests} requests to {config.url} (model {model}), "
            f"{config.input_len} input / {config.output_len} output tokens, {mode}")


def run_bench_serve(args: argparse.Namespace) -> None:
    config = BenchConfig(url=args.url, model=args.model, num_requests=args.num_requests,
                         concurrency=args.concurrency, request_rate=args.request_rate, input_len=args.input_len,
                         output_len=args.output_len, seed=args.seed, max_duration_s=args.max_duration,
                         timeout_s=args.timeout, progress_interval_s=args.progress_interval)
    record = asyncio.run(bench(config, sys.stderr))
    print(render(record["summary"], _title(config, record["model"])))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if record["stopped_by"] == "Ctrl-C":
        print("bench-serve: stopped by Ctrl-C; the report covers the requests that finished before it",
              file=sys.stderr)
        raise KeyboardInterrupt  # the command's status says it was interrupted (130)
    summary = record["summary"]
    if summary["completed"] == 0 and summary["failed"] > 0:  # nothing measured: a script must not read success
        first = next(r["error"] for r in record["requests"] if r["error"] is not None)
        raise DeltaserveError(f"bench-serve: all {summary['failed']} requests that ran failed (the first: {first})")
