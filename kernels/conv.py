"""Causal depthwise conv1d (width W <= 4, optional SiLU) over slot-indexed rolling conv state.

Channel d of token t:  y[t, d] = act(bias[d] + sum_j weight[d, j] * x[t - (W-1) + j, d]),
with the W-1 inputs before a sequence's first token taken from its conv state. A slot's conv
state is conv_pool[slot]: [D, W-1], the last W-1 inputs of the sequence so far, oldest first
(the layout of kernels/reference.py's causal_conv1d and of HF's conv_state).

Two entry points:
- causal_conv1d_prefill: a packed varlen batch ([T, D] with cu_seqlens); each sequence starts from
  its slot's state (or zeros) and leaves its last W-1 inputs in the slot.
- causal_conv1d_step: one token per request (decode); shifts the slot's window in place.
Slot indices < 0 are padding: no state is read or written, and a step's output row is zero.
Math in fp32; y in x.dtype; the state keeps the pool's dtype.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# Widest conv handled; a slot's W-1 taps are handled as a tile padded to this power of two.
_MAX_WIDTH = 4


@triton.jit
def _silu(y):
    return y / (1.0 + tl.exp(-y))


@triton.jit
def _slot_of(slot_ids, i_n, o_d):
    """(slot as int64 clamped to >= 0, [BD] int1 vector: is the slot real).

    The validity comes back as a vector because a scalar operand in a mask trips the
    interpreter; the clamp keeps padding's (masked) addresses on the pool."""
    slot = tl.load(slot_ids + i_n).to(tl.int64)
    ok = (o_d * 0 + slot) >= 0
    return tl.maximum(slot, 0), ok


@triton.jit
def _causal_conv1d_prefill_kernel(
    x,  # [T, D], last dim contiguous
    weight,  # [D, W], contiguous
    bias,  # [D] (unread without HAS_BIAS)
    cu_seqlens,  # [N + 1]
    conv_pool,  # [S, D, W-1], contiguous
    slot_ids,  # [N]
    has_initial_state,  # [N] uint8
    y,  # [T, D], contiguous
    stride_x_t,
    D: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    TAPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    # One program per (channel block, sequence) walks its sequence front to back, so the state
    # it reads at the start and the state it writes at the end are its own: no other program
    # touches these channels of this slot, whatever the sequence's length.
    i_d = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos

    o_d = i_d * BD + tl.arange(0, BD)
    mask_d = o_d < D
    slot, slot_ok = _slot_of(slot_ids, i_n, o_d)
    has_init = tl.load(has_initial_state + i_n).to(tl.int32)
    read_state = mask_d & slot_ok & ((o_d * 0 + has_init) != 0)  # [BD]
    p_state = conv_pool + slot * (D * (W - 1)) + o_d * (W - 1)  # [BD] each channel's oldest tap

    b_bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=mask_d, other=0).to(tl.float32)

    for t0 in range(0, seqlen, BT):
        o_t = t0 + tl.arange(0, BT)  # positions within the sequence
        mask_t = o_t < seqlen
        acc = tl.zeros([BT, BD], dtype=tl.float32) + b_bias[None, :]
        for j in tl.static_range(W):
            w_j = tl.load(weight + o_d * W + j, mask=mask_d, other=0).to(tl.float32)
            p = o_t - (W - 1 - j)  # the input this tap reads; < 0 means the conv state
            in_seq = (p >= 0)[:, None] & mask_t[:, None] & mask_d[None, :]
            x_j = tl.load(x + (bos + p)[:, None] * stride_x_t + o_d[None, :], mask=in_seq, other=0)
            x_j = x_j.to(tl.float32)
            if j < W - 1:
                in_state = (p < 0)[:, None] & mask_t[:, None] & read_state[None, :]
                s_j = tl.load(p_state[None, :] + (W - 1 + p)[:, None], mask=in_state, other=0)
                x_j = tl.where(in_state, s_j.to(tl.float32), x_j)
            acc += w_j[None, :] * x_j
        if SILU:
            acc = _silu(acc)
        p_y = y + (bos + o_t)[:, None] * D + o_d[None, :]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])

    # The new state: the last W-1 inputs of (old state ++ sequence). A sequence shorter than
    # W-1 keeps part of the old state, so everything is read before anything is written.
    o_j = tl.arange(0, TAPS)
    mask_j = o_j < W - 1
    p = seqlen - (W - 1) + o_j  # [TAPS] positions within the sequence
    from_x = (p >= 0)[:, None] & mask_j[:, None] & mask_d[None, :]
    from_state = (p < 0)[:, None] & mask_j[:, None] & read_state[None, :]
    x_last = tl.load(x + (bos + p)[:, None] * stride_x_t + o_d[None, :], mask=from_x, other=0)
    s_last = tl.load(p_state[None, :] + (W - 1 + p)[:, None], mask=from_state, other=0)
    new_state = tl.where(from_x, x_last.to(tl.float32), s_last.to(tl.float32))
    tl.debug_barrier()
    write = mask_j[:, None] & (mask_d & slot_ok)[None, :]
    tl.store(p_state[None, :] + o_j[:, None], new_state.to(conv_pool.dtype.element_ty), mask=write)


