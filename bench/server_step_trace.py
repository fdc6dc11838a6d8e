"""Step by step, what the engine did behind the HTTP server during one burst of streaming requests.

The real server (FastAPI, uvicorn, the engine process) on bench/server_throughput.py's model, with an
engine process whose LLMEngine records, for every step, when it began, how long it took, how many
requests waited and ran (and how many of those were still prefilling), whether a decode step was in
flight, and how many outputs it made; and when each request reached it. The clients are those of
bench/server_throughput.py. Prints when the burst reached the engine and the first --show steps, then
the steps' total and the gaps between them; writes the trace as JSON under $OUT (or /tmp).

This is how the arrival phase of session 4 was read (docs/performance.md): slots cleared one launch at
a time in the step that admitted a burst, and prefill steps that cost 20-50 ms of host time.

    python bench/server_step_trace.py [--concurrency 64] [--max-tokens 256] [--show 40] [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/, whose engine.py would hide the engine package

from engine.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.engine_process import ModelSpec, build_llm_engine  # noqa: E402


def build_traced_engine(model: ModelSpec, config: EngineConfig, path: str) -> LLMEngine:
    """The engine process's LLMEngine, with add_request and step recording into a trace that is written to
    `path` whenever the engine runs out of work."""
    engine = build_llm_engine(model, config)
    add_request, step = engine.add_request, engine.step
    trace: list[dict] = []

    def traced_add(request_id, prompt_ids, params):
        trace.append({"add": time.time()})
        return add_request(request_id, prompt_ids, params)

    def traced_step():
        sched, start = engine.scheduler, time.time()
        entry = {"step": start, "waiting": len(sched.waiting), "running": len(sched.running),
                 "prefilling": sum(request.prefilling for request in sched.running),
                 "in_flight": engine._in_flight is not None}
        outputs = step()
        trace.append({**entry, "seconds": time.time() - start, "outputs": len(outputs)})
        if not engine.has_work():
            Path(path).write_text(json.dumps(trace))
        return outputs

    engine.add_request, engine.step = traced_add, traced_step
    return engine


def serve_traced(model_dir: Path, device: str, port: int, concurrency: int, path: str) -> None:
    """The server process: the real app and uvicorn, a ProcessEngine whose process steps a traced LLMEngine."""
    from engine.engine_process import ProcessEngine
    from engine.loader import read_config_and_tokenizer
    from server.serve import ServerConfig, make_server, settle_garbage_collector, setup_request_log, state_for

    setup_request_log(False)
    config = ServerConfig(port=port, log_level="error", log_requests=False)
    _, model_config, tokenizer = read_config_and_tokenizer(model_dir)
    engine = ProcessEngine(ModelSpec(model_dir, device=device),
                           EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=max(2048, concurrency)),
                           build=functools.partial(build_traced_engine, path=path))
    engine.start()
    try:
        server = make_server(state_for(engine, model_dir, model_config, tokenizer, config), config)
        settle_garbage_collector()
        server.run()
    finally:
        engine.stop()


def report(trace: list[dict], concurrency: int, show: int) -> None:
    adds = [entry["add"] for entry in trace if "add" in entry][-concurrency:]
    start = adds[0]
    print(f"the burst reached the engine over {1e3 * (adds[-1] - start):.1f} ms; times below from its first request")
    steps = [entry for entry in trace if "step" in entry and entry["step"] >= start - 1e-3]
    for entry in steps[:show]:
        print(f"  t={1e3 * (entry['step'] - start):8.2f} ms  {1e3 * entry['seconds']:6.2f} ms  waiting "
              f"{entry['waiting']:4d}  running {entry['running']:4d}  prefilling {entry['prefilling']:4d}  "
              f"{'in flight' if entry['in_flight'] else '         '}  outputs {entry['outputs']}")
    gaps = [b["step"] - (a["step"] + a["seconds"]) for a, b in zip(steps, steps[1:])]
    print(f"  ... {len(steps)} steps, {sum(entry['seconds'] for entry in steps):.3f} s inside them, "
          f"{sum(gaps):.3f} s between them (longest gap {1e3 * max(gaps, default=0):.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--show", type=int, default=40, help="steps to print from the burst's start")
    parser.add_argument("--port", type=int, default=8434)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the bench runs, on CPU too")
    parser.add_argument("--serve", nargs=2, metavar=("MODEL_DIR", "TRACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_traced(Path(args.serve[0]), args.device, args.port, args.concurrency, args.serve[1])
        return

    import torch
    from server_throughput import CONFIG, TINY, http_streams, wait_healthy

    from engine.demo import write_gated_deltanet
    config, dtype = (TINY, torch.float32) if args.tiny else (CONFIG, torch.bfloat16)
    model_dir = write_gated_deltanet(Path(tempfile.mkdtemp()) / "gdn", config, seed=0, dtype=dtype)
    path = str(Path(os.environ.get("OUT", "/tmp"), f"step_trace_{args.concurrency}.json"))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(model_dir), path, "--device", args.device,
                             "--port", str(args.port), "--concurrency", str(args.concurrency)])
    try:
        wait_healthy(proc, args.port)
        url = f"http://127.0.0.1:{args.port}"
        http_streams(url, args.concurrency, args.prompt_len, args.max_tokens, 1, proc.pid)  # warm-up
        time.sleep(0.5)
        http_streams(url, args.concurrency, args.prompt_len, args.max_tokens, 0, proc.pid)
        time.sleep(0.5)  # the engine writes the trace when it runs out of work
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report(json.loads(Path(path).read_text()), args.concurrency, args.show)


if __name__ == "__main__":
    main()
