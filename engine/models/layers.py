"""The building blocks of every supported model: norms, the Gated DeltaNet mixer, softmax
attention with (partial) RoPE, the SwiGLU MLP and the sparse MoE.

Inputs are the new tokens of a batch of sequences packed as [T, hidden] (see models/state.Batch);
each layer reads and writes its sequences' state in the SlotPool by slot index. Parameters carry
canonical names (see engine/models/hybrid.py); family modules map checkpoint names onto them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import AttentionSpec, GDNSpec, MoESpec
from engine.models import attention, gdn_backend
from engine.models.rope import apply_rope, inverse_frequencies
from engine.models.state import Batch
from engine.slots import SlotPool

if TYPE_CHECKING:  # kernels/ (Triton) is imported only where the triton backend runs
    from kernels.decode_gemv import PendingNorm
    from kernels.decode_linear import SplitK


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x_hat * w in fp32, back to x's dtype (zero-centred weights arrive with the +1 folded in).
    F.rms_norm is the same formula (bitwise on CPU) as one fused kernel on CUDA where the written-out
    form launched six; a decode step has ~80 of these norms, half of its kernels."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | SplitK | None, weight: torch.Tensor, eps: float,
                 backend: str, defer: bool = False) -> tuple[torch.Tensor | PendingNorm, torch.Tensor]:
    """(rms_norm(s), s) for s = x + delta (or x when delta is None): a block's residual add and the
    norm after it. On the triton backend both are one kernel (kernels/norm.py) where the add, the casts
    to and from fp32 and the norm were four; there delta may also be a projection's unreduced split-K
    products (kernels/decode_linear.SplitK, see project), which that kernel sums. `defer` (defers_norm
    said so): no kernel here; the norm comes back pending, for the projection that reads it to compute."""
    if defer:
        from kernels.decode_gemv import pending_norm
        pending = pending_norm(x, delta, weight, eps)
        return pending, pending.s
    if backend == "triton":
        from kernels import norm
        from kernels.decode_linear import SplitK
        if delta is None:
            return norm.rms_norm(x, weight, eps), x
        if isinstance(delta, SplitK):  # rounded to x's dtype inside the norm, as the reduction would
            assert delta.dtype == x.dtype, f"split-K products of a {delta.dtype} projection, x {x.dtype}"
            delta = delta.parts
        return norm.rms_norm(x, weight, eps, residual=delta)
    if delta is not None:
        x = x + delta
    return rms_norm(x, weight, eps), x


def defers_norm(x: torch.Tensor, delta: torch.Tensor | SplitK | None, reader: torch.Tensor | None,
                decode: bool) -> bool:
    """Whether a block's add_rms_norm is left to `reader`, the one projection that reads its output: on a
    decode step (triton backend) whose projection of these rows is kernels/decode_gemv's, which builds
    the normed row itself after its wait (decode_gemv.FOLD_NORM), so the norm's launch is gone."""
    if not decode or reader is None or (delta is not None and not isinstance(delta, torch.Tensor)):
        return False
    from kernels import decode_gemv
    from kernels.decode_linear import takes_gemv
    return decode_gemv.FOLD_NORM and takes_gemv(x.shape[0], *reader.shape, x.device, x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   activation: str = "silu", backend: str = "torch") -> torch.Tensor:
    """rmsnorm(x) * w * act(gate), per head (the last dim), in fp32; act is silu or sigmoid.
    x, gate: [T, heads, d] (gate may be a strided view). The triton backend's silu form is one
    kernel (kernels/norm.py) where the casts, norm, silu and product were six."""
    if backend == "triton" and gate is not None and activation == "silu":
        from kernels import norm
        return norm.gated_rms_norm(x, gate, weight, eps)
    out = rms_norm(x.float(), weight, eps)
    if gate is not None:
        gate = gate.float()
        out = out * (torch.sigmoid(gate) if activation == "sigmoid" else F.silu(gate))
    return out.to(x.dtype)


def project(x: torch.Tensor | PendingNorm, weight: torch.Tensor, decode: bool, silu: bool = False,
            residual: bool = False):
    """x @ weight.T (with `silu`, weight's rows [gate | up] give silu(gate) * up). `decode`: a triton-backend
    decode-only step, whose projections go through kernels/decode_linear.project (our skinny-M kernel where
    its table says it beats cuBLAS on this GPU, else cuBLAS; x may then be a deferred norm, see
    defers_norm). `residual`: the result only goes into add_rms_norm as its delta, so on a decode step it
    may come back as unreduced split-K products (kernels/decode_linear.SplitK), which that norm sums: one
    launch fewer."""
    if decode:
        from kernels.decode_linear import project as decode_project
        return decode_project(x, weight, silu=silu, partial=residual)
    if silu:
        gate, up = (x @ weight.t()).chunk(2, dim=-1)
        return F.silu(gate) * up
    return x @ weight.t()


