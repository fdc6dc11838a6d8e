"""HTTP streaming throughput vs the engine alone, same model, same requests, same run.

For each concurrency C: (1) the engine alone: LLMEngine driven in this process, C requests added at once,
stepped until all finish; (2) the server: `python -m server` as a subprocess with the same engine options,
C concurrent streaming /v1/completions requests from client processes (raw sockets: each stream is read
as bytes and only its last event, the usage chunk, is parsed, so the clients cost a fraction of the
server). Each request: a random token-id prompt of --prompt-len, --max-tokens greedy tokens with
ignore_eos. Throughput = generated tokens / wall time from the first request to the last token. Also
reported: the server process's own CPU time per generated token and as a share of the wall time (its
engine process not included), the clients' CPU share, and tokens per SSE event (above 1 when the
server falls behind and merges what queued up). Prints a table and writes JSON to
$OUT/server_throughput.json if OUT is set.

    python bench/server_throughput.py [--concurrency 64 256] [--prompt-len 128] [--max-tokens 256]
                                      [--engine-process auto|on|off] [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx  # only to poll /health
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from engine.demo import write_gated_deltanet  # noqa: E402
from engine.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

# a GDN shaped like the paper's 340M-1.3B models (head_dim 256, expand_v 2), 12 layers, random bf16 weights;
# the byte tokenizer's vocabulary keeps the LM head small, which makes server overhead relatively larger
CONFIG = {"model_type": "gated_deltanet", "vocab_size": 260, "hidden_size": 1024, "num_hidden_layers": 12,
          "num_heads": 4, "head_dim": 256, "expand_v": 2.0, "hidden_ratio": 4, "tie_word_embeddings": True,
          "use_gate": True, "attn": None, "dtype": "bfloat16"}
TINY = {**CONFIG, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 16, "expand_v": 1.0,
        "dtype": "float32"}  # --tiny: a CPU smoke run of the bench itself, not a measurement
CLIENT_PROCS = 4  # raw-socket clients that parse only each stream's last event: a few processes are plenty


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=gen).tolist() for _ in range(count)]


_COUNTERS = ("steps", "step_seconds", "overlapped_steps", "kernel_builds", "kernel_build_seconds")
_METRIC_OF = {"steps": "deltaserve:engine_steps_total", "step_seconds": "deltaserve:engine_step_seconds_total",
              "overlapped_steps": "deltaserve:engine_overlapped_decode_steps_total",
              "kernel_builds": "deltaserve:engine_kernel_builds_total",
              "kernel_build_seconds": "deltaserve:engine_kernel_build_seconds_total",
              # the server's own view of time to first token: from its handler's start, not the client's send
              "ttft_sum": "deltaserve:time_to_first_token_seconds_sum",
              "ttft_count": "deltaserve:time_to_first_token_seconds_count"}


def burst_seed(repeat: int) -> int:
    """The prompts' seed of timed burst `repeat` (the same for the engine alone and HTTP; 1 is the warm-up's)."""
    return 0 if repeat == 0 else 10 + repeat


def engine_alone(loaded, concurrency: int, prompt_len: int, max_tokens: int,
                 repeats: int = 1) -> list[tuple[float, dict]]:
    """Per timed burst: generated tok/s of the engine stepped in this process, and its step counters."""
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=max(2048, concurrency)))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def run(batch: list[list[int]], tag: str) -> tuple[int, float]:
        start = time.perf_counter()
        for i, ids in enumerate(batch):
            engine.add_request(f"{tag}{i}", ids, params)
        tokens = 0
        while engine.has_work():
            tokens += sum(len(c.token_ids) for out in engine.step() for c in out.outputs)
        if loaded.model.device.type == "cuda":
            torch.cuda.synchronize()
        return tokens, time.perf_counter() - start

    run(prompts(concurrency, prompt_len, seed=1), "warm")  # compiles kernels for these shapes
    bursts = []
    for repeat in range(repeats):
        before = {name: getattr(engine.counters, name) for name in _COUNTERS}
        tokens, seconds = run(prompts(concurrency, prompt_len, burst_seed(repeat)), f"r{repeat}-")
        bursts.append((tokens / seconds, {name: getattr(engine.counters, name) - before[name] for name in _COUNTERS}))
    return bursts


def _server_engine_counters(url: str) -> dict:
    """The server's engine step counters and its time-to-first-token total and count, from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition("{")
        if name in _METRIC_OF.values():
            values[name] = float(value.rsplit(" ", 1)[1])
    return {key: values.get(metric, 0.0) for key, metric in _METRIC_OF.items()}


