"""`deltaserve complete`, `deltaserve chat` and `deltaserve bench-serve` against a live server on 127.0.0.1."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from clients import Client
from clients.bench_report import percentile
from clients.loadgen import Progress
from engine.engine import EngineConfig
from server.cli import main
from server_harness import REPO, ThreadServer, free_port, write_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ThreadServer(write_tiny_model(tmp_path_factory.mktemp("tiny")),
                       EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("command", ["complete", "chat", "bench-serve"])
def test_client_commands_explain_their_options(command):
    out = subprocess.run([sys.executable, "-m", "server.cli", command, "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0 and "usage: deltaserve" in out.stdout
    options = {"complete": ["--prompt", "--max-tokens", "--temperature", "--ignore-eos"],
               "chat": ["--system", "--max-tokens", "--temperature"],
               "bench-serve": ["--concurrency", "--request-rate", "--num-requests", "--input-len", "--output-len",
                               "--json", "--max-duration"]}[command]
    for option in ["--url", "--model", *options]:
        assert option in out.stdout


def test_complete_streams_the_completion_to_stdout(server, client):
    expected = client.complete("The cat", max_tokens=10, temperature=0.0, ignore_eos=True).text
    out = subprocess.run([sys.executable, "-m", "server.cli", "complete", "--url", server.url, "--prompt", "The cat",
                          "--max-tokens", "10", "--ignore-eos"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0
    assert out.stdout == expected + "\n"
    assert "[10 tokens, finish: length]" in out.stderr


def test_complete_reads_the_prompt_from_stdin(server, client, monkeypatch, capsys):
    expected = client.complete("Once upon", max_tokens=6, temperature=0.0, ignore_eos=True).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon"))
    assert main(["complete", "--url", server.url, "--max-tokens", "6", "--ignore-eos"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_keeps_the_conversation_across_turns(server, client, monkeypatch, capsys):
    system = {"role": "system", "content": "Be brief."}
    turn = dict(max_tokens=6, temperature=0.0)
    first = client.chat([system, {"role": "user", "content": "Hi"}], **turn).text
    second = client.chat([system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "And then?"}], **turn).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\nAnd then?\n"))
    assert main(["chat", "--url", server.url, "--system", "Be brief.", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == first + "\n" + second + "\n"


def test_unreachable_server_is_one_error_line_and_status_2(capsys):
    assert main(["complete", "--url", f"http://127.0.0.1:{free_port()}", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaserve: error: cannot reach the server") and err.count("\n") == 1


def test_server_error_is_one_error_line_and_status_2(server, capsys):
    assert main(["complete", "--url", server.url, "--model", "gpt-nope", "--prompt", "x"]) == 2
    assert capsys.readouterr().err == ("deltaserve: error: the model 'gpt-nope' does not exist; this server serves "
                                       "'tiny-gdn' (HTTP 404)\n")


def _bench(server, tmp_path, *options):
    path = tmp_path / "bench.json"
    code = main(["bench-serve", "--url", server.url, "--json", str(path), *options])
    assert code == 0
    return json.loads(path.read_text())


def test_bench_serve_with_concurrency_records_consistent_counts_and_percentiles(server, tmp_path, capsys):
    record = _bench(server, tmp_path, "--num-requests", "12", "--concurrency", "4", "--input-len", "24",
                    "--output-len", "8")
    s = record["summary"]
    assert (s["requests"], s["completed"], s["failed"], s["unfinished"]) == (12, 12, 0, 0)
    assert s["output_tokens"] == 12 * 8 and s["input_tokens"] == 12 * 24
    assert s["finish_reasons"] == {"length": 12} and s["errors"] == {}
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], key
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
    assert s["output_throughput"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(12 / s["duration_s"])
    requests = record["requests"]
    assert [r["index"] for r in requests] == list(range(12))
    assert all(r["prompt_tokens"] == 24 and r["output_tokens"] == 8 and r["error"] is None for r in requests)
    assert all(0 < r["ttft_s"] <= r["e2e_s"] <= s["duration_s"] for r in requests)
    assert record["config"]["concurrency"] == 4 and record["model"] == "tiny-gdn"
    out = capsys.readouterr()
    assert "completed 12 of 12 requests" in out.out and "TTFT (ms)" in out.out
    assert "bench-serve: 12/12 done" in out.err  # stderr is not a terminal here: plain progress lines


def test_bench_serve_at_a_request_rate_spreads_the_starts(server, tmp_path):
    record = _bench(server, tmp_path, "--num-requests", "6", "--request-rate", "20", "--input-len", "8",
                    "--output-len", "4", "--seed", "3")
    s = record["summary"]
    assert s["completed"] == 6 and s["output_tokens"] == 24 and s["failed"] == 0
    starts = [r["start_s"] for r in record["requests"]]
    assert starts == sorted(starts) and starts[-1] > 0.05


def test_bench_serve_stops_at_max_duration_and_counts_the_rest_as_unfinished(server, tmp_path):
    record = _bench(server, tmp_path, "--num-requests", "4", "--concurrency", "2", "--input-len", "4",
                    "--output-len", "400", "--max-duration", "0.5")
    s = record["summary"]
    assert s["unfinished"] == 4 and s["failed"] == 0 and s["completed"] == 0
    assert s["duration_s"] < 3
    with Client(server.url) as c:
        assert c.health()


def test_bench_serve_fails_with_status_2_when_every_request_failed(server, tmp_path, capsys):
    """The report and the record are still written, but a script reading the status is told that nothing
    was measured (here every request names a model the server does not serve)."""
    path = tmp_path / "bench.json"
    code = main(["bench-serve", "--url", server.url, "--model", "no-such-model", "--num-requests", "3",
                 "--input-len", "4", "--output-len", "2", "--json", str(path)])
    assert code == 2
    s = json.loads(path.read_text())["summary"]
    assert (s["completed"], s["failed"]) == (0, 3)
    err = capsys.readouterr().err
    assert "all 3 requests that ran failed" in err and "no-such-model" in err


def test_bench_serve_refuses_prompts_beyond_the_context_limit(server, capsys):
    assert main(["bench-serve", "--url", server.url, "--input-len", "500", "--output-len", "100"]) == 2
    assert "context limit of 512" in capsys.readouterr().err


def test_percentile_agrees_with_numpy():
    values = [5.0, 1.0, 3.0, 10.0, 2.5, 7.0, 7.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_in_place_on_a_terminal():
    out = _Terminal()
    progress = Progress(total=10, out=out, interval_s=10)
    progress.done, progress.running = 5, 3
    progress.show(1.5)
    progress.show(2.0, final=True)
    text = out.getvalue()
    assert text.startswith("\r\033[K[" + "#" * 15 + "." * 15 + "] 5/10 done, 3 running")
    assert text.count("\r") == 2 and text.endswith("2.0 s\n")
