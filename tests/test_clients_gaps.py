"""What a user of `deltaserve complete` / `chat` / `bench-serve` meets at the edges: a closed stdout, bad flag
values, Ctrl-C, and how much a percentile in the report rests on."""

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from clients import Client
from clients.bench_report import RequestRecord, render, summarize
from server.cli import main
from server_harness import MAX_MODEL_LEN, REPO


def _cli(*args: str, stdout: int, stdin_text: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], input=stdin_text, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("command", ["complete", "chat"])
def test_a_closed_stdout_ends_the_command_quietly(server, command):
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first flush of streamed text fails, as under `| head` once it has quit
    try:
        args = ["--prompt", "The cat"] if command == "complete" else []
        out = _cli(command, "--url", server.url, "--max-tokens", "20", *args, stdout=writer, stdin_text="Hi\n")
    finally:
        os.close(writer)
    assert out.stderr == "" and out.returncode == 1


@pytest.mark.parametrize("flag, value", [("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "nan"),
                                         ("--temperature", "nan"), ("--top-p", "inf")])
@pytest.mark.parametrize("command", ["complete", "chat"])
def test_a_bad_number_is_named_in_one_error_line(server, command, flag, value, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main([command, "--url", server.url, "--prompt" if command == "complete" else "--system", "x",
                 flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltaserve: error: {flag} must be") and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--max-duration", "--timeout", "--progress-interval"])
def test_bench_serve_refuses_a_nan_duration_before_it_starts(server, flag, capsys):
    assert main(["bench-serve", "--url", server.url, "--num-requests", "2", flag, "nan"]) == 2
    out = capsys.readouterr()
    assert out.err == "deltaserve: error: --max-duration, --timeout and --progress-interval must be > 0\n"
    assert out.out == ""


def test_ctrl_c_stops_bench_serve_with_the_report_of_what_finished(server, tmp_path):
    path = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "bench-serve", "--url", server.url,
                             "--num-requests", "200", "--concurrency", "2", "--input-len", "8", "--output-len", "200",
                             "--progress-interval", "0.05", "--json", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            # as from a terminal: a suite started in the background (a shell's `&`) passes
                            # SIGINT on ignored, and an ignored signal stays ignored in the child (nohup)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # interrupt once a request has finished, far from the 200 the run asks for
            if line.startswith("bench-serve: ") and not line.startswith("bench-serve: 0/"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "stopped by Ctrl-C" in err
    record = json.loads(path.read_text())
    s = record["summary"]
    assert record["stopped_by"] == "Ctrl-C" and s["failed"] == 0 and s["completed"] >= 1 and s["unfinished"] >= 1
    assert s["completed"] + s["unfinished"] == 200
    assert f"completed {s['completed']} of 200 requests" in out
    cut = {r["error"] for r in record["requests"] if r["error"] is not None}
    assert cut <= {"unfinished: cut off by Ctrl-C", "unfinished: never sent before Ctrl-C"}


def test_each_latency_row_says_how_many_values_its_percentiles_rest_on():
    records = [RequestRecord(index=i, prompt_tokens=4, start_s=0.0, ttft_s=0.01 * (i + 1), e2e_s=0.1, output_tokens=2,
                             finish_reason="length", itl_s=[0.02]) for i in range(3)]
    summary = summarize(records, duration_s=1.0)
    assert summary["ttft_ms"]["n"] == 3 and summary["itl_ms"]["n"] == 3
    table = render(summary, "title").splitlines()
    assert table[5].split() == ["n", "mean", "p50", "p90", "p99"]
    assert table[6].split()[:4] == ["TTFT", "(ms)", "3", "20.00"]  # three requests: the p99 is no tail


def test_a_run_where_nothing_finished_reports_zero_values_per_row():
    table = render(summarize([RequestRecord(index=0, prompt_tokens=4, error="boom")], duration_s=0.0), "title")
    assert table.splitlines()[6].split() == ["TTFT", "(ms)", "0", "-", "-", "-", "-"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_at_a_terminal_a_refused_chat_message_is_dropped_and_the_chat_goes_on(server, monkeypatch, capsys):
    with Client(server.url, timeout=30) as client:
        expected = client.chat("Hi", max_tokens=6, temperature=0.0).text
    monkeypatch.setattr(sys, "stdin", _Terminal("x" * (MAX_MODEL_LEN + 10) + "\nHi\n"))
    assert main(["chat", "--url", server.url, "--max-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == "> > " + expected + "\n> "  # the answer to "Hi" alone: the refused message is gone
    assert out.err.count("deltaserve: error: ") == 1 and "context limit" in out.err


def test_one_request_is_not_requests_in_the_report():
    records = [RequestRecord(index=0, prompt_tokens=4, error="boom")]
    assert "completed 0 of 1 request in " in render(summarize(records, duration_s=1.0), "title")
    assert "completed 0 of 2 requests in " in render(summarize(records * 2, duration_s=1.0), "title")


def test_an_error_page_that_is_not_the_error_object_is_one_line():
    from clients.types import DeltaserveError

    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n  <h1>Bad   Gateway</h1>\n</body>\n</html>\n"
    message = str(DeltaserveError.from_body(page, 502))
    assert "\n" not in message and "<h1>Bad Gateway</h1>" in message and message.startswith("the server answered 502")


def test_bench_serve_says_so_when_the_server_lists_no_models():
    import asyncio

    from clients.loadgen import _served_model
    from clients.types import DeltaserveError

    class NoModels:
        async def models(self):
            return []

    with pytest.raises(DeltaserveError, match="lists no models: name one with --model"):
        asyncio.run(_served_model(NoModels()))


def test_concurrency_help_gives_the_connection_limit_it_falls_back_to():
    from clients.loadgen import MAX_CONNECTIONS
    from server.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench-serve"]
    help_text = next(a.help for a in bench._actions if "--concurrency" in a.option_strings)
    assert f"else {MAX_CONNECTIONS}" in help_text
