"""The pipeline that makes deltaserve's default model: data (the Python standard library), a
byte-level BPE tokenizer, three same-size models (Gated DeltaNet, a Llama-style transformer, a
GDN + sliding-window-attention hybrid), training, held-out evaluation in bits per byte, and the
model card. See docs/default_model.md for the commands.

The trained model itself ships in `shipped/` (package data, so `pip install` brings it): what
`deltaserve serve` and `deltaserve generate` run when no --model is given.
"""

from pathlib import Path

from engine.errors import ModelLoadError

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_MODEL_NAME = "deltaserve-stdlib"  # the name clients ask for when the server runs it


def shipped_model_dir() -> Path:
    """The shipped model's folder; a clear error if an install left the weights out."""
    if not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        raise ModelLoadError(f"the built-in model is missing from {SHIPPED_MODEL_DIR} (a broken install?); "
                             "reinstall deltaserve or pass --model DIR")
    return SHIPPED_MODEL_DIR
