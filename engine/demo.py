"""Random-weight Gated DeltaNet checkpoints in the flash-linear-attention format, with a byte-level
tokenizer: how tests and benchmarks make model folders of any shape (`write_gated_deltanet`;
`DEMO_CONFIG` is a small one). Their text is noise; the trained model deltaserve runs by default
ships in engine/default_model/shipped/. EOS and the chat template are shared with that model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine.config import ATTENTION
from engine.models import gated_deltanet

DEMO_CONFIG: dict[str, Any] = {
    "model_type": "gated_deltanet", "architectures": ["GatedDeltaNetForCausalLM"],
    "vocab_size": 260, "hidden_size": 256, "num_hidden_layers": 4, "num_heads": 2, "head_dim": 64,
    "expand_v": 2.0, "conv_size": 4, "use_gate": True, "hidden_ratio": 4, "norm_eps": 1e-6,
    "tie_word_embeddings": True, "attn": None, "dtype": "float32",
}
EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_gated_deltanet_weights(raw_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor an fla GatedDeltaNetForCausalLM checkpoint of this config holds, random."""
    config = gated_deltanet.parse_config(raw_config)
    gen = torch.Generator().manual_seed(seed)
    hidden, s = config.hidden_size, config.gdn

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm(size: int) -> torch.Tensor:
        return 1.0 + rand(size, scale=0.2)

    out = {"model.embeddings.weight": rand(config.vocab_size, hidden, scale=0.1), "model.norm.weight": norm(hidden)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = rand(config.vocab_size, hidden)
    for i, kind in enumerate(config.layer_types):
        p = f"model.layers.{i}"
        out[f"{p}.attn_norm.weight"] = norm(hidden)
        out[f"{p}.mlp_norm.weight"] = norm(hidden)
        if kind == ATTENTION:
            a = config.attention
            q_rows, kv_rows = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                out[f"{p}.attn.{name}_proj.weight"] = rand(rows, hidden)
                if a.qkv_bias:
                    out[f"{p}.attn.{name}_proj.bias"] = rand(rows)
            out[f"{p}.attn.o_proj.weight"] = rand(hidden, q_rows)
        else:
            for name, rows in (("q", s.key_dim), ("k", s.key_dim), ("v", s.value_dim)):
                out[f"{p}.attn.{name}_proj.weight"] = rand(rows, hidden)
                out[f"{p}.attn.{name}_conv1d.weight"] = rand(rows, 1, s.conv_kernel, scale=0.5)
            if s.use_gate:
                out[f"{p}.attn.g_proj.weight"] = rand(s.value_dim, hidden)
            out[f"{p}.attn.a_proj.weight"] = rand(s.num_v_heads, hidden, scale=0.5)
            out[f"{p}.attn.b_proj.weight"] = rand(s.num_v_heads, hidden, scale=0.5)
            out[f"{p}.attn.A_log"] = rand(s.num_v_heads, scale=0.5)
            out[f"{p}.attn.dt_bias"] = rand(s.num_v_heads, scale=1.0)
            out[f"{p}.attn.o_norm.weight"] = norm(s.head_v_dim)
            out[f"{p}.attn.o_proj.weight"] = rand(hidden, s.value_dim)
        out[f"{p}.mlp.gate_proj.weight"] = rand(config.intermediate_size, hidden)
        out[f"{p}.mlp.up_proj.weight"] = rand(config.intermediate_size, hidden)
        out[f"{p}.mlp.down_proj.weight"] = rand(hidden, config.intermediate_size)
    return out


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer with no merges (ids 0-255 are bytes) plus chat/EOS special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "chat_template": CHAT_TEMPLATE}, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.token_to_id(EOS), tok.token_to_id("<|im_end|>")]}, indent=1))


def write_gated_deltanet(folder: Path, raw_config: dict[str, Any], seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> Path:
    """A complete fla-format model folder with random weights and the byte tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_gated_deltanet_weights(raw_config, seed)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw_config, indent=1))
    write_byte_tokenizer(folder)
    return folder