def _request_bytes(ids: list[int], max_tokens: int) -> bytes:
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


async def _stream_one(host: str, port: int, request: bytes) -> tuple[int, int, float, float]:
    """One streaming request on a connection of its own, read as raw bytes until the server closes it:
    (completion tokens from the final usage chunk, SSE events, time.time() of its first and last bytes).
    Nothing is parsed per event, so that a client costs a small fraction of what the server spends on
    the same stream."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    received = await reader.read(1 << 16)
    first = time.time()
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    events, tail = 0, b""
    while received:
        # "data: " is 6 bytes: an event marker split between two reads is whole in tail[-5:] + received
        seam = tail[-5:] + received
        events += seam.count(b"data: ")
        tail = (tail + received)[-(1 << 13):]
        received = await reader.read(1 << 16)
    writer.close()
    assert tail.rstrip(b"\r\n0").endswith(b"data: [DONE]"), tail[-300:]
    usage_at = tail.rindex(b'data: {"')
    usage = json.loads(tail[usage_at + len(b"data: "):tail.index(b"\n\n", usage_at)])["usage"]
    return usage["completion_tokens"], events, first, time.time()


def _client(url: str, batch: list[list[int]], max_tokens: int, ready, go, results) -> None:
    host, port = url.removeprefix("http://").split(":")
    requests = [_request_bytes(ids, max_tokens) for ids in batch]

    async def run() -> tuple[int, int, float, float, float, list[tuple[float, float]]]:
        start, cpu = time.time(), time.process_time()
        counts = await asyncio.gather(*(_stream_one(host, int(port), r) for r in requests))
        return (sum(c[0] for c in counts), sum(c[1] for c in counts), start, time.time(),
                time.process_time() - cpu, [(c[2], c[3]) for c in counts])

    ready.put(None)
    go.wait()
    results.put(asyncio.run(run()))


def _cpu_seconds(pid: int) -> float | None:
    """A process's own user + system CPU time (its children not included), from /proc on Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def http_streams(url: str, concurrency: int, prompt_len: int, max_tokens: int, seed: int,
                 server_pid: int) -> dict:
    batch = prompts(concurrency, prompt_len, seed)
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    shares = [batch[i::CLIENT_PROCS] for i in range(CLIENT_PROCS)]
    procs = [ctx.Process(target=_client, args=(url, share, max_tokens, ready, go, results))
             for share in shares if share]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    counters = _server_engine_counters(url)
    server_cpu = _cpu_seconds(server_pid)
    go.set()
    parts = [results.get(timeout=900) for _ in procs]
    server_cpu = None if server_cpu is None else _cpu_seconds(server_pid) - server_cpu
    after = _server_engine_counters(url)
    counters = {name: after[name] - counters[name] for name in _METRIC_OF}
    for p in procs:
        p.join()
    tokens, events = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert tokens == concurrency * max_tokens, (tokens, concurrency * max_tokens)
    start = min(p[2] for p in parts)
    wall = max(p[3] for p in parts) - start
    firsts = sorted(t[0] - start for p in parts for t in p[5])  # each stream's first bytes (its response head)
    lasts = sorted(t[1] - start for p in parts for t in p[5])
    # when streams began and ended (s from the first request): a wide spread of first bytes is arrival and
    # admission; of last bytes, streams that started late or were served unevenly
    timeline = {"first_bytes_s": [firsts[0], firsts[len(firsts) // 2], firsts[-1]],
                "last_bytes_s": [lasts[0], lasts[len(lasts) // 2], lasts[-1]],
                "mean_first_bytes_s": sum(firsts) / len(firsts),
                "server_mean_ttft_s": counters.pop("ttft_sum") / max(counters.pop("ttft_count"), 1)}
    return {"tok_s": tokens / wall, "tokens_per_event": tokens / max(events, 1), "engine_counters": counters,
            "timeline": timeline,
            "server_cpu_us_per_token": None if server_cpu is None else 1e6 * server_cpu / tokens,
            "server_cpu_share": None if server_cpu is None else server_cpu / wall,
            "client_cpu_share": sum(p[4] for p in parts) / wall}


def report_row(concurrency: int, engine_tps: float, alone_counters: dict, http: dict) -> dict:
    """Print one burst's comparison (throughput, server and client CPU, timeline, step counters); its row."""
    http_tps = http.pop("tok_s")
    us = http["server_cpu_us_per_token"]
    print(f"C={concurrency:4d}  engine {engine_tps:9.0f} tok/s  http {http_tps:9.0f} tok/s  "
          f"ratio {http_tps / engine_tps:.3f}  | server process {us or float('nan'):5.1f} CPU us/token, "
          f"busy {http['server_cpu_share'] or float('nan'):.2f}; clients busy {http['client_cpu_share']:.2f}; "
          f"{http['tokens_per_event']:.2f} tokens/event", flush=True)
    first, last = http["timeline"]["first_bytes_s"], http["timeline"]["last_bytes_s"]
    print(f"        streams' first bytes at {first[0]:.3f} / {first[1]:.3f} / {first[2]:.3f} s (min / median / "
          f"max), last at {last[0]:.3f} / {last[1]:.3f} / {last[2]:.3f} s; mean first bytes "
          f"{http['timeline']['mean_first_bytes_s']:.3f} s, mean TTFT the server saw "
          f"{http['timeline']['server_mean_ttft_s']:.3f} s (the difference: before its handler ran)",
          flush=True)
    for where, n in (("alone", alone_counters), ("server", http["engine_counters"])):
        # Same work both ways: more steps, or longer ones, behind the server say where the time went.
        print(f"        engine {where:6s}: {n['steps']:6.0f} steps, {n['step_seconds']:6.3f} s in steps "
              f"({1e3 * n['step_seconds'] / max(n['steps'], 1):.3f} ms each), "
              f"{n['overlapped_steps']:.0f} overlapped, {n['kernel_builds']:.0f} kernels built in steps "
              f"({n['kernel_build_seconds']:.2f} s)", flush=True)
    return {"concurrency": concurrency, "engine_tok_s": engine_tps, "http_tok_s": http_tps,
            "ratio": http_tps / engine_tps, "engine_alone_counters": alone_counters, **http}


def serve(model_dir: Path, device: str, concurrency: int, port: int, engine_process: str | None) -> subprocess.Popen:
    options = [] if engine_process is None else ["--engine-process", engine_process]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(port),
                             "--device", device,
                             "--max-num-seqs", str(concurrency), "--max-num-batched-tokens",
                             str(max(2048, concurrency)), "--no-request-log", *options], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    wait_healthy(proc, port)
    return proc


def wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "server exited"
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the bench runs, on CPU too")
    parser.add_argument("--engine-process", choices=["auto", "on", "off"], default=None,
                        help="passed to the server (default: the server's own default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed bursts per concurrency, both ways (a short burst's ratio varies run to run: "
                             "the median and the lowest are printed)")
    args = parser.parse_args()

    config = TINY if args.tiny else CONFIG
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model_dir = write_gated_deltanet(Path(tempfile.mkdtemp()) / "gdn", config, seed=0, dtype=dtype)
    loaded = load_model(model_dir, device=args.device)
    rows = []
    for c in args.concurrency:
        alone = engine_alone(loaded, c, args.prompt_len, args.max_tokens, args.repeats)
        proc = serve(model_dir, args.device, c, args.port, args.engine_process)
        try:
            url = f"http://127.0.0.1:{args.port}"
            http_streams(url, c, args.prompt_len, args.max_tokens, 1, proc.pid)  # warm-up: compiles kernels
            https = [http_streams(url, c, args.prompt_len, args.max_tokens, burst_seed(r), proc.pid)
                     for r in range(args.repeats)]
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        ratios = []
        for (engine_tps, alone_counters), http in zip(alone, https):
            rows.append(report_row(c, engine_tps, alone_counters, http))
            ratios.append(rows[-1]["ratio"])
        if len(ratios) > 1:
            print(f"C={c:4d}  ratio over {len(ratios)} bursts: median {statistics.median(ratios):.3f}, "
                  f"lowest {min(ratios):.3f}, highest {max(ratios):.3f}", flush=True)
    card = torch.cuda.get_device_name() if loaded.model.device.type == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "config": config, "engine_process": args.engine_process,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "server_throughput.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
