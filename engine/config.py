"""The typed model description every architecture family is translated into.

Each family module (engine/models/<family>.py) reads its own config.json dialect and returns a
`ModelConfig`; the one generic decoder (engine/models/hybrid.py) is built from it. Families differ
only in what these fields say, never in code paths of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError

LINEAR_ATTENTION = "linear_attention"  # a Gated DeltaNet layer
ATTENTION = "attention"  # softmax attention (full, or sliding-window when `window` is set)


@dataclass(frozen=True)
class GDNSpec:
    """Shapes of a Gated DeltaNet token mixer: H key heads of size K, HV value heads of size V."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    use_gate: bool = True  # output norm gated by silu(z) (always true for Qwen; fla's `use_gate`)
    allow_neg_eigval: bool = False  # fla option: beta in (0, 2) instead of (0, 1)
    gate_activation: str = "silu"  # of z in the output norm: "silu" or "sigmoid" (fla option)
    norm_eps: float = 1e-6

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:  # channels of the short conv: [q | k | v]
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class AttentionSpec:
    """A softmax attention layer of the hybrid models."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rotary_dim: int  # RoPE (rotate-half) on the first rotary_dim channels of each head
    window: int | None = None  # a query at position i sees keys j with i - j < window
    output_gate: bool = False  # Qwen: q_proj also yields a gate, output *= sigmoid(gate)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    qkv_bias: bool = False


@dataclass(frozen=True)
class MoESpec:
    """A sparse mixture of experts with an always-on shared expert (Qwen3-Next)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int
    norm_topk_prob: bool


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]  # LINEAR_ATTENTION or ATTENTION, one per layer
    gdn: GDNSpec
    attention: AttentionSpec | None
    intermediate_size: int  # dense SwiGLU MLP width
    moe: MoESpec | None = None
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block instead of the dense MLP
    rms_norm_eps: float = 1e-6
    # Qwen's decoder norms compute x_hat * (1 + w); fla's compute x_hat * w. The loader folds the
    # +1 into the stored weight, so the model itself always multiplies by w.
    zero_centered_norms: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = 32768  # None: no trained limit (pure Gated DeltaNet)
    dtype: str = "bfloat16"  # the checkpoint's own dtype

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def __post_init__(self) -> None:
        if self.gdn.num_v_heads % self.gdn.num_k_heads:
            raise ModelLoadError(
                f"num value heads ({self.gdn.num_v_heads}) must be a multiple of num key heads "
                f"({self.gdn.num_k_heads})"
            )
        if ATTENTION in self.layer_types and self.attention is None:
            raise ModelLoadError("config has attention layers but no attention settings")
        for kind in self.layer_types:
            if kind not in (LINEAR_ATTENTION, ATTENTION):
                raise ModelLoadError(f"unknown layer type {kind!r}")


def read_config_json(model_dir: Path) -> dict[str, Any]:
    """config.json of a model folder as a dict, with a clear error for what users get wrong."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist or is not a folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: is it a Hugging Face model folder?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return raw


def require(raw: dict[str, Any], key: str, where: str = "config.json") -> Any:
    """A config field that has no sensible default."""
    if raw.get(key) is None:
        raise ModelLoadError(f"{where} lacks the required field {key!r}")
    return raw[key]
