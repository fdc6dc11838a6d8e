"""How a Gated DeltaNet layer runs its short conv and delta rule on slot-pool state.

Two backends compute the same thing: "triton" launches the kernels in kernels/ that read and write
the pool in place by slot index (the GPU path; it also runs on CPU under TRITON_INTERPRET=1, which
is how CI checks it), and "torch" uses kernels/reference.py, gathering the batch's slots, computing
and scattering the new states back (the CPU path). Both compute the delta rule in fp32 whatever the
pool's dtype (fp32 or bf16) and round only the states they store back.

On "triton", a mixed step (decodes and prompt chunks) runs its decodes through the single-token
kernels and only the chunks through the chunkwise ones: in the chunk kernels every one-token
sequence would cost a whole 64-token chunk's work and its own launch programs. A small decode-only
step runs conv, delta rule and gated norm as one kernel (`fused_decode`, kernels/gdn_decode.py); a
larger one folds the conv into the decode kernel (`conv_delta_rule_decode`) unless FOLD_CONV is off.

The conv state of a slot is a ring of the last W inputs by position (kernels/conv.py): [D, W],
x_p in cell p % W. The torch backend gathers a sequence's W-1 earlier inputs from it in
chronological order for kernels/reference.py and stores the new ones back at their cells.
"""

from __future__ import annotations

import torch

from engine.config import GDNSpec
from engine.models.state import Batch
from kernels import reference

BACKENDS = ("torch", "triton")

# Whether a decode-only triton step (past fused_decode's batches) runs the short conv inside the
# decode kernel (kernels/recurrent.py conv_recurrent_decode) rather than as its own launch. Read at
# every forward, so a benchmark can time both in one process (with CUDA graphs: capture after setting it).
FOLD_CONV = True


def fuses_decode(spec: GDNSpec, batch: Batch, backend: str, state_pool: torch.Tensor) -> bool:
    """Whether this step's conv, delta rule and gated norm run as fused_decode: a decode-only step on
    triton where fused_decode_fits."""
    return (backend == "triton" and batch.decode_only
            and fused_decode_fits(spec, len(batch.lens), state_pool.device, state_pool.element_size()))


def fused_decode_fits(spec: GDNSpec, num_seqs: int, device: torch.device, state_bytes: int) -> bool:
    """Whether a layer of this spec decodes num_seqs tokens in one launch: it has the fused kernel's
    form (silu output gate, beta in (0, 1)) and the batch is where that kernel was measured faster
    (kernels/gdn_decode.use_fused_decode: small batches, fp32 state)."""
    if spec.allow_neg_eigval or not spec.use_gate or spec.gate_activation != "silu":
        return False
    from kernels.gdn_decode import use_fused_decode
    return use_fused_decode(num_seqs, spec.num_k_heads, spec.num_v_heads, spec.head_k_dim, spec.head_v_dim,
                            device, state_bytes)


def fused_decode(spec: GDNSpec, qkv: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                 batch: Batch, conv_pool: torch.Tensor, state_pool: torch.Tensor) -> torch.Tensor:
    """gated_rms_norm(delta_rule(short_conv(qkv)), z) in one launch: qkv [T, conv_dim] pre-conv,
    z [T, HV, V], a, b [T, HV] -> [T, HV, V]; the batch's conv taps and states advance."""
    from kernels.gdn_decode import conv_decode_norm
    return conv_decode_norm(qkv, conv_weight, conv_pool, batch.positions, z, a, b, A_log, dt_bias, norm_weight,
                            state_pool, batch.slot_ids, num_k_heads=spec.num_k_heads, eps=spec.norm_eps)


def folds_conv(spec: GDNSpec, batch: Batch, backend: str) -> bool:
    """Whether this step's conv and delta rule run as conv_delta_rule_decode (one launch)."""
    return FOLD_CONV and backend == "triton" and batch.decode_only and not spec.allow_neg_eigval


def conv_delta_rule_decode(spec: GDNSpec, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, batch: Batch,
                           conv_pool: torch.Tensor, state_pool: torch.Tensor) -> torch.Tensor:
    """delta_rule(short_conv(qkv)) of a decode-only step in one launch: qkv [T, conv_dim] pre-conv,
    a, b [T, HV] -> o [T, HV, V]; the batch's conv taps and states advance."""
    from kernels.recurrent import conv_recurrent_decode
    return conv_recurrent_decode(qkv, conv_weight, conv_pool, batch.positions, a, b, A_log, dt_bias, state_pool,
                                 batch.slot_ids, num_k_heads=spec.num_k_heads)


