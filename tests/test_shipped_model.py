"""The built-in model: real trained weights, inside the package, served when no --model is given."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import httpx
import pytest
import torch
from safetensors import safe_open

from engine.default_model import SHIPPED_MODEL_DIR, SHIPPED_MODEL_NAME, evaluate, shipped_model_dir
from engine.default_model.data import QUICK_HELD_OUT
from engine.generate import generate
from engine.loader import load_model
from engine.sampling import SamplingParams
from server_harness import REPO, free_port, wait_healthy

MARGIN_BITS = 0.05  # other CPython versions' copies of the quick files differ a little


def test_shipped_weights_are_a_small_bf16_gated_deltanet():
    folder = shipped_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gated_deltanet"
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 25_000_000
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    for name in ("tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md", "train_log.jsonl", "eval.json"):
        assert (folder / name).is_file(), name


def test_shipped_model_held_out_bits_per_byte_match_its_card():
    """Fails for random, truncated or mis-loaded weights: an untrained model scores above 3 bits."""
    recorded = json.loads((SHIPPED_MODEL_DIR / "quick_eval.json").read_text())
    assert recorded["bits_per_byte"] == pytest.approx(float(
        (SHIPPED_MODEL_DIR / "MODEL_CARD.md").read_text().split("float32 on CPU: ")[1].split(" bits")[0]), abs=1e-4)
    with torch.inference_mode():
        result = evaluate.evaluate_folder(SHIPPED_MODEL_DIR, QUICK_HELD_OUT)
    assert result.bits_per_byte < recorded["bits_per_byte"] + MARGIN_BITS


def test_loading_on_cpu_flushes_subnormal_floats():
    """The trained state decays into subnormals; without flushing, CPU decode ran 18x slower."""
    load_model(SHIPPED_MODEL_DIR, device="cpu")
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_generate_without_model_runs_the_shipped_model(capsys):
    from server.cli import main
    assert main(["generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0",
                 "--device", "cpu"]) == 0
    loaded = load_model(SHIPPED_MODEL_DIR, device="cpu")
    expected = "".join(s.text for s in generate(loaded, "def add(a, b):", SamplingParams(max_tokens=8, temperature=0)))
    assert capsys.readouterr().out == expected + "\n"


def test_serve_without_model_answers_as_the_shipped_model():
    """`deltaserve serve` with no --model, as README's first command runs it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--device", "cpu", "--port", str(port)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": SHIPPED_MODEL_NAME, "prompt": "import os\n\n\ndef read_lines(path):", "max_tokens": 16,
            "temperature": 0}).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert reply["model"] == SHIPPED_MODEL_NAME
    assert reply["usage"]["completion_tokens"] == 16
    assert reply["choices"][0]["text"].startswith("\n    ")  # the function's body, indented


def test_a_built_wheel_carries_the_model(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for package in ("engine", "kernels", "server", "clients"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("deltaserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("model.safetensors", "config.json", "tokenizer.json", "MODEL_CARD.md"):
        assert f"engine/default_model/shipped/{name}" in names
