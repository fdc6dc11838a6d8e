"""HTTP streaming throughput vs the engine alone, same model, same requests, same run.

For each concurrency C: (1) the engine alone: LLMEngine driven in this process, C requests added at once,
stepped until all finish; (2) the server: `python -m server` as a subprocess with the same engine options,
C concurrent streaming /v1/completions requests from client processes (so client parsing does not share
the server's interpreter). Each request: a random token-id prompt of --prompt-len, --max-tokens greedy
tokens with ignore_eos. Throughput = generated tokens / wall time from the first request to the last
token. Prints a table and writes JSON to $OUT/server_throughput.json if OUT is set.

    python bench/server_throughput.py [--concurrency 64 256] [--prompt-len 128] [--max-tokens 256]
                                      [--engine-process auto|on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
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
CLIENT_PROCS = 8  # httpx parses SSE in Python: enough processes that the clients are not the bound


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=gen).tolist() for _ in range(count)]


def engine_alone(loaded, concurrency: int, prompt_len: int, max_tokens: int) -> float:
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
    tokens, seconds = run(prompts(concurrency, prompt_len), "r")
    return tokens / seconds


def _client(url: str, batch: list[list[int]], max_tokens: int, go, results) -> None:
    async def one(http: httpx.AsyncClient, ids: list[int]) -> int:
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        last = None
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200, reply.status_code
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    last = line
        return json.loads(last[len("data: "):])["usage"]["completion_tokens"]

    async def run() -> tuple[int, float, float]:
        limits = httpx.Limits(max_connections=len(batch) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            go.wait()
            start = time.time()
            counts = await asyncio.gather(*(one(http, ids) for ids in batch))
            return sum(counts), start, time.time()

    results.put(asyncio.run(run()))


def http_streams(url: str, concurrency: int, prompt_len: int, max_tokens: int, seed: int) -> float:
    batch = prompts(concurrency, prompt_len, seed)
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    shares = [batch[i::CLIENT_PROCS] for i in range(CLIENT_PROCS)]
    procs = [ctx.Process(target=_client, args=(url, share, max_tokens, go, results)) for share in shares if share]
    for p in procs:
        p.start()
    time.sleep(3)  # let the clients import and connect
    go.set()
    parts = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    tokens = sum(p[0] for p in parts)
    return tokens / (max(p[2] for p in parts) - min(p[1] for p in parts))


def serve(model_dir: Path, device: str, concurrency: int, port: int, engine_process: str | None) -> subprocess.Popen:
    options = [] if engine_process is None else ["--engine-process", engine_process]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(port),
                             "--device", device,
                             "--max-num-seqs", str(concurrency), "--max-num-batched-tokens",
                             str(max(2048, concurrency)), "--no-request-log", *options], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
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
    args = parser.parse_args()

    config = TINY if args.tiny else CONFIG
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model_dir = write_gated_deltanet(Path(tempfile.mkdtemp()) / "gdn", config, seed=0, dtype=dtype)
    loaded = load_model(model_dir, device=args.device)
    rows = []
    for c in args.concurrency:
        engine_tps = engine_alone(loaded, c, args.prompt_len, args.max_tokens)
        proc = serve(model_dir, args.device, c, args.port, args.engine_process)
        try:
            url = f"http://127.0.0.1:{args.port}"
            http_streams(url, c, args.prompt_len, args.max_tokens, seed=1)  # warm-up: compiles, connections
            http_tps = http_streams(url, c, args.prompt_len, args.max_tokens, seed=0)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        rows.append({"concurrency": c, "engine_tok_s": engine_tps, "http_tok_s": http_tps,
                     "ratio": http_tps / engine_tps})
        print(f"C={c:4d}  engine {engine_tps:9.0f} tok/s  http {http_tps:9.0f} tok/s  "
              f"ratio {http_tps / engine_tps:.3f}", flush=True)
    card = torch.cuda.get_device_name() if loaded.model.device.type == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "config": config, "engine_process": args.engine_process,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "server_throughput.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
