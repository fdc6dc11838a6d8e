"""Greedy completions of a few fixed prompts by a model folder, through deltaserve's generate path
(what the model card shows)."""

from __future__ import annotations

from pathlib import Path

from engine.generate import generate
from engine.loader import load_model
from engine.sampling import SamplingParams

# No prompt ends in a newline: the tokenizer merges a newline with the indentation after it, so a
# prompt cut after "\n" forces a token boundary training never saw and the model starts a new
# top-level block instead of the body.
PROMPTS = (
    "def fibonacci(n):",
    "import os\n\n\ndef read_lines(path):",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):',
)


def greedy_samples(model_dir: str | Path, device: str = "cpu", max_tokens: int = 64) -> list[dict[str, str]]:
    loaded = load_model(model_dir, device=device, dtype="float32", backend="torch")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [{"prompt": prompt, "completion": "".join(step.text for step in generate(loaded, prompt, params))}
            for prompt in PROMPTS]
