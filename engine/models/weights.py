"""Weight-map pieces more than one family shares: norms, the SwiGLU MLP, embeddings and head.

Each returns canonical tensors (names as in engine/models/hybrid.py) taken from a CheckpointReader,
with the shapes the config implies checked on the way.
"""

from __future__ import annotations

import torch

from engine.checkpoint import CheckpointReader
from engine.config import ModelConfig


def take_norm(reader: CheckpointReader, name: str, size: int, zero_centered: bool) -> torch.Tensor:
    """An RMSNorm weight as the multiplier the model applies: fp32, with +1 folded in when the
    family stores it zero-centred (x_hat * (1 + w)). Folding in fp32 loses nothing."""
    weight = reader.take(name, (size,)).float()
    return weight + 1.0 if zero_centered else weight


def take_mlp(reader: CheckpointReader, prefix: str, hidden: int, intermediate: int) -> dict[str, torch.Tensor]:
    """gate_proj/up_proj/down_proj under `prefix` -> canonical {gate_up, down}."""
    gate = reader.take(f"{prefix}.gate_proj.weight", (intermediate, hidden))
    up = reader.take(f"{prefix}.up_proj.weight", (intermediate, hidden))
    down = reader.take(f"{prefix}.down_proj.weight", (hidden, intermediate))
    return {"gate_up": torch.cat([gate, up]), "down": down}


def take_embeddings(reader: CheckpointReader, config: ModelConfig, embed_name: str,
                    head_name: str) -> dict[str, torch.Tensor]:
    """Token embeddings and, unless tied, the LM head."""
    shape = (config.vocab_size, config.hidden_size)
    out = {"embed": reader.take(embed_name, shape)}
    if not config.tie_word_embeddings:
        out["lm_head"] = reader.take(head_name, shape)
    elif reader.has(head_name):
        reader.take(head_name, shape)  # some tied checkpoints store a copy; it is the same matrix
    return out


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}
