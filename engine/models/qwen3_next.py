"""Qwen3-Next (transformers `qwen3_next`): the Qwen3.5 layer stack with a sparse MoE MLP (plus a
shared expert) and fused, per-key-head-grouped input projections in the linear-attention layers.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.checkpoint import CheckpointReader
from engine.config import GDNSpec, ModelConfig, MoESpec, require
from engine.models import qwen3_5
from engine.models.weights import take_mlp

MODEL_TYPES = ("qwen3_next",)
rename = qwen3_5.rename


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    qwen3_5.check_activation(raw)
    n = require(raw, "num_hidden_layers")
    moe = None
    moe_layers = (False,) * n
    num_experts = raw.get("num_experts", 0)
    if num_experts > 0:
        moe = MoESpec(
            num_experts=num_experts,
            top_k=require(raw, "num_experts_per_tok"),
            expert_intermediate_size=require(raw, "moe_intermediate_size"),
            shared_intermediate_size=require(raw, "shared_expert_intermediate_size"),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        )
        step = raw.get("decoder_sparse_step", 1)
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in dense_only and (i + 1) % step == 0 for i in range(n))
    return ModelConfig(
        model_type="qwen3_next",
        vocab_size=require(raw, "vocab_size"),
        hidden_size=require(raw, "hidden_size"),
        layer_types=qwen3_5.layer_types(raw),
        gdn=qwen3_5.gdn_spec(raw),
        attention=qwen3_5.attention_spec(raw),
        intermediate_size=raw.get("intermediate_size", 0),
        moe=moe,
        moe_layers=moe_layers,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        zero_centered_norms=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        dtype=raw.get("dtype") or raw.get("torch_dtype") or "bfloat16",
    )


def take_gdn(reader: CheckpointReader, prefix: str, s: GDNSpec, hidden: int) -> dict[str, torch.Tensor]:
    """Ungroup the fused projections. For each key head g, in_proj_qkvz stores rows
    [q_g | k_g | v of its r value heads | z of the same heads] and in_proj_ba stores
    [b of its r heads | a of its r heads]; the model wants [all q | all k | all v | z | b | a]."""
    r = s.num_v_heads // s.num_k_heads
    group_rows = 2 * s.head_k_dim + 2 * r * s.head_v_dim
    qkvz = reader.take(f"{prefix}.in_proj_qkvz.weight", (s.num_k_heads * group_rows, hidden))
    ba = reader.take(f"{prefix}.in_proj_ba.weight", (2 * s.num_v_heads, hidden))
    q, k, v, z = qkvz.view(s.num_k_heads, group_rows, hidden).split(
        [s.head_k_dim, s.head_k_dim, r * s.head_v_dim, r * s.head_v_dim], dim=1)
    b, a = ba.view(s.num_k_heads, 2 * r, hidden).split([r, r], dim=1)
    flat = [t.reshape(-1, hidden) for t in (q, k, v, z, b, a)]
    return {"in_proj": torch.cat(flat), **qwen3_5.take_gdn_tail(reader, prefix, s, hidden)}


def take_moe(reader: CheckpointReader, prefix: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    m, hidden = config.moe, config.hidden_size
    gate_up, down = [], []
    for e in range(m.num_experts):
        expert = take_mlp(reader, f"{prefix}.experts.{e}", hidden, m.expert_intermediate_size)
        gate_up.append(expert["gate_up"])
        down.append(expert["down"])
    shared = take_mlp(reader, f"{prefix}.shared_expert", hidden, m.shared_intermediate_size)
    return {
        "router": reader.take(f"{prefix}.gate.weight", (m.num_experts, hidden)),
        "experts_gate_up": torch.stack(gate_up),
        "experts_down": torch.stack(down),
        "shared.gate_up": shared["gate_up"],
        "shared.down": shared["down"],
        "shared_gate": reader.take(f"{prefix}.shared_expert_gate.weight", (1, hidden)),
    }


def load_weights(config: ModelConfig, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    def mlp(reader, prefix, config, index):
        if config.moe_layers[index]:
            return take_moe(reader, prefix, config)
        return take_mlp(reader, prefix, config.hidden_size, config.intermediate_size)

    return qwen3_5.take_decoder(reader, config, take_gdn, mlp)
