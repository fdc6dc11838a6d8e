"""Tiny random checkpoints saved by transformers' own modelling code: the oracle for model tests.

Every parameter is randomised (HF initialises zero-centred norms to 0 and gated norms to 1, which
would hide a missing +1 or a skipped gate), then the model is saved with save_pretrained beside a
tiny tokenizer, exactly as a user's folder would look.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_tokenizer import write_tiny_tokenizer

VOCAB = 384
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
              linear_value_head_dim=24, full_attention_interval=4, rms_norm_eps=1e-6)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("A_log"):
                param.copy_(noise * 0.5)  # decays spread around exp(0) = 1
            elif name.endswith("dt_bias"):
                param.copy_(noise)
            elif param.dim() == 1:  # norm weights: around their neutral value, clearly not it
                param.add_(noise * 0.3)
            else:
                param.copy_(noise * 0.08)


def save_qwen3_5(folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3_5TextConfig(**{**COMMON, **overrides})
    model = Qwen3_5ForCausalLM(config).eval()
    _randomise(model, seed)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, vocab_size=VOCAB)
    return model


def save_qwen3_next(folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1])
    config = Qwen3NextConfig(**{**COMMON, **moe, **overrides})
    model = Qwen3NextForCausalLM(config).eval()
    _randomise(model, seed)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, vocab_size=VOCAB)
    return model