def _param(*shape: int, fp32: bool = False) -> nn.Parameter:
    """A weight the loader fills. `fp32` ones (norms, gate constants) stay fp32 whatever the model
    dtype: they are tiny, and rounding them to bf16 would move every activation they touch."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.fp32 = fp32
    return param


class GatedDeltaNet(nn.Module):
    """Projections -> short causal conv (SiLU) over [q|k|v] -> gated delta rule -> gated norm -> out."""

    def __init__(self, spec: GDNSpec, hidden_size: int, backend: str = "torch"):
        super().__init__()
        self.spec = spec
        self.backend = backend  # see engine/models/gdn_backend.py
        s = spec
        self.z_dim = s.value_dim if s.use_gate else 0
        # One matmul for everything the token mixer reads: rows [q | k | v | z | b | a].
        self.in_proj = _param(s.conv_dim + self.z_dim + 2 * s.num_v_heads, hidden_size)
        self.conv_weight = _param(s.conv_dim, s.conv_kernel)  # depthwise, [channels, width]
        self.A_log = _param(s.num_v_heads, fp32=True)
        self.dt_bias = _param(s.num_v_heads, fp32=True)
        self.norm_weight = _param(s.head_v_dim, fp32=True)
        self.out_proj = _param(hidden_size, s.value_dim)

    @property
    def reader(self) -> torch.Tensor:
        """The projection that alone reads the normed input (see defers_norm)."""
        return self.in_proj

    def forward(self, x: torch.Tensor | PendingNorm, batch: Batch, pool: SlotPool, layer: int):
        """x [T, hidden] -> the block's delta [T, hidden] (a SplitK on some decode steps: see project)."""
        s = self.spec
        T = x.shape[0]
        decode = batch.decode_only and self.backend == "triton"
        proj = project(x, self.in_proj, decode)
        qkv, z, b, a = proj.split([s.conv_dim, self.z_dim, s.num_v_heads, s.num_v_heads], dim=-1)

        gate = z.reshape(T, s.num_v_heads, s.head_v_dim) if s.use_gate else None
        if gdn_backend.fuses_decode(s, batch, self.backend, pool.recurrent[layer]):
            o = gdn_backend.fused_decode(s, qkv, gate, a, b, self.conv_weight, self.A_log, self.dt_bias,
                                         self.norm_weight, batch, pool.conv[layer], pool.recurrent[layer])
            return project(o.reshape(T, s.value_dim), self.out_proj, decode, residual=True)

        if gdn_backend.folds_conv(s, batch, self.backend):
            o = gdn_backend.conv_delta_rule_decode(s, qkv, a, b, self.conv_weight, self.A_log, self.dt_bias, batch,
                                                   pool.conv[layer], pool.recurrent[layer])
        else:
            decode_only = batch.decode_only
            qkv = gdn_backend.short_conv(qkv, self.conv_weight, batch, pool.conv[layer], decode_only, self.backend)
            q, k, v = qkv.split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
            q = q.reshape(T, s.num_k_heads, s.head_k_dim)
            k = k.reshape(T, s.num_k_heads, s.head_k_dim)
            v = v.reshape(T, s.num_v_heads, s.head_v_dim)
            o = gdn_backend.delta_rule(q, k, v, a, b, self.A_log, self.dt_bias, s.allow_neg_eigval, batch,
                                       pool.recurrent[layer], decode_only, self.backend)

        o = gated_rms_norm(o, gate, self.norm_weight, s.norm_eps, s.gate_activation, self.backend)
        return project(o.reshape(T, s.value_dim), self.out_proj, decode, residual=True)