@triton.jit
def _conv_step(x_row, weight, taps, o_d, mask_d, live, W: tl.constexpr, TAPS: tl.constexpr):
    """One token's conv over channels o_d ([BD]), before bias and activation, in fp32; their taps
    advance in place. x_row: the token's row of x; taps: the slot's [D, W-1] conv state; live: [BD]
    int1, the channels whose taps are read and written (padding: neither; the output is then
    meaningless and the caller drops it). The caller must be these channels' only reader and
    writer in the launch: the taps are rolled in place."""
    p_state = taps + o_d * (W - 1)  # [BD] each channel's oldest tap
    b_x = tl.load(x_row + o_d, mask=mask_d, other=0).to(tl.float32)
    acc = b_x * tl.load(weight + o_d * W + (W - 1), mask=mask_d, other=0).to(tl.float32)

    # window = [state taps 0 .. W-2, x]; the new state is window[1:].
    o_j = tl.arange(0, TAPS)
    mask_j = o_j < W - 1
    m_state = mask_j[:, None] & live[None, :]
    s = tl.load(p_state[None, :] + o_j[:, None], mask=m_state, other=0).to(tl.float32)  # [TAPS, BD]
    w = tl.load(weight + o_d[None, :] * W + o_j[:, None], mask=mask_j[:, None] & mask_d[None, :], other=0)
    acc += tl.sum(s * w.to(tl.float32), 0)
    m_next = (o_j < W - 2)[:, None] & live[None, :]
    s_next = tl.load(p_state[None, :] + (o_j + 1)[:, None], mask=m_next, other=0).to(tl.float32)
    new_state = tl.where((o_j == W - 2)[:, None], b_x[None, :], s_next)
    tl.debug_barrier()  # every thread has read the taps before any is overwritten
    tl.store(p_state[None, :] + o_j[:, None], new_state.to(taps.dtype.element_ty), mask=m_state)
    return acc


