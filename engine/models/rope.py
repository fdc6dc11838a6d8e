"""Rotary position embedding (rotate-half convention) on the first rotary_dim channels of each head."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def inverse_frequencies(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """[rotary_dim / 2] fp32: theta^(-2i / rotary_dim), the angle per position of channel pair i. Cached:
    the same tensor every forward, made before a CUDA graph captures one (its warm-up forwards run first)
    so that a decode step's rotation launches nothing for it (kernels/rope.py computes the angles)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, rotary_dim] in fp32 for the rotate-half convention."""
    inv_freq = inverse_frequencies(rotary_dim, theta, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates the first cos.shape[-1] channels, passes the rest."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)
