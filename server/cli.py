"""`deltaserve`: the command line. Parses options into plain values and hands them to the engine;
every user mistake ends as one `deltaserve: error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from engine.errors import ModelLoadError

DEVICE_HELP = "where to run: auto (cuda if present, else cpu), cuda, cuda:N or cpu (default: auto)"
DTYPE_HELP = ("weight and activation dtype: auto (the checkpoint's dtype on GPU, float32 on CPU), "
              "float32, bfloat16 or float16 (default: auto). Recurrent states are always float32")
MODEL_HELP = ("a Hugging Face-style model folder (config.json, *.safetensors, tokenizer.json); "
              "default: the built-in demo model")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="Gated DeltaNet kernels: triton (GPU; CPU only under TRITON_INTERPRET=1) or torch "
                        "(the PyTorch reference); auto picks triton on cuda, torch on cpu (default: auto)")


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
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    gen.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")
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
                            "(default: the model folder's name)")
    serve.add_argument("--max-num-seqs", type=int, default=64,
                       help="most sequences decoding at once, i.e. state slots (default: 64)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="most tokens per engine step, decodes and prompt chunks together (default: 2048)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="limit on prompt + max_tokens per request (default: the model's own limit; "
                            "none for pure Gated DeltaNet models)")
    serve.add_argument("--max-queued-requests", type=int, default=1024,
                       help="requests that may wait for a slot; beyond it, 503 with Retry-After (default: 1024)")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM, how long running requests may take to finish before they are aborted "
                            "(default: 30)")
    serve.add_argument("--no-request-log", action="store_true",
                       help="do not write the one JSON line per request to stderr")
    return parser


def _model_dir(arg: str | None):
    if arg is not None:
        return arg
    from engine.demo import demo_model_dir
    return demo_model_dir()


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
    from engine.engine import EngineConfig
    from engine.loader import load_model
    from server.serve import ServerConfig, serve

    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError("--max-model-len must be at least 2")
    if args.drain_timeout < 0:
        raise ValueError("--drain-timeout must be >= 0")
    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_model_len=args.max_model_len)
    model_dir = _model_dir(args.model)
    names = tuple(args.served_model_name or (["deltaserve-demo"] if args.model is None else []))
    config = ServerConfig(host=args.host, port=args.port, served_model_names=names,
                          max_queued_requests=args.max_queued_requests, drain_timeout_s=args.drain_timeout,
                          log_level=args.log_level, log_requests=not args.no_request_log)
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype, backend=args.kernels)
    serve(loaded, engine_config, config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    commands = {"generate": run_generate, "models": run_models, "serve": run_serve}
    try:
        commands[args.command](args)
    except (ModelLoadError, ValueError) as err:
        print(f"deltaserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
