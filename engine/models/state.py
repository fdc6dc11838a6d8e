"""What one sequence remembers between forward calls, layer by layer.

A Gated DeltaNet layer remembers a fixed-size snapshot (conv taps + recurrent state) however long
the sequence grows; an attention layer keeps its keys and values (all of them for full attention,
the last `window` for sliding-window attention). The batched engine will keep the same tensors in a
slot pool; this per-sequence form is what the single-request generate path carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import LINEAR_ATTENTION, ModelConfig


@dataclass
class GDNLayerState:
    conv: torch.Tensor  # [1, conv_dim, conv_kernel - 1], model dtype: the last pre-conv inputs
    recurrent: torch.Tensor  # [1, HV, K, V] fp32: S in [K, V] layout per value head


@dataclass
class AttentionLayerState:
    keys: torch.Tensor  # [P, num_kv_heads, head_dim], after norm and RoPE
    values: torch.Tensor  # [P, num_kv_heads, head_dim]


@dataclass
class SequenceState:
    layers: list[GDNLayerState | AttentionLayerState]
    num_tokens: int = 0  # tokens already consumed: the position of the next token
    extra: dict = field(default_factory=dict)

    @classmethod
    def fresh(cls, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> "SequenceState":
        layers: list[GDNLayerState | AttentionLayerState] = []
        gdn = config.gdn
        for kind in config.layer_types:
            if kind == LINEAR_ATTENTION:
                conv = torch.zeros(1, gdn.conv_dim, gdn.conv_kernel - 1, device=device, dtype=dtype)
                rec = torch.zeros(1, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim, device=device,
                                  dtype=torch.float32)
                layers.append(GDNLayerState(conv, rec))
            else:
                attn = config.attention
                empty = torch.zeros(0, attn.num_kv_heads, attn.head_dim, device=device, dtype=dtype)
                layers.append(AttentionLayerState(empty, empty.clone()))
        return cls(layers)