@triton.jit
def _causal_conv1d_step_kernel(
    x,  # [N, D], last dim contiguous
    weight,  # [D, W], contiguous
    bias,  # [D] (unread without HAS_BIAS)
    conv_pool,  # [S, D, W-1], contiguous
    slot_ids,  # [N]
    y,  # [N, D], contiguous
    stride_x_n,
    D: tl.constexpr,
    W: tl.constexpr,
    BD: tl.constexpr,
    TAPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    mask_d = o_d < D
    slot, slot_ok = _slot_of(slot_ids, i_n, o_d)
    live = mask_d & slot_ok
    acc = _conv_step(x + i_n * stride_x_n, weight, conv_pool + slot * (D * (W - 1)), o_d, mask_d, live, W, TAPS)
    if HAS_BIAS:
        acc += tl.load(bias + o_d, mask=mask_d, other=0).to(tl.float32)
    if SILU:
        acc = _silu(acc)
    acc = tl.where(live, acc, 0.0)
    tl.store(y + i_n * D + o_d, acc.to(y.dtype.element_ty), mask=mask_d)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, conv_pool: Tensor, activation) -> int:
    D, W = weight.shape
    assert x.shape[-1] == D, f"x has {x.shape[-1]} channels, weight {D}"
    assert 2 <= W <= _MAX_WIDTH, f"conv width {W} not in [2, {_MAX_WIDTH}]"
    assert bias is None or bias.shape == (D,), "bias must be [D]"
    assert conv_pool.is_contiguous() and conv_pool.shape[1:] == (D, W - 1), (
        f"conv_pool is {tuple(conv_pool.shape)}, want contiguous [S, {D}, {W - 1}]")
    assert activation in ("silu", None), f"unknown activation {activation!r}"
    return W


def causal_conv1d_prefill(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cu_seqlens: Tensor,
    conv_pool: Tensor,
    slot_ids: Tensor,
    has_initial_state: Tensor,
    *,
    activation: str | None = "silu",
) -> Tensor:
    """Conv over a packed varlen batch, reading and writing each sequence's state by slot.

    x: [T, D] (row stride free, last dim contiguous); weight: [D, W] (W <= 4); bias: [D] or None;
    cu_seqlens: [N + 1] int, every sequence non-empty; conv_pool: [S, D, W-1], contiguous;
    slot_ids: [N] int (< 0: no state read or written); has_initial_state: [N] bool (False: the
    sequence starts from zeros, whatever the slot held). Returns y: [T, D] in x.dtype; on return
    conv_pool[slot_ids[n]] holds sequence n's last W-1 inputs (older ones from its old state).
    """
    W = _check(x, weight, bias, conv_pool, activation)
    T, D = x.shape
    N = cu_seqlens.numel() - 1
    assert slot_ids.shape == (N,) and has_initial_state.shape == (N,), "slot_ids, has_initial_state: [N]"
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if N == 0 or T == 0:
        return y
    BD = min(128, triton.next_power_of_2(D))
    grid = (triton.cdiv(D, BD), N)
    _causal_conv1d_prefill_kernel[grid](
        x, weight.contiguous(), bias, cu_seqlens, conv_pool, slot_ids,
        has_initial_state.to(torch.uint8), y, x.stride(0),
        D=D, W=W, BT=32, BD=BD, TAPS=_MAX_WIDTH, HAS_BIAS=bias is not None, SILU=activation == "silu",
        num_warps=4,
    )
    return y


def causal_conv1d_step(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_pool: Tensor,
    slot_ids: Tensor,
    *,
    activation: str | None = "silu",
) -> Tensor:
    """One token per request: y = act(conv(window)) with the slot's window advanced in place.

    x: [N, D] (row stride free, last dim contiguous); weight: [D, W]; bias: [D] or None;
    conv_pool: [S, D, W-1], contiguous; slot_ids: [N] int, < 0 for padding (state untouched,
    output row zero). Returns y: [N, D] in x.dtype.
    """
    W = _check(x, weight, bias, conv_pool, activation)
    N, D = x.shape
    assert slot_ids.shape == (N,), "slot_ids: [N]"
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    BD = min(256, triton.next_power_of_2(D))
    grid = (triton.cdiv(D, BD), N)
    _causal_conv1d_step_kernel[grid](
        x, weight.contiguous(), bias, conv_pool, slot_ids, y, x.stride(0),
        D=D, W=W, BD=BD, TAPS=_MAX_WIDTH, HAS_BIAS=bias is not None, SILU=activation == "silu",
        num_warps=4,
    )
    return y
