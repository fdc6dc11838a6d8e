"""Qwen3.5 dense (transformers `qwen3_5_text`; the multimodal `qwen3_5` folder nests the same text
model under `model.language_model.` and its config under `text_config`).

Gated DeltaNet layers with a gated, zero-centred-norm full attention layer every
`full_attention_interval`-th layer; dense SwiGLU MLPs. The Qwen3-Next family reuses the config
reading and the attention map from here.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.checkpoint import CheckpointReader
from engine.config import ATTENTION, LINEAR_ATTENTION, AttentionSpec, GDNSpec, ModelConfig, require
from engine.errors import ModelLoadError
from engine.models.weights import prefixed, take_embeddings, take_mlp, take_norm

MODEL_TYPES = ("qwen3_5_text", "qwen3_5")
_DROPPED_PREFIXES = ("mtp.", "model.visual.", "visual.")


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings, whether the folder is text-only or multimodal."""
    if "text_config" not in raw:
        return raw
    text = dict(raw["text_config"])
    # Multimodal folders may keep this one at the top level only.
    text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    return text


def layer_types(raw: dict[str, Any]) -> tuple[str, ...]:
    n = require(raw, "num_hidden_layers")
    named = raw.get("layer_types")
    if named is None:
        interval = raw.get("full_attention_interval", 4)
        named = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    if len(named) != n:
        raise ModelLoadError(f"layer_types has {len(named)} entries but num_hidden_layers is {n}")
    kinds = {"linear_attention": LINEAR_ATTENTION, "full_attention": ATTENTION}
    unknown = sorted(set(named) - set(kinds))
    if unknown:
        raise ModelLoadError(f"unsupported layer type(s) {unknown} in layer_types")
    return tuple(kinds[t] for t in named)


def gdn_spec(raw: dict[str, Any]) -> GDNSpec:
    return GDNSpec(
        num_k_heads=raw.get("linear_num_key_heads", 16),
        num_v_heads=raw.get("linear_num_value_heads", 32),
        head_k_dim=raw.get("linear_key_head_dim", 128),
        head_v_dim=raw.get("linear_value_head_dim", 128),
        conv_kernel=raw.get("linear_conv_kernel_dim", 4),
        use_gate=True,
        norm_eps=raw.get("rms_norm_eps", 1e-6),
    )


def attention_spec(raw: dict[str, Any]) -> AttentionSpec:
    if raw.get("attention_bias"):
        raise ModelLoadError("attention_bias=true is not supported for this model family")
    rope = raw.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ModelLoadError(f"rope type {rope_type!r} is not supported (only 'default')")
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    head_dim = raw.get("head_dim") or hidden // heads
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    return AttentionSpec(
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=head_dim,
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rotary_dim=int(head_dim * partial),
        output_gate=True,
        qk_norm=True,
    )


def check_activation(raw: dict[str, Any]) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported (only 'silu')")


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    raw = text_config(raw)
    check_activation(raw)
    return ModelConfig(
        model_type="qwen3_5_text",
        vocab_size=require(raw, "vocab_size"),
        hidden_size=require(raw, "hidden_size"),
        layer_types=layer_types(raw),
        gdn=gdn_spec(raw),
        attention=attention_spec(raw),
        intermediate_size=require(raw, "intermediate_size"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        zero_centered_norms=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        dtype=raw.get("dtype") or raw.get("torch_dtype") or "bfloat16",
    )


def rename(name: str) -> str | None:
    if name.startswith(_DROPPED_PREFIXES):
        return None
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def take_attention(reader: CheckpointReader, prefix: str, spec: AttentionSpec, hidden: int) -> dict[str, torch.Tensor]:
    """Qwen gated attention: q_proj rows are per head [query | gate]; q/k norms zero-centred."""
    q_rows = spec.num_heads * spec.head_dim * 2
    kv_rows = spec.num_kv_heads * spec.head_dim
    return {
        "qkv_proj": torch.cat([reader.take(f"{prefix}.q_proj.weight", (q_rows, hidden)),
                               reader.take(f"{prefix}.k_proj.weight", (kv_rows, hidden)),
                               reader.take(f"{prefix}.v_proj.weight", (kv_rows, hidden))]),
        "o_proj": reader.take(f"{prefix}.o_proj.weight", (hidden, spec.num_heads * spec.head_dim)),
        "q_norm": take_norm(reader, f"{prefix}.q_norm.weight", spec.head_dim, zero_centered=True),
        "k_norm": take_norm(reader, f"{prefix}.k_norm.weight", spec.head_dim, zero_centered=True),
    }


def take_gdn_tail(reader: CheckpointReader, prefix: str, s: GDNSpec, hidden: int) -> dict[str, torch.Tensor]:
    """The parts of a Qwen linear-attention layer both Qwen families store alike."""
    return {
        "conv_weight": reader.take(f"{prefix}.conv1d.weight", (s.conv_dim, 1, s.conv_kernel))[:, 0],
        "A_log": reader.take(f"{prefix}.A_log", (s.num_v_heads,)).float(),
        "dt_bias": reader.take(f"{prefix}.dt_bias", (s.num_v_heads,)).float(),
        "norm_weight": reader.take(f"{prefix}.norm.weight", (s.head_v_dim,)).float(),  # plain, not zero-centred
        "out_proj": reader.take(f"{prefix}.out_proj.weight", (hidden, s.value_dim)),
    }


def take_gdn(reader: CheckpointReader, prefix: str, s: GDNSpec, hidden: int) -> dict[str, torch.Tensor]:
    qkv = reader.take(f"{prefix}.in_proj_qkv.weight", (s.conv_dim, hidden))
    z = reader.take(f"{prefix}.in_proj_z.weight", (s.value_dim, hidden))
    b = reader.take(f"{prefix}.in_proj_b.weight", (s.num_v_heads, hidden))
    a = reader.take(f"{prefix}.in_proj_a.weight", (s.num_v_heads, hidden))
    return {"in_proj": torch.cat([qkv, z, b, a]), **take_gdn_tail(reader, prefix, s, hidden)}


def take_decoder(reader: CheckpointReader, config: ModelConfig, take_layer_mixer, take_layer_mlp) -> dict[str, torch.Tensor]:
    """Embeddings, every layer (through the family's mixer and MLP maps), final norm, head."""
    hidden = config.hidden_size
    out = take_embeddings(reader, config, "model.embed_tokens.weight", "lm_head.weight")
    out["final_norm"] = take_norm(reader, "model.norm.weight", hidden, zero_centered=True)
    for i, kind in enumerate(config.layer_types):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        out[f"{dst}.mixer_norm"] = take_norm(reader, f"{src}.input_layernorm.weight", hidden, True)
        out[f"{dst}.mlp_norm"] = take_norm(reader, f"{src}.post_attention_layernorm.weight", hidden, True)
        if kind == LINEAR_ATTENTION:
            out.update(prefixed(f"{dst}.mixer", take_layer_mixer(reader, f"{src}.linear_attn", config.gdn, hidden)))
        else:
            out.update(prefixed(f"{dst}.mixer", take_attention(reader, f"{src}.self_attn", config.attention, hidden)))
        out.update(prefixed(f"{dst}.mlp", take_layer_mlp(reader, f"{src}.mlp", config, i)))
    return out


def load_weights(config: ModelConfig, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    def dense_mlp(reader, prefix, config, _index):
        return take_mlp(reader, prefix, config.hidden_size, config.intermediate_size)

    return take_decoder(reader, config, take_gdn, dense_mlp)
