"""A trained CausalLM -> an fla-format model folder that engine.loader.load_model (and fla) load:
config.json (model_type gated_deltanet), model.safetensors, and the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from engine.default_model.models import CausalLM, fla_config
from engine.default_model.tokenizer import save_tokenizer
from engine.demo import EOS

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def export_folder(model: CausalLM, tok: Tokenizer, folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Weights under fla's names (the module's own state_dict; the tied head is not stored)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = fla_config(model.spec, eos_token_id=tok.token_to_id(EOS), dtype=DTYPE_NAMES[dtype])
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_tokenizer(tok, folder)
    return folder
