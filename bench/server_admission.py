"""The app's own CPU per request, in one process, with no sockets and no engine: the FastAPI app that
`deltaserve serve` runs, called as uvicorn calls it (an ASGI scope, the body, a send that records what is
sent), in front of an engine stand-in that finishes every request with one token as soon as it is opened.
What is left is the server's work per request: routing, body parsing and validation, the Generation, the
response start, the one event, the teardown and the log line. Requests run one after another, so the
figure is CPU per request without the noise of other processes (bench/server_overhead.py measures the
whole server process, uvicorn and the engine pipe included, under a burst of concurrent clients).

    python bench/server_admission.py [--requests 3000] [--prompt-len 128] [--repeats 5] [--case completions]

Prints the median over repeats of CPU microseconds per request for each case: "completions", a streamed
/v1/completions request of prompt-len token ids with include_usage (bench/server_throughput.py's request,
here with one token); "whole", the same not streamed; "chat", a streamed chat request of one short message.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/, whose engine.py would hide the engine package
from server_throughput import TINY, prompts  # noqa: E402

from engine.async_engine import EngineClient, EngineStats  # noqa: E402
from engine.demo import write_gated_deltanet  # noqa: E402
from engine.engine import RequestLimits  # noqa: E402
from engine.loader import read_config_and_tokenizer  # noqa: E402
from engine.request import CompletionOutput, RequestOutput, merge_outputs  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from server.app import build_app  # noqa: E402
from server.serve import ServerConfig, settle_garbage_collector, setup_request_log, state_for  # noqa: E402

try:
    from uvloop import new_event_loop  # what uvicorn runs the app on, when installed
except ImportError:
    new_event_loop = None


class InstantEngine(EngineClient):
    """Each request opened gets one token, finished, on the event loop's next turn."""

    def __init__(self, vocab_size: int):
        super().__init__(max_queued_requests=1 << 30)
        self._limits = RequestLimits(vocab_size=vocab_size, max_model_len=None, max_num_seqs=1024)

    @property
    def limits(self) -> RequestLimits:
        return self._limits

    def num_queued(self) -> int:
        return 0

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        output = RequestOutput(request_id, [CompletionOutput(0, "a", [97], None, "length")], [], None, True,
                               len(prompt_ids), 1)
        asyncio.get_running_loop().call_soon(self._streams.deliver, [(request_id, output)])

    def abort(self, request_id: str) -> None:
        pass

    def merge(self, request_id: str, items: list[RequestOutput]) -> RequestOutput:
        return functools.reduce(merge_outputs, items)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 1024)


async def call(app, path: str, body: bytes) -> tuple[int, bytes]:
    """One request as uvicorn hands it over; its status and body. receive() reports a disconnect only once
    the response is complete, as uvicorn's does."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    done = asyncio.Event()
    sent = {"status": 0, "body": []}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        else:
            sent["body"].append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return sent["status"], b"".join(sent["body"])


def build(vocab_size: int):
    """The app on an InstantEngine, with the tokenizer and config of a tiny model written for it."""
    setup_request_log(False)
    model_dir = write_gated_deltanet(Path(tempfile.mkdtemp()) / "instant", TINY, seed=0)
    _, model_config, tokenizer = read_config_and_tokenizer(model_dir)
    state = state_for(InstantEngine(vocab_size), model_dir, model_config, tokenizer, ServerConfig(log_requests=False))
    return build_app(state)


async def per_request_us(app, path: str, body: bytes, requests: int) -> float:
    status, answer = await call(app, path, body)
    assert status == 200, answer[:300]
    start = time.process_time()
    for _ in range(requests):
        await call(app, path, body)
    return 1e6 * (time.process_time() - start) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", choices=["completions", "whole", "chat"], nargs="+",
                        default=["completions", "whole", "chat"], help="which requests (one, to profile it)")
    args = parser.parse_args()

    app = build(vocab_size=260)
    ids = prompts(1, args.prompt_len)[0]
    sampling = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}
    cases = {
        "completions": ("/v1/completions", {"prompt": ids, **sampling, "stream": True,
                                            "stream_options": {"include_usage": True}}),
        "whole": ("/v1/completions", {"prompt": ids, **sampling}),
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}], **sampling,
                                          "stream": True}),
    }
    settle_garbage_collector()
    rows = {}
    for name in args.case:
        path, body = cases[name]
        raw = json.dumps(body).encode()
        runs = []
        for _ in range(args.repeats):
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runs.append(runner.run(per_request_us(app, path, raw, args.requests)))
        rows[name] = {"us_per_request": statistics.median(runs), "runs": runs}
        print(f"{name:24s} {statistics.median(runs):7.1f} us/request (runs: "
              f"{', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "server_admission.json").write_text(json.dumps(
            {"prompt_len": args.prompt_len, "requests": args.requests, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
