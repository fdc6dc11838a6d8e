"""The three models of the comparison, as trainable PyTorch modules whose parameter names are
exactly flash-linear-attention's `gated_deltanet` checkpoint names, so `state_dict()` is the
checkpoint (fla and engine.loader both load it).

- gdn:    every layer a Gated DeltaNet token mixer (the paper's model).
- llama:  every layer softmax attention with full-width RoPE, RMSNorm, SwiGLU, no biases: a
          Llama-style transformer, written as an fla `gated_deltanet` config whose `attn.layers`
          lists every layer (that is exactly fla's attention block).
- hybrid: GDN-H1 in miniature: Gated DeltaNet layers with sliding-window attention every third
          layer (fla's `attn` config with `window_size`).

All three share width (hidden 384), MLP (SwiGLU, 768), vocabulary and tied embeddings; depth
evens out the parameter count (a GDN layer is 1.68M parameters, an attention layer 1.48M), as
fla's own baselines do. Shapes in comments: B batch, T time, H heads, K key/query head size,
V value head size.

The Gated DeltaNet layer trains through kernels/reference.chunk_gated_delta_rule (plain PyTorch,
differentiable, fp32 inside) by default; `gdn_kernel="fla"` uses fla-core's Triton chunk kernel
when it is installed on a GPU (optional, never required).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.rope import apply_rope, rope_tables
from kernels import reference

ARCHS = ("gdn", "llama", "hybrid")
GDN_KERNELS = ("reference", "fla")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes a model's shapes; `fla_config` turns it into config.json."""

    arch: str
    vocab_size: int = 4096
    hidden_size: int = 384
    num_layers: int = 6
    intermediate_size: int = 768
    gdn_heads: int = 4  # H key/query heads of size gdn_head_dim; as many value heads
    gdn_head_dim: int = 64
    expand_v: float = 2.0  # value head size = gdn_head_dim * expand_v
    conv_size: int = 4
    attn_heads: int = 6  # head size hidden_size // attn_heads, as fla's `attn` layers
    attn_layers: tuple[int, ...] = field(default=())
    window: int | None = None  # sliding window of the attention layers (None: full causal)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_position_embeddings: int | None = None  # trained length limit; only with attention layers

    @property
    def head_v_dim(self) -> int:
        return int(self.gdn_head_dim * self.expand_v)


def default_spec(arch: str, seq_len: int = 1024) -> ModelSpec:
    """The shipped sizes (about 11-12M parameters each, see the module docstring)."""
    if arch == "gdn":
        return ModelSpec("gdn")
    if arch == "llama":
        return ModelSpec("llama", num_layers=7, attn_layers=tuple(range(7)), max_position_embeddings=seq_len)
    if arch == "hybrid":
        # Window = half the training length, as the paper's 2K window on 4K sequences. RoPE sees
        # only offsets below the window, so files longer than training sequences are fine.
        return ModelSpec("hybrid", attn_layers=(2, 5), window=seq_len // 2, max_position_embeddings=8192)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_spec(arch: str, vocab_size: int) -> ModelSpec:
    """A model small enough to train in seconds on CPU, with every code path of the real one."""
    spec = default_spec(arch, seq_len=64)
    layers = 3 if arch == "hybrid" else 2
    attn_layers = {"gdn": (), "llama": (0, 1), "hybrid": (1,)}[arch]
    window = 8 if arch == "hybrid" else None
    return replace(spec, vocab_size=vocab_size, hidden_size=64, num_layers=layers, intermediate_size=128,
                   gdn_heads=2, gdn_head_dim=16, attn_heads=2, attn_layers=attn_layers, window=window,
                   max_position_embeddings={"gdn": None, "llama": 256, "hybrid": 8192}[arch])


def fla_config(spec: ModelSpec, eos_token_id: int = 0, dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json for fla's GatedDeltaNetForCausalLM (also what engine.loader reads)."""
    attn = None
    if spec.attn_layers:
        attn = {"layers": list(spec.attn_layers), "num_heads": spec.attn_heads, "num_kv_heads": spec.attn_heads,
                "qkv_bias": False, "window_size": spec.window, "rope_theta": spec.rope_theta}
    config = {
        "model_type": "gated_deltanet", "architectures": ["GatedDeltaNetForCausalLM"],
        "attn_mode": "chunk", "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
        "num_heads": spec.gdn_heads, "num_v_heads": spec.gdn_heads, "head_dim": spec.gdn_head_dim,
        "expand_v": spec.expand_v, "use_gate": True, "use_short_conv": True, "allow_neg_eigval": False,
        "conv_size": spec.conv_size, "hidden_ratio": None, "intermediate_size": spec.intermediate_size,
        "hidden_act": "swish", "norm_eps": spec.norm_eps, "attn": attn, "vocab_size": spec.vocab_size,
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
        "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True, "dtype": dtype,
    }
    if spec.max_position_embeddings is not None:
        config["max_position_embeddings"] = spec.max_position_embeddings
    return config


class RMSNorm(nn.Module):
    """x_hat * w in fp32 (fla's plain RMSNorm), back to x's dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class ShortConv(nn.Module):
    """Depthwise causal conv over time, then SiLU (fla's ShortConvolution, no bias)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))  # [D, 1, W], fla's layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        width = self.weight.shape[-1]
        y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), self.weight.to(x.dtype), groups=x.shape[-1])
        return F.silu(y).transpose(1, 2)


class GatedDeltaNet(nn.Module):
    """fla's GatedDeltaNet layer (use_gate, short conv, qk l2norm in the kernel)."""

    def __init__(self, spec: ModelSpec, gdn_kernel: str = "reference"):
        super().__init__()
        assert gdn_kernel in GDN_KERNELS, gdn_kernel
        self.gdn_kernel = gdn_kernel
        hidden, H, K, V = spec.hidden_size, spec.gdn_heads, spec.gdn_head_dim, spec.head_v_dim
        self.shape = (H, K, V)
        self.q_proj = nn.Linear(hidden, H * K, bias=False)
        self.k_proj = nn.Linear(hidden, H * K, bias=False)
        self.v_proj = nn.Linear(hidden, H * V, bias=False)
        self.a_proj = nn.Linear(hidden, H, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.q_conv1d = ShortConv(H * K, spec.conv_size)
        self.k_conv1d = ShortConv(H * K, spec.conv_size)
        self.v_conv1d = ShortConv(H * V, spec.conv_size)
        self.g_proj = nn.Linear(hidden, H * V, bias=False)
        self.o_norm = RMSNorm(V, spec.norm_eps)
        self.o_proj = nn.Linear(H * V, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        B, T, _ = x.shape
        H, K, V = self.shape
        q = self.q_conv1d(self.q_proj(x)).view(B, T, H, K)
        k = self.k_conv1d(self.k_proj(x)).view(B, T, H, K)
        v = self.v_conv1d(self.v_proj(x)).view(B, T, H, V)
        g, beta = reference.gdn_gates(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias)  # [B, T, H] fp32
        o = delta_rule(q, k, v, g, beta, self.gdn_kernel)  # [B, T, H, V]
        gate = self.g_proj(x).view(B, T, H, V)
        o = (self.o_norm(o.float()) * F.silu(gate.float())).to(gate.dtype)
        return self.o_proj(o.reshape(B, T, H * V))


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               kernel: str) -> torch.Tensor:
    """Each of the B rows is its own sequence from a zero state. q, k: [B, T, H, K];
    v: [B, T, H, V]; g, beta: [B, T, H] -> o: [B, T, H, V] (l2-normalised q, k; scale K^-1/2)."""
    B, T = q.shape[:2]
    if kernel == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # optional GPU fast path
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta.to(q.dtype), use_qk_l2norm_in_kernel=True)
        return o
    cu_seqlens = torch.arange(B + 1, device=q.device) * T
    # Autocast off: it would run the reference's fp32 matmuls (and so the state) in bf16.
    with torch.autocast(q.device.type, enabled=False):
        o, _ = reference.chunk_gated_delta_rule(
            q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]), v.reshape(B * T, *v.shape[2:]),
            g.reshape(B * T, -1), beta.reshape(B * T, -1), cu_seqlens=cu_seqlens)
    return o.view(B, T, *o.shape[1:])