class Attention(nn.Module):
    """Softmax attention with GQA, optional q/k norm, partial RoPE, output gate and window."""

    def __init__(self, spec: AttentionSpec, hidden_size: int, norm_eps: float, backend: str = "torch"):
        super().__init__()
        self.spec = spec
        self.norm_eps = norm_eps
        self.backend = backend
        s = spec
        q_rows = s.num_heads * s.head_dim * (2 if s.output_gate else 1)
        kv_rows = s.num_kv_heads * s.head_dim
        self.rows = [q_rows, kv_rows, kv_rows]
        # One matmul for q, k and v: rows [q (per head [query | gate] with the output gate) | k | v].
        self.qkv_proj = _param(sum(self.rows), hidden_size)
        self.o_proj = _param(hidden_size, s.num_heads * s.head_dim)
        if s.qkv_bias:
            self.qkv_bias = _param(sum(self.rows))
        if s.qk_norm:
            self.q_norm = _param(s.head_dim, fp32=True)
            self.k_norm = _param(s.head_dim, fp32=True)

    @property
    def reader(self) -> torch.Tensor | None:
        """The projection that alone reads the normed input (see defers_norm); None with a bias (F.linear)."""
        return None if self.spec.qkv_bias else self.qkv_proj

    def forward(self, x: torch.Tensor | PendingNorm, batch: Batch, pool: SlotPool, layer: int):
        """x [T, hidden] -> the block's delta [T, hidden] (a SplitK on some decode steps: see project)."""
        s = self.spec
        T = x.shape[0]
        decode = batch.decode_only and self.backend == "triton"
        if s.qkv_bias:
            qkv = F.linear(x, self.qkv_proj, self.qkv_bias)
        else:
            qkv = project(x, self.qkv_proj, decode)
        q, k, v = qkv.split(self.rows, dim=-1)  # views [T, rows]
        gate = None
        if s.output_gate:  # per head [query | gate]
            q, gate = q.view(T, s.num_heads, 2 * s.head_dim).chunk(2, dim=-1)  # views [T, heads, d]
        q = q.reshape(T, s.num_heads, s.head_dim)
        k = k.view(T, s.num_kv_heads, s.head_dim)
        v = v.view(T, s.num_kv_heads, s.head_dim)
        positions = batch.positions
        keys, values = pool.keys[layer], pool.values[layer]  # [slots, max_len, kv_heads, d]
        if self.backend == "triton":
            from kernels import decode_attention
            from kernels.rope import qk_norm_rope_store
            norms = (self.q_norm, self.k_norm) if s.qk_norm else (None, None)
            inv_freq = inverse_frequencies(s.rotary_dim, s.rope_theta, x.device)
            if batch.decode_only and decode_attention.fuses_rope(T, s.num_kv_heads, keys.shape[1], x.device,
                                                                 keys.element_size()):
                out = decode_attention.rope_decode_attention(q, k, v, *norms, self.norm_eps, inv_freq, positions,
                                                             batch.slot_ids, gate, keys, values, s.window)
                return project(out.view(T, s.num_heads * s.head_dim), self.o_proj, decode, residual=True)
            q = qk_norm_rope_store(q, k, v, *norms, self.norm_eps, inv_freq, positions, batch.token_slots,
                                   keys, values)
        else:
            cos, sin = batch.rope_tables(s.rotary_dim, s.rope_theta)
            if s.qk_norm:
                q, k = rms_norm(q, self.q_norm, self.norm_eps), rms_norm(k, self.k_norm, self.norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys[batch.token_slots, positions] = k
            values[batch.token_slots, positions] = v
        if batch.decode_only and self.backend == "triton":  # reads the buffers in place, applies the gate
            out = decode_attention.decode_attention(q, gate, keys, values, positions, batch.slot_ids, s.window)
            return project(out.view(T, s.num_heads * s.head_dim), self.o_proj, decode, residual=True)
        if batch.decode_only:
            length = batch.attn_len or max(batch.starts) + 1
            out = attention.attend_decode(q, positions, keys, values, batch.slot_ids, length, s.window)
        else:
            out = attention.attend_groups(q, positions, keys, values, batch.attention_groups, s.window)
        out = out.reshape(T, s.num_heads * s.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(T, s.num_heads * s.head_dim))
        return out @ self.o_proj.t()


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.gate_up = _param(2 * intermediate_size, hidden_size)
        self.down = _param(hidden_size, intermediate_size)

    @property
    def reader(self) -> torch.Tensor | None:
        """The projection that alone reads the normed input on a decode step (see defers_norm); None on
        the torch backend, whose decode steps do not go through project."""
        return self.gate_up if self.backend == "triton" else None

    def forward(self, x: torch.Tensor | PendingNorm, decode_only: bool = False):
        """decode_only: a decode-only step (on the triton backend its projections take kernels/decode_linear,
        the activation inside the gate_up kernel where that kernel runs, and the result may be a SplitK
        for the next add_rms_norm: see project)."""
        if decode_only and self.backend == "triton":
            return project(project(x, self.gate_up, True, silu=True), self.down, True, residual=True)
        gate_up = x @ self.gate_up.t()
        if self.backend == "triton":  # silu and product in one kernel
            from kernels.swiglu import silu_mul
            return silu_mul(gate_up) @ self.down.t()
        gate, up = gate_up.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down.t()


class SparseMoE(nn.Module):
    """Top-k routed experts (softmax router) plus a shared expert scaled by sigmoid(gate(x))."""

    def __init__(self, spec: MoESpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        self.router = _param(spec.num_experts, hidden_size)
        self.experts_gate_up = _param(spec.num_experts, 2 * spec.expert_intermediate_size, hidden_size)
        self.experts_down = _param(spec.num_experts, hidden_size, spec.expert_intermediate_size)
        self.shared = MLP(hidden_size, spec.shared_intermediate_size)
        self.shared_gate = _param(1, hidden_size)

    reader = None  # the router, the experts and the shared expert all read the normed input

    def forward(self, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        """decode_only is accepted as MLP.forward's is; the experts stay on torch matmuls either way."""
        probs = torch.softmax((x @ self.router.t()).float(), dim=-1)
        weights, experts = probs.topk(self.spec.top_k, dim=-1)  # [T, top_k]
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token_idx, slot = (experts == e).nonzero(as_tuple=True)
            gate, up = (x[token_idx] @ self.experts_gate_up[e].t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.experts_down[e].t()
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        shared = self.shared(x) * torch.sigmoid(x @ self.shared_gate.t())
        return out + shared
