"""The server's own cost per streamed token, on any machine: the real server process (FastAPI, uvicorn, the
engine-process IPC, SSE) in front of a stand-in engine that makes one token per running request per step at
a fixed pace, with no model. Runs on CPU; the number to watch is the server process's CPU microseconds per
streamed token, and whether it keeps pace (HTTP tok/s over the pace's tok/s, the ratio
bench/server_throughput.py measures on a GPU with the real engine).

    python bench/server_overhead.py [--concurrency 64 256] [--steps-per-s 117] [--max-tokens 256] [--rounds 1]

The default pace is what the real engine makes on an H200 (bench/server_throughput.py's model): ~117 steps
per second. Clients are those of bench/server_throughput.py (raw sockets, separate processes).

The cost of admitting a request (request bytes to the first SSE event, and its teardown) shows with short
streams and a fast pace, where streaming is a small part of the work:

    python bench/server_overhead.py --max-tokens 2 --concurrency 256 --steps-per-s 500 --rounds 5

Each row also gives the server's CPU per request and when the streams' first bytes came (min / median /
max, s from the first request sent), with the clients' mean first bytes less the server's own mean TTFT
(which starts when the route handler runs): the time requests queued before their handler ran. With
--rounds N, N timed bursts on one server (after one warm-up), each reported, and their medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/, whose engine.py would hide the engine package
from engine.engine import EngineConfig, RequestLimits, StepCounters  # noqa: E402
from engine.engine_process import ModelSpec  # noqa: E402
from engine.request import CompletionOutput, RequestOutput  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

PROCESS_TIME = "/bench/process_time"  # a route of the bench's server only
# what the stand-in "generates", one character a token, cycled: mostly plain text, some that JSON escapes
TEXTS = list("The quick brown fox jumps over the lazy dog.\n") + ['"', "\\", "é", "\t"]


class PacedEngine:
    """LLMEngine's step interface as run_step_loop and engine_stats use it, with no model: each step
    (at most steps_per_s a second) gives every request one token, until its max_tokens."""

    def __init__(self, max_num_seqs: int, steps_per_s: float):
        self.limits = RequestLimits(vocab_size=260, max_model_len=None, max_num_seqs=max_num_seqs)
        self.requests: dict[str, tuple[SamplingParams, int, list[int]]] = {}  # id -> params, prompt length, tokens
        self.period = 1.0 / steps_per_s
        self._next_step = time.monotonic()
        self.counters = StepCounters()  # engine_stats reads it; the stand-in leaves it at zero

    # engine_stats reads these
    @property
    def scheduler(self):
        return argparse.Namespace(running=list(self.requests), waiting=[])

    @property
    def pool(self):
        return argparse.Namespace(capacity=self.limits.max_num_seqs,
                                  num_free=self.limits.max_num_seqs - len(self.requests))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        assert params.n == 1 and params.logprobs is None, "the stand-in makes one plain choice"
        self.requests[request_id] = (params, len(prompt_ids), [])

    def abort(self, request_id: str) -> RequestOutput | None:
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return None
        return RequestOutput(request_id, [CompletionOutput(0, "", [], None, "abort")], [], None, True, entry[1],
                             len(entry[2]))

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        delay = self._next_step - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next_step = max(self._next_step + self.period, time.monotonic() - self.period)
        outputs = []
        for request_id, (params, prompt_len, tokens) in list(self.requests.items()):
            position = len(tokens)
            tokens.append(position % len(TEXTS))
            finished = len(tokens) >= params.max_tokens
            outputs.append(RequestOutput(request_id, [CompletionOutput(0, TEXTS[tokens[-1]], [tokens[-1]], None,
                                                                       "length" if finished else None)],
                                         [], None, finished, prompt_len, len(tokens)))
            if finished:
                del self.requests[request_id]
        return outputs


def build_paced_engine(model: ModelSpec, config: EngineConfig, steps_per_s: float) -> PacedEngine:
    return PacedEngine(config.max_num_seqs, steps_per_s)


def serve_paced(model_dir: Path, port: int, concurrency: int, steps_per_s: float) -> None:
    """The server process: the real app and uvicorn, a ProcessEngine whose process steps a PacedEngine."""
    from engine.engine_process import ProcessEngine
    from engine.loader import read_config_and_tokenizer
    from server.serve import ServerConfig, make_server, settle_garbage_collector, setup_request_log, state_for

    setup_request_log(False)
    config = ServerConfig(port=port, log_level="error", log_requests=False)
    _, model_config, tokenizer = read_config_and_tokenizer(model_dir)
    engine = ProcessEngine(ModelSpec(model_dir), EngineConfig(max_num_seqs=concurrency),
                           build=functools.partial(build_paced_engine, steps_per_s=steps_per_s))
    engine.start()
    try:
        server = make_server(state_for(engine, model_dir, model_config, tokenizer, config), config)

        async def process_time() -> dict:  # all its threads, to the nanosecond (/proc's ticks are 10 ms)
            return {"s": time.process_time()}

        server.config.app.add_api_route(PROCESS_TIME, process_time, include_in_schema=False)
        settle_garbage_collector()
        server.run()
    finally:
        engine.stop()


_MEDIANS = ("tok_s", "ratio", "server_cpu_us_per_token", "server_cpu_us_per_request", "server_cpu_share",
            "client_cpu_share", "tokens_per_event", "first_bytes_min_s", "first_bytes_median_s", "first_bytes_max_s",
            "queued_before_handler_s")


def _process_time(url: str) -> float:
    return httpx.get(f"{url}{PROCESS_TIME}", timeout=10).json()["s"]


def _row(concurrency: int, steps_per_s: float, max_tokens: int, http: dict, cpu_s: float) -> dict:
    """cpu_s: the server process's CPU time over the run (to the nanosecond: http's server_cpu_* count ticks)."""
    pace = steps_per_s * concurrency
    first, timeline = http["timeline"]["first_bytes_s"], http["timeline"]
    return {"concurrency": concurrency, "pace_tok_s": pace, **http, "ratio": http["tok_s"] / pace,
            "server_cpu_us_per_token": 1e6 * cpu_s / (concurrency * max_tokens),
            "server_cpu_us_per_request": 1e6 * cpu_s / concurrency,
            "first_bytes_min_s": first[0], "first_bytes_median_s": first[1], "first_bytes_max_s": first[2],
            "queued_before_handler_s": timeline["mean_first_bytes_s"] - timeline["server_mean_ttft_s"]}


def _medians(runs: list[dict]) -> dict:
    return {key: None if any(run[key] is None for run in runs) else statistics.median(run[key] for run in runs)
            for key in _MEDIANS}


def _print_row(label: str, row: dict) -> None:
    nan = float("nan")
    print(f"{label}  pace {row['pace_tok_s']:7.0f} tok/s  http {row['tok_s']:7.0f} tok/s  ratio {row['ratio']:.3f}"
          f"  | server process {row['server_cpu_us_per_token'] or nan:5.1f} CPU us/token "
          f"({row['server_cpu_us_per_request'] or nan:6.1f} us/request), busy {row['server_cpu_share'] or nan:.2f}; "
          f"clients busy {row['client_cpu_share']:.2f}; {row['tokens_per_event']:.2f} tokens/event\n"
          f"{' ' * len(label)}  first bytes at {row['first_bytes_min_s']:.3f} / {row['first_bytes_median_s']:.3f} / "
          f"{row['first_bytes_max_s']:.3f} s (min / median / max); queued before the handler "
          f"{row['queued_before_handler_s']:.3f} s (mean first bytes - the server's mean TTFT)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps-per-s", type=float, default=117.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="timed bursts per concurrency (medians reported)")
    parser.add_argument("--port", type=int, default=8432)
    parser.add_argument("--serve", type=int, default=None, metavar="CONCURRENCY", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve_paced(Path(args.model_dir), args.port, args.serve, args.steps_per_s)
        return

    from server_throughput import TINY, http_streams, wait_healthy

    from engine.demo import write_gated_deltanet
    model_dir = write_gated_deltanet(Path(tempfile.mkdtemp()) / "paced", TINY, seed=0)  # its tokenizer and config
    rows = []
    for c in args.concurrency:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(c), "--model-dir", str(model_dir),
                                 "--port", str(args.port), "--steps-per-s", str(args.steps_per_s)])
        try:
            url = f"http://127.0.0.1:{args.port}"
            wait_healthy(proc, args.port)
            http_streams(url, c, args.prompt_len, args.max_tokens, 1, proc.pid)  # warm-up
            runs = []
            for i in range(args.rounds):
                cpu_s = _process_time(url)
                http = http_streams(url, c, args.prompt_len, args.max_tokens, 0, proc.pid)
                runs.append(_row(c, args.steps_per_s, args.max_tokens, http, _process_time(url) - cpu_s))
                if args.rounds > 1:
                    _print_row(f"C={c:4d} #{i + 1}", runs[-1])
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        if args.rounds == 1:
            rows.append(runs[0])
            _print_row(f"C={c:4d}", runs[0])
        else:
            median = {"concurrency": c, "pace_tok_s": runs[0]["pace_tok_s"], **_medians(runs)}
            rows.append({**median, "rounds": runs})
            _print_row(f"C={c:4d} median", median)
    result = {"steps_per_s": args.steps_per_s, "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "server_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
