"""A model folder -> a ready model and tokenizer on the requested device.

Order matters for the user: every cheap check (folder, config, architecture, tokenizer) runs before
any weight is read, and each failure is one ModelLoadError line that says what to fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import CheckpointReader
from engine.config import ModelConfig, read_config_json
from engine.errors import ModelLoadError
from engine.models import family_for
from engine.models.gdn_backend import BACKENDS
from engine.models.hybrid import HybridLM
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: HybridLM
    tokenizer: Tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows, most of which cannot run this
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {name} was asked for but there are only {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': the checkpoint's dtype on a GPU; fp32 on CPU, where half precision is slow and
    gains nothing for the small models that run there."""
    if name == "auto":
        return DTYPES.get(config.dtype, torch.bfloat16) if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto': the Triton kernels on a GPU, the PyTorch reference on CPU."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ModelLoadError(f"kernel backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
    if name == "triton" and device.type != "cuda" and not _triton_interprets():
        # Otherwise the first forward fails (Triton finds no GPU driver): every request of a server.
        raise ModelLoadError(f"--kernels triton needs a CUDA device (on {device.type}: --kernels torch, or set "
                             "TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter)")
    return name


def _triton_interprets() -> bool:
    """Does Triton run kernels in its interpreter (TRITON_INTERPRET=1)? Asked of Triton, which reads it."""
    try:
        import triton
    except ImportError:  # no Triton at all (the CPU image)
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton before 3.4 reads the variable where it is used, the same way
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    return bool(knobs.runtime.interpret)


def read_config_and_tokenizer(model_dir: Path):
    """(family, config, tokenizer): every cheap check on a model folder, no weight read. Also what a
    server process needs of a model whose weights its engine process loads."""
    raw = read_config_json(model_dir)
    family = family_for(raw.get("model_type"))
    return family, family.parse_config(raw), Tokenizer.from_dir(model_dir)


def load_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto",
               backend: str = "auto") -> LoadedModel:
    model_dir = Path(model_dir).expanduser()
    family, config, tokenizer = read_config_and_tokenizer(model_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, torch_device)
    kernel_backend = resolve_backend(backend, torch_device)
    if torch_device.type == "cpu":
        # A trained model's Gated DeltaNet state decays towards zero, and on x86 every product
        # with a subnormal float takes a slow microcode path: decode on the shipped model ran at
        # 7 tokens/s instead of 130 on 2 cores. Flushing them to zero (process-wide; values below
        # 1e-38 change nothing a token depends on) keeps CPU decode at full speed.
        torch.set_flush_denormal(True)

    reader = CheckpointReader(model_dir, family.rename)
    weights = family.load_weights(config, reader)
    if reader.unused:
        names = sorted(reader.unused)
        log.warning("ignoring %d weight(s) the model does not use: %s%s", len(names), ", ".join(names[:5]),
                    " ..." if len(names) > 5 else "")

    with torch.device("meta"):
        model = HybridLM(config, kernel_backend)
    for name, param in model.named_parameters():
        want = torch.float32 if param.fp32 else torch_dtype
        weights[name] = weights[name].to(device=torch_device, dtype=want).contiguous()
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval()
    log.info("loaded %s (%s, %d layers) on %s as %s, %s kernels", model_dir, config.model_type,
             config.num_layers, torch_device, torch_dtype, kernel_backend)
    return LoadedModel(model_dir, config, model, tokenizer)
