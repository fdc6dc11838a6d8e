"""The paper's Gated DeltaNet in the flash-linear-attention format (fla `gated_deltanet`, 0.6.0),
optionally hybrid with softmax attention layers (sliding-window or full, RoPE) named by `attn`.

Differences from the Qwen families that matter: plain (not zero-centred) RMSNorms, separate q/k/v
projections and convolutions (concatenated here into the [q|k|v] layout the mixer runs), an
optional output gate, and attention layers with head_dim = hidden_size // num_heads, full-width
RoPE, no q/k norm and no output gate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.checkpoint import CheckpointReader
from engine.config import ATTENTION, LINEAR_ATTENTION, AttentionSpec, GDNSpec, ModelConfig, require
from engine.errors import ModelLoadError
from engine.models.weights import prefixed, take_embeddings, take_mlp, take_norm

MODEL_TYPES = ("gated_deltanet",)
_GATE_ACTIVATIONS = {"swish": "silu", "silu": "silu", "sigmoid": "sigmoid"}


def _mlp_width(raw: dict[str, Any]) -> int:
    """fla's GatedMLP: when intermediate_size is unset, 2/3 of hidden * ratio, rounded up to 256."""
    if raw.get("intermediate_size"):
        return raw["intermediate_size"]
    ratio = raw.get("hidden_ratio") or 4
    width = int(raw["hidden_size"] * ratio * 2 / 3)
    return 256 * math.ceil(width / 256)


def _attention(raw: dict[str, Any], num_layers: int) -> tuple[set[int], AttentionSpec | None]:
    """The hybrid attention layers and their (shared) settings from the `attn` field."""
    attn = raw.get("attn")
    if attn is None:
        return set(), None
    entries = attn if isinstance(attn, list) else [attn]
    hidden = raw["hidden_size"]
    layers: set[int] = set()
    specs = set()
    for entry in entries:
        heads = require(entry, "num_heads", "config.json attn")
        layers.update(require(entry, "layers", "config.json attn"))
        specs.add(AttentionSpec(
            num_heads=heads,
            num_kv_heads=entry.get("num_kv_heads") or heads,
            head_dim=hidden // heads,
            rope_theta=float(entry.get("rope_theta") or 10000.0),
            rotary_dim=hidden // heads,
            window=entry.get("window_size"),
            qkv_bias=bool(entry.get("qkv_bias", False)),
        ))
    if len(specs) > 1:
        raise ModelLoadError("attn entries with different settings per layer group are not supported yet")
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad:
        raise ModelLoadError(f"attn layers {bad} are outside 0..{num_layers - 1}")
    return layers, specs.pop()


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    for field, ok in (("use_short_conv", True), ("attnres_block_size", None)):
        if raw.get(field, ok) != ok:
            raise ModelLoadError(f"{field}={raw[field]!r} is not supported")
    if raw.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ModelLoadError(f"hidden_act {raw['hidden_act']!r} is not supported (only swish/silu)")
    activation = raw.get("output_gate_activation", "swish")
    if activation not in _GATE_ACTIVATIONS:
        raise ModelLoadError(f"output_gate_activation {activation!r} is not supported")
    hidden = require(raw, "hidden_size")
    n = require(raw, "num_hidden_layers")
    heads = raw.get("num_heads", 6)
    head_dim = raw.get("head_dim", 256)
    attn_layers, attention = _attention(raw, n)
    gdn = GDNSpec(
        num_k_heads=heads,
        num_v_heads=raw.get("num_v_heads") or heads,
        head_k_dim=head_dim,
        head_v_dim=int(head_dim * raw.get("expand_v", 2.0)),
        conv_kernel=raw.get("conv_size", 4),
        use_gate=bool(raw.get("use_gate", True)),
        allow_neg_eigval=bool(raw.get("allow_neg_eigval", False)),
        gate_activation=_GATE_ACTIVATIONS[activation],
        norm_eps=raw.get("norm_eps", 1e-6),
    )
    return ModelConfig(
        model_type="gated_deltanet",
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        layer_types=tuple(ATTENTION if i in attn_layers else LINEAR_ATTENTION for i in range(n)),
        gdn=gdn,
        attention=attention,
        intermediate_size=_mlp_width(raw),
        rms_norm_eps=raw.get("norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Only the attention layers' RoPE was trained to a length; pure GDN has no such limit.
        max_position_embeddings=raw.get("max_position_embeddings", 2048) if attn_layers else None,
        dtype=raw.get("dtype") or raw.get("torch_dtype") or "bfloat16",
    )


def rename(name: str) -> str | None:
    return name


def _take_gdn(reader: CheckpointReader, prefix: str, s: GDNSpec, hidden: int) -> dict[str, torch.Tensor]:
    rows = {"q": s.key_dim, "k": s.key_dim, "v": s.value_dim}
    projs = [reader.take(f"{prefix}.{x}_proj.weight", (n, hidden)) for x, n in rows.items()]
    convs = [reader.take(f"{prefix}.{x}_conv1d.weight", (n, 1, s.conv_kernel))[:, 0] for x, n in rows.items()]
    if s.use_gate:
        projs.append(reader.take(f"{prefix}.g_proj.weight", (s.value_dim, hidden)))
    projs.append(reader.take(f"{prefix}.b_proj.weight", (s.num_v_heads, hidden)))
    projs.append(reader.take(f"{prefix}.a_proj.weight", (s.num_v_heads, hidden)))
    return {
        "in_proj": torch.cat(projs),
        "conv_weight": torch.cat(convs),
        "A_log": reader.take(f"{prefix}.A_log", (s.num_v_heads,)).float(),
        "dt_bias": reader.take(f"{prefix}.dt_bias", (s.num_v_heads,)).float(),
        "norm_weight": reader.take(f"{prefix}.o_norm.weight", (s.head_v_dim,)).float(),
        "out_proj": reader.take(f"{prefix}.o_proj.weight", (hidden, s.value_dim)),
    }


def _take_attention(reader: CheckpointReader, prefix: str, spec: AttentionSpec, hidden: int) -> dict[str, torch.Tensor]:
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    rows = (("q", q_rows), ("k", kv_rows), ("v", kv_rows))
    out = {
        "qkv_proj": torch.cat([reader.take(f"{prefix}.{x}_proj.weight", (n, hidden)) for x, n in rows]),
        "o_proj": reader.take(f"{prefix}.o_proj.weight", (hidden, q_rows)),
    }
    if spec.qkv_bias:
        out["qkv_bias"] = torch.cat([reader.take(f"{prefix}.{x}_proj.bias", (n,)) for x, n in rows])
    return out


def load_weights(config: ModelConfig, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    hidden = config.hidden_size
    out = take_embeddings(reader, config, "model.embeddings.weight", "lm_head.weight")
    out["final_norm"] = take_norm(reader, "model.norm.weight", hidden, zero_centered=False)
    for i, kind in enumerate(config.layer_types):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        out[f"{dst}.mixer_norm"] = take_norm(reader, f"{src}.attn_norm.weight", hidden, False)
        out[f"{dst}.mlp_norm"] = take_norm(reader, f"{src}.mlp_norm.weight", hidden, False)
        if kind == LINEAR_ATTENTION:
            mixer = _take_gdn(reader, f"{src}.attn", config.gdn, hidden)
        else:
            mixer = _take_attention(reader, f"{src}.attn", config.attention, hidden)
        out.update(prefixed(f"{dst}.mixer", mixer))
        out.update(prefixed(f"{dst}.mlp", take_mlp(reader, f"{src}.mlp", hidden, config.intermediate_size)))
    return out
