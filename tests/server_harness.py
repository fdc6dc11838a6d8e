"""A real deltaserve HTTP server on 127.0.0.1 (a free port) for tests: in a background thread, or as a
`python -m server` subprocess, serving a tiny random Gated DeltaNet checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from engine.demo import write_gated_deltanet
from engine.engine import EngineConfig
from engine.loader import load_model
from server.serve import DrainingServer, ServerConfig, build_state, make_server, setup_request_log
from server.state import ServerState

TINY = {"model_type": "gated_deltanet", "vocab_size": 260, "hidden_size": 64, "num_hidden_layers": 2,
        "num_heads": 2, "head_dim": 16, "expand_v": 1.0, "hidden_ratio": 2, "tie_word_embeddings": True,
        "attn": None, "dtype": "float32"}
MODEL_NAME = "tiny-gdn"
MAX_MODEL_LEN = 256
TINY_SERVER_LIMITS = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=MAX_MODEL_LEN)
REPO = Path(__file__).resolve().parent.parent


def write_tiny_model(folder: Path) -> Path:
    return write_gated_deltanet(folder, TINY, seed=3)


class ThreadServer:
    """uvicorn in a daemon thread; .url, .state, .stop()."""

    def __init__(self, model_dir: Path, engine_config: EngineConfig, **server_options):
        config = ServerConfig(host="127.0.0.1", port=0, served_model_names=(MODEL_NAME,), log_level="error",
                              **server_options)
        setup_request_log(False)
        self.state: ServerState = build_state(load_model(model_dir, device="cpu"), engine_config, config)
        self.server: DrainingServer = make_server(self.state, config)
        self.state.engine.start()
        self._thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self.state.engine.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_subprocess(model_dir: Path, port: int, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dir), "--device", "cpu",
                             "--port", str(port), "--served-model-name", MODEL_NAME, *options],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")
