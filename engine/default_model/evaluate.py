"""Held-out bits per byte of a saved model folder, run by deltaserve's own loader and model.

    python -m engine.default_model.evaluate --model DIR [--quick] [--device cpu]

Each held-out file is one document, tokenised as in training: [EOS] + file + [EOS]. The model
reads from the leading EOS and is charged for every token after it, the closing EOS included.
bits per byte = total negative log-likelihood in bits / the files' UTF-8 byte count.

How much context a token gets depends on the model, and is part of the result:
- whole file (models whose attention, if any, is windowed: gdn, hybrid): the file is prefilled in
  chunks carrying the model's state, so every token sees everything before it in its file;
- sliding windows (models with full attention: llama, whose RoPE is trained to
  max_position_embeddings): windows of that many tokens, each new one half a window on, scoring
  only tokens not scored before; every token after the first window sees at least half a window.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.default_model.data import HELD_OUT, QUICK_HELD_OUT, load_corpus
from engine.demo import EOS
from engine.loader import LoadedModel, load_model
from engine.models.hybrid import HybridLM

PREFILL_CHUNK = 2048  # tokens per forward call in whole-file mode (the state carries across)


@dataclass(frozen=True)
class FileScore:
    path: str
    tokens: int  # tokens charged (the file's tokens + the closing EOS)
    bytes: int  # the file's UTF-8 bytes
    bits: float  # total negative log-likelihood, in bits


@dataclass(frozen=True)
class EvalResult:
    files: list[FileScore]
    context: str  # "whole file" or "sliding window of N tokens"

    @property
    def bits_per_byte(self) -> float:
        return sum(f.bits for f in self.files) / sum(f.bytes for f in self.files)

    def to_json(self) -> dict:
        return {"bits_per_byte": self.bits_per_byte, "context": self.context, "python": platform.python_version(),
                "bytes": sum(f.bytes for f in self.files), "tokens": sum(f.tokens for f in self.files),
                "files": [asdict(f) for f in self.files]}


def _nll_bits(model: HybridLM, inputs: torch.Tensor, targets: torch.Tensor, state) -> float:
    """Bits to predict targets[i] after inputs[:i + 1], continuing `state`."""
    logits = model.logits(model.run(inputs, state))  # [t, vocab] fp32
    nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
    return float(nll) / math.log(2)


def score_document(model: HybridLM, ids: list[int], window: int | None) -> float:
    """Total bits of ids[1:] given ids[0] onwards. window None: whole document, state carried
    chunk to chunk; else sliding windows of `window` tokens advancing by window // 2."""
    tokens = torch.tensor(ids, device=model.device)
    inputs, targets = tokens[:-1], tokens[1:]
    n = inputs.shape[0]
    if window is None:
        state = model.new_state()
        return sum(_nll_bits(model, inputs[s:s + PREFILL_CHUNK], targets[s:s + PREFILL_CHUNK], state)
                   for s in range(0, n, PREFILL_CHUNK))
    bits, scored, start = 0.0, 0, 0
    while scored < n:
        end = min(start + window, n)
        logits = model.logits(model.run(inputs[start:end], model.new_state()))[scored - start:]
        nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[scored:end, None]).sum()
        bits += float(nll) / math.log(2)
        scored, start = end, start + window // 2
    return bits


def context_window(loaded: LoadedModel) -> int | None:
    """None (whole file) unless the model has full-attention layers; then its trained length."""
    attention = loaded.config.attention
    if attention is None or attention.window is not None:
        return None
    return loaded.config.max_position_embeddings


def evaluate_loaded(loaded: LoadedModel, texts: dict[str, str]) -> EvalResult:
    """bits per byte of `texts` (path -> text) under an already loaded model."""
    (eos_id,) = loaded.tokenizer.encode(EOS)  # the document separator of training
    window = context_window(loaded)
    limit = loaded.config.max_position_embeddings
    scores = []
    for path, text in texts.items():
        ids = [eos_id] + loaded.tokenizer.encode(text) + [eos_id]
        if window is None and limit is not None and len(ids) > limit:
            raise ValueError(f"{path}: {len(ids)} tokens exceed the model's {limit} positions")
        scores.append(FileScore(path, len(ids) - 1, len(text.encode("utf-8")),
                                score_document(loaded.model, ids, window)))
    context = "whole file" if window is None else f"sliding window of {window} tokens"
    return EvalResult(scores, context)


def evaluate_folder(model_dir: str | Path, paths: tuple[str, ...] = HELD_OUT, device: str = "cpu",
                    stdlib: Path | None = None) -> EvalResult:
    """Held-out bits per byte of a model folder, in float32 with the reference kernels (the
    figure every report and the shipped-model test use)."""
    corpus = load_corpus(stdlib)
    loaded = load_model(model_dir, device=device, dtype="float32", backend="torch")
    return evaluate_loaded(loaded, {path: corpus.held_out[path] for path in paths})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--quick", action="store_true", help=f"only the {len(QUICK_HELD_OUT)} quick files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with torch.inference_mode():
        result = evaluate_folder(args.model, QUICK_HELD_OUT if args.quick else HELD_OUT, args.device)
    for f in result.files:
        print(f"{f.path:32s} {f.bits / f.bytes:6.3f} bits/byte  ({f.bytes:,} bytes, {f.tokens:,} tokens)")
    print(f"held-out bits per byte: {result.bits_per_byte:.4f} ({result.context})")
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n")


if __name__ == "__main__":
    main()
