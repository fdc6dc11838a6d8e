"""`deltaserve`: the command line. Parses options into plain values and hands them to the engine;
every user mistake ends as one `deltaserve: error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
import time

from clients.types import DeltaserveError
from engine.errors import ModelLoadError

DEVICE_HELP = "where to run: auto (cuda if present, else cpu), cuda, cuda:N or cpu (default: auto)"
DTYPE_HELP = ("weight and activation dtype: auto (the checkpoint's dtype on GPU, float32 on CPU), "
              "float32, bfloat16 or float16 (default: auto). Recurrent states are float32 (serve: see --state-dtype)")
STATE_DTYPE_HELP = ("how the Gated DeltaNet recurrent states are stored: float32 or bfloat16 (fp32 and bf16 are "
                    "accepted). bfloat16 halves their bytes, so more slots fit (up to twice as many where the "
                    "recurrent state is most of a slot) and decode steps move half the state bytes, at an accuracy "
                    "cost (one report: GSM8K 0.955 float32 vs 0.945 bfloat16); kernels compute in float32 either "
                    "way and round only the stored state (default: float32)")
SEED_HELP = "random seed, for repeatable sampling (default: none, a fresh draw each run)"
MODEL_HELP = ("a Hugging Face-style model folder (config.json, *.safetensors, tokenizer.json); "
              "default: the built-in model, a small Gated DeltaNet trained on the Python standard library "
              "(served as 'deltaserve-stdlib')")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="Gated DeltaNet kernels: triton (GPU; CPU only under TRITON_INTERPRET=1) or torch "
                        "(the PyTorch reference); auto picks triton on cuda, torch on cpu (default: auto)")


def _add_client_options(p: argparse.ArgumentParser, timeout: float) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the running server's address (a trailing /v1 is fine) (default: http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="the served model name to ask for (default: the server's own)")
    p.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                   help=f"seconds to wait to connect and between streamed events (default: {timeout:g})")


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    default = f"{max_tokens}" if max_tokens is not None else "the server's default"
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default: {default})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 picks the most likely token (default: 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens; 0 = all (default: 0)")
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltaserve",
        description="deltaserve: an inference server for Gated DeltaNet language models and their hybrids.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="how much to log to stderr (default: warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and stream the text to stdout",
                         description="Complete one prompt on one device and stream the text to stdout; "
                                     "timing goes to stderr.")
    _add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text; '-' reads it from stdin")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as one user message with the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 picks the most likely token (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default: 0)")
    gen.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")

    sub.add_parser("models", help="list the supported architectures (config.json model_type values)",
                   description="List the config.json model_type values deltaserve can load.")

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                           description="Start the OpenAI-compatible HTTP server.")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                       help="the model name(s) clients use; the first is the one answers carry "
                            "(default: the model folder's name; deltaserve-stdlib for the built-in model)")
    serve.add_argument("--max-num-seqs", type=int, default=64,
                       help="most sequences decoding at once, i.e. state slots (default: 64)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="most tokens per engine step, decodes and prompt chunks together (default: 2048)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="limit on prompt + max_tokens per request (default: the model's own limit; "
                            "none for pure Gated DeltaNet models)")
    serve.add_argument("--max-queued-requests", type=int, default=1024,
                       help="requests that may wait for a slot; beyond it, 503 with Retry-After (default: 1024)")
    serve.add_argument("--max-request-bytes", type=int, default=64 * 2**20, metavar="BYTES",
                       help="largest request body taken; a larger one is refused with 413 before the rest of it is "
                            "read (default: 67108864, i.e. 64 MiB)")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM, how long running requests may take to finish before they are aborted "
                            "(default: 30)")
    serve.add_argument("--no-request-log", action="store_true",
                       help="do not write the one JSON line per request to stderr")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                       help="share of the GPU memory free after loading (on cpu: of the RAM available, within a "
                            "container's memory limit) that the slot pool may take; fewer slots than --max-num-seqs "
                            "start (with a warning) when they do not fit (default: 0.9)")
    serve.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"],
                       type=lambda name: {"fp32": "float32", "bf16": "bfloat16"}.get(name, name), help=STATE_DTYPE_HELP)
    serve.add_argument("--no-cuda-graphs", action="store_true",
                       help="run decode steps eagerly on CUDA instead of replaying captured CUDA graphs "
                            "(slower; for debugging)")
    serve.add_argument("--engine-process", default="auto", choices=["auto", "on", "off"],
                       help="on: the engine steps in a process of its own, which loads the weights, while the "
                            "server process only reads the config and tokenizer and streams; the engine then "
                            "never waits for the per-token HTTP work, which would otherwise share one Python "
                            "interpreter lock with it (streaming throughput under many concurrent requests). "
                            "off: the engine runs in a thread of the server process. auto: on with a cuda "
                            "device, off on cpu, where the engine and the server compete for few cores anyway "
                            "(default: auto)")

    complete = sub.add_parser("complete", help="stream one completion from a running server",
                              description="Send one prompt to a running deltaserve (or OpenAI-compatible) server "
                                          "and stream the completion to stdout as it arrives; the token count "
                                          "and finish reason go to stderr.")
    _add_client_options(complete, timeout=60)
    complete.add_argument("--prompt", default=None, help="the prompt text; '-' reads it from stdin (default: stdin)")
    _add_sampling_options(complete, max_tokens=64)
    complete.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")

    chat = sub.add_parser("chat", help="chat with a running server in the terminal",
                          description="An interactive chat with a running server: each stdin line is one user "
                                      "message, the answer streams to stdout, and the conversation is kept "
                                      "(/reset forgets it). Ctrl-D (end of input) or Ctrl-C ends.")
    _add_client_options(chat, timeout=60)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with (default: none)")
    _add_sampling_options(chat, max_tokens=None)
    chat.add_argument("--verbose", action="store_true", help="after each answer, its token count on stderr")

    bench = sub.add_parser("bench-serve", help="load a running server and report latency and throughput",
                           description="Load a running server with streaming completions of synthetic prompts "
                                       "(exactly --input-len prompt tokens, exactly --output-len output tokens) "
                                       "and report TTFT, TPOT, inter-token and end-to-end latency percentiles "
                                       "(p50/p90/p99), throughput and errors. A progress line goes to stderr.")
    _add_client_options(bench, timeout=300)
    bench.add_argument("--num-requests", type=int, default=100, help="requests to send in all (default: 100)")
    bench.add_argument("--concurrency", type=int, default=None,
                       help="most requests in flight at once; without --request-rate each finished request is "
                            "replaced at once (default: 8 without --request-rate, else 1024, the most connections "
                            "bench-serve opens)")
    bench.add_argument("--request-rate", type=float, default=None, metavar="PER_SECOND",
                       help="send requests as a Poisson process at this mean rate (default: off)")
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    bench.add_argument("--output-len", type=int, default=128,
                       help="generated tokens per request; ignore_eos keeps it exact (default: 128)")
    bench.add_argument("--seed", type=int, default=0, help="seed for the prompts and arrival times (default: 0)")
    bench.add_argument("--max-duration", type=float, default=600.0, metavar="SECONDS",
                       help="stop after this long; requests still running count as unfinished (default: 600)")
    bench.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                       help="when stderr is not a terminal, write a progress line this often (default: 10)")
    bench.add_argument("--json", default=None, metavar="FILE",
                       help="write the whole record (config, per-request timings, summary) to FILE as JSON "
                            "(default: no file)")
    return parser


def _model_dir(arg: str | None):
    if arg is not None:
        return arg
    from engine.default_model import shipped_model_dir
    return shipped_model_dir()


def run_generate(args: argparse.Namespace) -> None:
    from engine.generate import generate
    from engine.loader import load_model
    from engine.sampling import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    loaded = load_model(_model_dir(args.model), device=args.device, dtype=args.dtype, backend=args.kernels)
    if args.chat:
        prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    start = time.perf_counter()
    first = None
    count = 0
    finish = None
    for step in generate(loaded, prompt, params):
        first = first or time.perf_counter()
        count += 1
        finish = step.finish_reason
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    end = time.perf_counter()
    decode_rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
    print(f"[{count} tokens, finish: {finish}, first token {1000 * (first - start):.0f} ms, "
          f"{decode_rate:.1f} tokens/s after it]", file=sys.stderr)


def run_models(_args: argparse.Namespace) -> None:
    from engine.models import supported_model_types
    for name in supported_model_types():
        print(name)


def run_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from engine.default_model import SHIPPED_MODEL_NAME
    from engine.engine import EngineConfig
    from engine.engine_process import ModelSpec
    from engine.loader import resolve_backend, resolve_device
    from server.serve import ServerConfig, serve

    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError("--max-model-len must be at least 2")
    if not args.drain_timeout >= 0:  # NaN too: it would abort every running request at once on SIGTERM
        raise ValueError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                                 decode_graphs=False if args.no_cuda_graphs else None, state_dtype=args.state_dtype)
    model_dir = _model_dir(args.model)
    names = tuple(args.served_model_name or ([SHIPPED_MODEL_NAME] if args.model is None else []))
    config = ServerConfig(host=args.host, port=args.port, served_model_names=names,
                          max_queued_requests=args.max_queued_requests, drain_timeout_s=args.drain_timeout,
                          log_level=args.log_level, log_requests=not args.no_request_log,
                          max_request_bytes=args.max_request_bytes)
    model = ModelSpec(Path(model_dir).expanduser(), device=args.device, dtype=args.dtype, backend=args.kernels)
    device = resolve_device(args.device)
    resolve_backend(args.kernels, device)  # before any model is read, here or in an engine process
    _check_listen_address(args.host, args.port)
    on_cuda = device.type == "cuda"
    serve(model, engine_config, config, engine_process=args.engine_process == "on" or
          (args.engine_process == "auto" and on_cuda))


def _check_listen_address(host: str, port: int) -> None:
    """ValueError unless the server could listen on host:port now: said before the model loads (minutes on a
    GPU), in one line. Unchecked, a port above 65535 was taken modulo 65536 (70000 served on 4464) and a port
    in use or an unknown host ended the server after start-up, in uvicorn's words. Binds as uvicorn does
    (SO_REUSEADDR: a port left in TIME_WAIT is free, one with a listener is not)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0-65535 (0: any free port), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:  # an IPv6 host where IPv6 is off
        raise ValueError(f"cannot listen on {host_port(host, port)}: {err.strerror}") from None
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as err:
            raise ValueError(f"--host {host!r} is not an address to listen on ({err.strerror})") from None
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is already in use (another server?): "
                                 f"choose another with --port") from None
            raise ValueError(f"cannot listen on {host_port(host, port)}: {err.strerror}") from None


def host_port(host: str, port: int) -> str:
    """host:port as a URL writes it: an IPv6 host in brackets ([::1]:8000), else its colons read as the port's."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_complete(args: argparse.Namespace) -> None:
    from clients.cli_chat import run_complete as complete
    complete(args)


def run_chat(args: argparse.Namespace) -> None:
    from clients.cli_chat import run_chat as chat
    chat(args)


def run_bench_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from clients.loadgen import run_bench_serve as bench_serve
    if args.json is not None:  # said now, not as a traceback that loses the record after the whole run
        out = Path(args.json)
        if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise ValueError(f"--json {args.json}: cannot write a file there (is its folder missing?)")
    bench_serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    commands = {"generate": run_generate, "models": run_models, "serve": run_serve, "complete": run_complete,
                "chat": run_chat, "bench-serve": run_bench_serve}
    try:
        commands[args.command](args)
    except (ModelLoadError, DeltaserveError, ValueError) as err:
        print(f"deltaserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