class Attention(nn.Module):
    """fla's `attn` layer: MHA, no bias, full-width rotate-half RoPE, causal (optionally a window)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        hidden = spec.hidden_size
        self.heads, self.window = spec.attn_heads, spec.window
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden]; cos, sin: [T, head_dim] -> [B, T, hidden]."""
        B, T, hidden = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if self.window is not None:  # query i sees keys j with 0 <= i - j < window
            offset = torch.arange(T, device=x.device)[:, None] - torch.arange(T, device=x.device)
            mask = (offset >= 0) & (offset < self.window)  # [T, T]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, hidden))


class MLP(nn.Module):
    """SwiGLU (fla's GatedMLP): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, gdn_kernel: str):
        super().__init__()
        self.is_attention = index in spec.attn_layers
        self.attn_norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.attn = Attention(spec) if self.is_attention else GatedDeltaNet(spec, gdn_kernel)
        self.mlp_norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + (self.attn(h, cos, sin) if self.is_attention else self.attn(h))
        return x + self.mlp(self.mlp_norm(x))


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, gdn_kernel: str):
        super().__init__()
        self.embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i, gdn_kernel) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps)


class CausalLM(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab]; the LM head is the embedding matrix."""

    def __init__(self, spec: ModelSpec, gdn_kernel: str = "reference"):
        super().__init__()
        assert spec.arch in ARCHS, spec.arch
        assert all(0 <= i < spec.num_layers for i in spec.attn_layers), spec.attn_layers
        self.spec = spec
        self.model = Backbone(spec, gdn_kernel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        T = input_ids.shape[1]
        cos, sin = rope_tables(torch.arange(T, device=input_ids.device), spec.hidden_size // spec.attn_heads,
                               spec.rope_theta)
        x = self.model.embeddings(input_ids)
        for block in self.model.layers:
            x = block(x, cos, sin)
        return F.linear(self.model.norm(x), self.model.embeddings.weight)


def init_weights(model: CausalLM, seed: int) -> None:
    """fla's initialisation: N(0, 0.02) matrices and embeddings, residual outputs (o_proj,
    down_proj) scaled by 1/sqrt(2 * layers), norms at 1; GDN decay rates A in U(1, 16) and
    dt_bias = softplus^-1(dt) for dt log-uniform in [1e-3, 0.1]; convs as nn.Conv1d's default."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.spec.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(1, 16, generator=gen).log())
            elif name.endswith("dt_bias"):
                lo, hi = math.log(1e-3), math.log(0.1)
                dt = torch.exp(torch.rand(param.shape, generator=gen) * (hi - lo) + lo).clamp(min=1e-4)
                param.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "conv1d" in name:
                bound = 1 / math.sqrt(param.shape[-1])
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_model(spec: ModelSpec, seed: int, gdn_kernel: str = "reference") -> CausalLM:
    model = CausalLM(spec, gdn_kernel)
    init_weights(model, seed)
    return model


def count_parameters(spec: ModelSpec) -> int:
    """Parameters of the model (the tied head counted once), without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in CausalLM(spec).parameters())
