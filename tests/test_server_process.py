"""The server as a process. SIGTERM drains: /health and new requests get 503 at once, a running stream
finishes (or is aborted at the drain timeout), then the process exits cleanly; a real `python -m server`
subprocess, stopped as a container runtime would stop it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from server_harness import MODEL_NAME, REPO, free_port, start_subprocess, wait_healthy, write_tiny_model


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


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of each live child process of pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] != "Z" and int(fields[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_engine_in_its_own_process_streams_the_whole_answer_drains_and_leaves_with_the_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--engine-process", "on", "--device", "cpu",
                             "--model", str(write_tiny_model(tmp_path / "m")), "--port", str(port),
                             "--served-model-name", MODEL_NAME, "--drain-timeout", "0.5"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, proc)
        children = _children(proc.pid)
        assert any("multiprocessing.spawn" in cmdline for cmdline in children.values()), children
        body = {"model": MODEL_NAME, "prompt": "The cat", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        whole = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        streamed = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(json.loads(line[len("data: "):])["choices"][0]["text"])
        endless = {**body, "max_tokens": 10**6, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=endless, timeout=30) as reply:
            events = []
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)  # drains for 0.5 s, aborts the stream, stops the engine
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(streamed) > 1 and "".join(streamed) == whole != ""
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in children), "the engine process outlived the server"


def test_weights_the_engine_process_cannot_load_are_one_error_line_and_exit_2(tmp_path, capsys):
    from server.cli import main

    model = write_tiny_model(tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["serve", "--engine-process", "on", "--device", "cpu", "--model", str(model)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("deltaserve: error: cannot read") and "model.safetensors" in error
