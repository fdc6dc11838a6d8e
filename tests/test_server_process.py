"""The server as a process. SIGTERM drains: /health and new requests get 503 at once, a running stream
finishes (or is aborted at the drain timeout), then the process exits cleanly; a real `python -m server`
subprocess, stopped as a container runtime would stop it."""

import json
import signal
import threading

import httpx

from server_harness import MODEL_NAME, free_port, start_subprocess, wait_healthy, write_tiny_model


def test_sigterm_lets_a_running_stream_finish_then_exits(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_subprocess(write_tiny_model(tmp_path / "m"), port, "--drain-timeout", "60")
    try:
        wait_healthy(url, proc)
        events: list[str] = []
        started = threading.Event()

        def stream():
            body = {"model": MODEL_NAME, "prompt": "drain", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        health = httpx.get(f"{url}/health", timeout=10)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=10)
        still_streaming = reader.is_alive()
        reader.join(timeout=60)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert health.status_code == 503 and refused.status_code == 503 and still_streaming
    assert refused.json()["error"]["type"] == "service_unavailable_error"
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])["choices"][0]
    assert last["finish_reason"] == "length"
    log_lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    finished = [line for line in log_lines if line["status"] == 200]
    assert len(finished) == 1 and finished[0]["completion_tokens"] == 400
    assert finished[0]["finish_reasons"] == ["length"]


def test_a_stream_outliving_the_drain_timeout_is_aborted_and_the_process_exits(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_subprocess(write_tiny_model(tmp_path / "m"), port, "--drain-timeout", "0.5")
    try:
        wait_healthy(url, proc)
        body = {"model": MODEL_NAME, "prompt": "forever", "max_tokens": 10**6, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"


def test_serve_refuses_bad_options_with_one_error_line():
    from server.cli import main

    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert main(["serve", "--drain-timeout", "-1"]) == 2