def short_conv(x: torch.Tensor, weight: torch.Tensor, batch: Batch, conv_pool: torch.Tensor,
               decode_only: bool, backend: str) -> torch.Tensor:
    """SiLU(causal depthwise conv) over x [T, D]; the batch's conv taps in conv_pool advance."""
    slots = batch.slot_ids
    if backend == "triton":
        from kernels import conv
        if decode_only:
            return conv.causal_conv1d_step(x, weight, None, conv_pool, slots, batch.positions)
        d, rest = batch.num_single, batch.after_single
        chunks = conv.causal_conv1d_prefill(x[d:], weight, None, rest.cu_seqlens, rest.positions, conv_pool,
                                            rest.slot_ids)
        if d == 0:
            return chunks
        return torch.cat([conv.causal_conv1d_step(x[:d], weight, None, conv_pool, slots[:d], batch.positions[:d]),
                          chunks])
    starts = batch.positions[batch.cu_seqlens[:-1]]  # [N]
    rings = conv_pool[slots]  # [N, D, W]
    y, new_taps = reference.causal_conv1d(x, weight, cu_seqlens=batch.cu_seqlens,
                                          initial_state=ring_window(rings, starts))
    ends = starts + (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1])
    conv_pool[slots] = ring_stored(rings, new_taps, ends)
    return y


def ring_window(rings: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The W-1 inputs before position starts[n] from rings [N, D, W], oldest first ([N, D, W-1]);
    zero where the position is < 0."""
    N, D, W = rings.shape
    before = starts[:, None] - (W - 1) + torch.arange(W - 1, device=rings.device)  # [N, W-1]
    taps = rings.gather(2, (before % W)[:, None, :].expand(N, D, W - 1))
    return torch.where((before >= 0)[:, None, :], taps, 0)


def ring_stored(rings: torch.Tensor, taps: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rings [N, D, W] with taps [N, D, W-1] (the W-1 inputs before position ends[n], oldest first)
    written at their cells."""
    N, D, W = rings.shape
    before = ends[:, None] - (W - 1) + torch.arange(W - 1, device=rings.device)
    return rings.scatter(2, (before % W)[:, None, :].expand(N, D, W - 1), taps.to(rings.dtype))


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               A_log: torch.Tensor, dt_bias: torch.Tensor, allow_neg_eigval: bool, batch: Batch,
               state_pool: torch.Tensor, decode_only: bool, backend: str) -> torch.Tensor:
    """The gated delta rule over q, k [T, H, K], v [T, HV, V] from raw gate inputs a, b [T, HV];
    returns o [T, HV, V]; the batch's states in state_pool advance."""
    slots = batch.slot_ids
    # The fused decode kernel computes beta = sigmoid(b) itself; it has no (0, 2) variant.
    single_token = backend == "triton" and not allow_neg_eigval
    if single_token and decode_only:
        from kernels.recurrent import fused_recurrent_decode
        return fused_recurrent_decode(q, k, v, a, b, A_log, dt_bias, state_pool, slots)
    if backend == "triton" and not decode_only:
        from kernels.chunk import chunk_gated_delta_rule_prefill
        from kernels.gates import gdn_gates
        d = batch.num_single if single_token else 0
        rest = batch.after_single if d else batch
        g, beta = gdn_gates(a[d:], b[d:], A_log, dt_bias)
        if allow_neg_eigval:
            beta = beta * 2.0
        chunks = chunk_gated_delta_rule_prefill(q[d:].contiguous(), k[d:].contiguous(), v[d:].contiguous(), g,
                                                beta, rest.cu_seqlens, state_pool, rest.slot_ids, rest.has_past,
                                                plan=rest.chunk_plan)
        if d == 0:
            return chunks
        from kernels.recurrent import fused_recurrent_decode
        singles = fused_recurrent_decode(q[:d], k[:d], v[:d], a[:d], b[:d], A_log, dt_bias, state_pool, slots[:d])
        return torch.cat([singles, chunks])
    g, beta = reference.gdn_gates(a, b, A_log, dt_bias)
    if allow_neg_eigval:
        beta = beta * 2.0
    # One token per sequence needs no chunking: the plain recurrence is the cheaper exact form.
    rule = reference.recurrent_gated_delta_rule if decode_only else reference.chunk_gated_delta_rule
    o, final = rule(q, k, v, g, beta, initial_state=state_pool[slots].float(), cu_seqlens=batch.cu_seqlens)
    state_pool[slots] = final.to(state_pool.dtype)
    return o

