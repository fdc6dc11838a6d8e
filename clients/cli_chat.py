"""`deltaserve complete` and `deltaserve chat`: a terminal client for a running server.

Text streams to stdout as it arrives; the token count and finish reason go to stderr. The chat REPL
reads one user message per stdin line and keeps the conversation, so each answer sees the earlier
turns; `/reset` forgets them. It ends on EOF (Ctrl-D, or the end of piped input) or Ctrl-C.
Server errors surface as DeltaserveError, which the command line turns into one error line, status 2;
in a chat at a terminal, an error answering one message is that line, and the chat goes on without it.
When the reader of stdout goes away (`| head`), the stream is closed, which aborts the request, and the
command ends quietly with status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, TextIO

from clients.client import Client, Sampling
from clients.streams import TextStream
from clients.types import DeltaserveError


def _check_numbers(args: argparse.Namespace) -> None:
    """Flag values that would otherwise fail with a message that does not name them: a --timeout of 0 read as
    'cannot reach the server', a negative one as 'Timeout value out of range', a NaN temperature as 'Out of
    range float values are not JSON compliant'."""
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")


def _sampling(args: argparse.Namespace) -> Sampling:
    sampling: Sampling = {"temperature": args.temperature}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    if args.seed is not None:
        sampling["seed"] = args.seed
    if getattr(args, "ignore_eos", False):
        sampling["ignore_eos"] = True
    return sampling


def _show(stream: TextStream, out: TextIO) -> str:
    """Write each delta as it arrives; returns the whole text."""
    for delta in stream:
        out.write(delta)
        out.flush()
    out.write("\n")
    out.flush()
    return stream.text


def _stdout_closed() -> SystemExit:
    """stdout's reader has gone: no traceback, and /dev/null under stdout, so that the interpreter's last flush
    at exit does not raise BrokenPipeError again ("Exception ignored ..."). The stream was closed on the way."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor has no last flush to fail
        pass
    return SystemExit(1)


def _footer(stream: TextStream) -> str:
    tokens = stream.usage.completion_tokens if stream.usage else "?"
    return f"[{tokens} tokens, finish: {stream.finish_reason}]"


def run_complete(args: argparse.Namespace) -> None:
    _check_numbers(args)
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty; give --prompt TEXT or pipe text on stdin")
    with Client(args.url, model=args.model, timeout=args.timeout) as client:
        try:
            with client.stream_complete(prompt, max_tokens=args.max_tokens, **_sampling(args)) as stream:
                _show(stream, sys.stdout)
        except BrokenPipeError:
            raise _stdout_closed() from None
        print(_footer(stream), file=sys.stderr)


def run_chat(args: argparse.Namespace) -> None:
    _check_numbers(args)
    interactive = sys.stdin.isatty()
    history: list[dict[str, Any]] = []
    system = [{"role": "system", "content": args.system}] if args.system else []
    with Client(args.url, model=args.model, timeout=args.timeout) as client:
        if interactive:
            print(f"chatting with {args.url}; an empty line does nothing, /reset forgets the conversation, "
                  "Ctrl-D or Ctrl-C ends", file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print(file=sys.stderr)
                return
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                history.clear()
                continue
            history.append({"role": "user", "content": line})
            try:
                with client.stream_chat(system + history, max_tokens=args.max_tokens, **_sampling(args)) as stream:
                    answer = _show(stream, sys.stdout)
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return
            except BrokenPipeError:
                raise _stdout_closed() from None
            except DeltaserveError as err:
                if not interactive:
                    raise
                # at a terminal one refused message (past the context limit, say) need not end the conversation
                # and lose it: the message is forgotten and the next one asked for
                history.pop()
                print(f"deltaserve: error: {err}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": answer})
            if args.verbose:
                print(_footer(stream), file=sys.stderr)
