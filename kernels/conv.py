"""Causal depthwise conv1d (width W <= 4, optional SiLU) over slot-indexed conv state kept as a ring.

Channel d of the token at position p:  y[p, d] = act(bias[d] + sum_j weight[d, j] * x[p - (W-1) + j, d]),
with inputs at positions < 0 taken as zero. A slot's conv state is conv_pool[slot]: [D, W], a ring
of the sequence's last W inputs indexed by absolute position: x_p lives in cell p % W.

Why a ring rather than a window rolled in place: a token at p reads cells (p-1) % W .. (p-W+1) % W
and writes only cell p % W, which held x_{p-W}, an input nobody reads any more. So any number of
programs may read a channel's taps in the same launch as its one writer (kernels/recurrent.py's
decode reads a key head's q/k taps from every value head and V block of its group), and a slot is
never shifted. Cells of positions < 0 are never read (masked), so a sequence starting at position
0 ignores whatever its slot held.

Two entry points:
- causal_conv1d_prefill: a packed varlen batch ([T, D] with cu_seqlens and each token's position);
  a sequence starting at p > 0 reads its earlier inputs from its slot, and leaves its last W-1
  inputs there.
- causal_conv1d_step: one token per request (decode).
Slot indices < 0 are padding: no state is read or written, and a step's output row is zero.
Math in fp32; y in x.dtype; the state keeps the pool's dtype.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# Widest conv handled; a token's W-1 earlier taps are handled as a tile padded to this power of two.
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
def _ring_conv(b_x, weight, ring, pos, o_d, mask_d, live, W: tl.constexpr, TAPS: tl.constexpr):
    """The conv of channels o_d ([BD]) for the token at position pos (int64 scalar, >= 0) whose
    input is b_x ([BD] fp32), before bias and activation, in fp32. ring: the slot's [D, W] taps,
    read only (cells of positions pos-W+1 .. pos-1, those >= 0); live: [BD] int1, the channels
    whose taps are read (padding: none; the result is then meaningless and the caller drops it)."""
    s, w, w_last = _ring_taps(weight, ring, pos, o_d, mask_d, live, W, TAPS)
    return _taps_conv(b_x, s, w, w_last)


@triton.jit
def _ring_taps(weight, ring, pos, o_d, mask_d, live, W: tl.constexpr, TAPS: tl.constexpr):
    """What _ring_conv reads besides the token's input: (the earlier inputs [TAPS, BD], their weights
    [TAPS, BD], the token's own weight [BD]). None of it is this step's output, so a decode kernel may
    load it before its gdc_wait (kernels/pdl.py) and finish with _taps_conv after."""
    w_last = tl.load(weight + o_d * W + (W - 1), mask=mask_d, other=0)
    o_j = tl.arange(0, TAPS)
    p_j = pos - (W - 1) + o_j  # [TAPS] the positions tap j reads
    mask_j = (o_j < W - 1) & (p_j >= 0)
    cell = tl.where(p_j >= 0, p_j, 0) % W
    s = tl.load(ring + o_d[None, :] * W + cell[:, None], mask=mask_j[:, None] & live[None, :], other=0)
    w = tl.load(weight + o_d[None, :] * W + o_j[:, None], mask=(o_j < W - 1)[:, None] & mask_d[None, :], other=0)
    return s, w, w_last


@triton.jit
def _taps_conv(b_x, s, w, w_last):
    """_ring_conv from its loads (_ring_taps) and the token's input b_x ([BD] fp32)."""
    return b_x * w_last.to(tl.float32) + tl.sum(s.to(tl.float32) * w.to(tl.float32), 0)


@triton.jit
def _ring_store(b_x, ring, pos, o_d, write, W: tl.constexpr):
    """Store the token's inputs b_x of channels o_d at its own cell pos % W of the ring, where
    `write` ([BD] int1). The cell held x_{pos-W}: no token of this step reads it."""
    tl.store(ring + o_d * W + pos % W, b_x.to(ring.dtype.element_ty), mask=write)


@triton.jit
def _conv_step(x_row, weight, ring, pos, o_d, mask_d, live, W: tl.constexpr, TAPS: tl.constexpr):
    """One token's conv over channels o_d ([BD]) at position pos, before bias and activation, in
    fp32, its input stored in the ring where live. x_row: the token's row of x; ring: the slot's
    [D, W] taps. Other programs may read these channels' taps in the same launch (see the module
    docstring); only one may write them."""
    b_x = tl.load(x_row + o_d, mask=mask_d, other=0)
    acc = _ring_conv(b_x.to(tl.float32), weight, ring, pos, o_d, mask_d, live, W, TAPS)
    _ring_store(b_x, ring, pos, o_d, live, W)
    return acc


@triton.jit
def _causal_conv1d_prefill_kernel(
    x,  # [T, D], last dim contiguous
    weight,  # [D, W], contiguous
    bias,  # [D] (unread without HAS_BIAS)
    cu_seqlens,  # [N + 1]
    positions,  # [T] int64, each token's position in its sequence
    conv_pool,  # [S, D, W], contiguous
    slot_ids,  # [N]
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
    # One program per (channel block, sequence) walks its sequence front to back, so the taps
    # it reads at the start and writes at the end are its own: no other program touches these
    # channels of this slot, whatever the sequence's length.
    i_d = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    start = tl.load(positions + bos).to(tl.int64)  # the first token's position

    o_d = i_d * BD + tl.arange(0, BD)
    mask_d = o_d < D
    slot, slot_ok = _slot_of(slot_ids, i_n, o_d)
    live = mask_d & slot_ok
    ring = conv_pool + slot * (D * W)

    b_bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=mask_d, other=0).to(tl.float32)

    for t0 in range(0, seqlen, BT):
        o_t = t0 + tl.arange(0, BT)  # indices within the sequence
        mask_t = o_t < seqlen
        acc = tl.zeros([BT, BD], dtype=tl.float32) + b_bias[None, :]
        for j in tl.static_range(W):
            w_j = tl.load(weight + o_d * W + j, mask=mask_d, other=0).to(tl.float32)
            t = o_t - (W - 1 - j)  # the input this tap reads; < 0 means before the sequence: the ring
            in_seq = (t >= 0)[:, None] & mask_t[:, None] & mask_d[None, :]
            x_j = tl.load(x + (bos + t)[:, None] * stride_x_t + o_d[None, :], mask=in_seq, other=0)
            x_j = x_j.to(tl.float32)
            if j < W - 1:
                p = start + t  # absolute position; < 0: before the sequence began, zero
                in_ring = ((t < 0) & (p >= 0) & mask_t)[:, None] & live[None, :]
                cell = tl.where(p >= 0, p, 0) % W
                s_j = tl.load(ring + o_d[None, :] * W + cell[:, None], mask=in_ring, other=0)
                x_j = tl.where(in_ring, s_j.to(tl.float32), x_j)
            acc += w_j[None, :] * x_j
        if SILU:
            acc = _silu(acc)
        p_y = y + (bos + o_t)[:, None] * D + o_d[None, :]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])

    # The sequence's last W-1 inputs go to their cells; older cells keep what they held (a
    # sequence shorter than W-1 leaves earlier inputs in place). A cell written here may be one
    # the loop above read (x_{start-W+1+i} and x_{start+1+i} share it), hence the barrier.
    o_j = tl.arange(0, TAPS)
    t = seqlen - (W - 1) + o_j  # [TAPS] indices within the sequence
    mask_j = (o_j < W - 1) & (t >= 0)
    from_x = mask_j[:, None] & mask_d[None, :]
    x_last = tl.load(x + (bos + t)[:, None] * stride_x_t + o_d[None, :], mask=from_x, other=0)
    cell = (start + tl.where(t >= 0, t, 0)) % W
    tl.debug_barrier()
    tl.store(ring + o_d[None, :] * W + cell[:, None], x_last.to(conv_pool.dtype.element_ty),
             mask=mask_j[:, None] & live[None, :])


@triton.jit
def _causal_conv1d_step_kernel(
    x,  # [N, D], last dim contiguous
    weight,  # [D, W], contiguous
    bias,  # [D] (unread without HAS_BIAS)
    conv_pool,  # [S, D, W], contiguous
    slot_ids,  # [N]
    positions,  # [N] int64, each token's position
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
    pos = tl.maximum(tl.load(positions + i_n).to(tl.int64), 0)  # padding's, whatever it is, stays on the ring
    acc = _conv_step(x + i_n * stride_x_n, weight, conv_pool + slot * (D * W), pos, o_d, mask_d, live, W, TAPS)
    if HAS_BIAS:
        acc += tl.load(bias + o_d, mask=mask_d, other=0).to(tl.float32)
    if SILU:
        acc = _silu(acc)
    acc = tl.where(live, acc, 0.0)
    tl.store(y + i_n * D + o_d, acc.to(y.dtype.element_ty), mask=mask_d)


def check_conv_pool(conv_pool: Tensor, D: int, W: int) -> None:
    assert conv_pool.is_contiguous() and conv_pool.shape[1:] == (D, W), (
        f"conv_pool is {tuple(conv_pool.shape)}, want a contiguous ring [S, {D}, {W}]")


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, conv_pool: Tensor, positions: Tensor, activation) -> int:
    D, W = weight.shape
    assert x.shape[-1] == D, f"x has {x.shape[-1]} channels, weight {D}"
    assert 2 <= W <= _MAX_WIDTH, f"conv width {W} not in [2, {_MAX_WIDTH}]"
    assert bias is None or bias.shape == (D,), "bias must be [D]"
    check_conv_pool(conv_pool, D, W)
    assert positions.shape == (x.shape[0],) and positions.dtype == torch.int64, "positions: [T] int64"
    assert activation in ("silu", None), f"unknown activation {activation!r}"
    return W


def causal_conv1d_prefill(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cu_seqlens: Tensor,
    positions: Tensor,
    conv_pool: Tensor,
    slot_ids: Tensor,
    *,
    activation: str | None = "silu",
) -> Tensor:
    """Conv over a packed varlen batch, reading and writing each sequence's taps by slot.

    x: [T, D] (row stride free, last dim contiguous); weight: [D, W] (W <= 4); bias: [D] or None;
    cu_seqlens: [N + 1] int, every sequence non-empty; positions: [T] int64, each token's position
    in its sequence (consecutive within a sequence; only each first one is read); conv_pool:
    [S, D, W] rings, contiguous; slot_ids: [N] int (< 0: no state read or written). A sequence
    starting at position 0 reads nothing from its slot. Returns y: [T, D] in x.dtype; on return
    each slot's ring holds its sequence's last W-1 inputs at their cells.
    """
    W = _check(x, weight, bias, conv_pool, positions, activation)
    T, D = x.shape
    N = cu_seqlens.numel() - 1
    assert slot_ids.shape == (N,), "slot_ids: [N]"
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if N == 0 or T == 0:
        return y
    BD = min(128, triton.next_power_of_2(D))
    grid = (triton.cdiv(D, BD), N)
    _causal_conv1d_prefill_kernel[grid](
        x, weight.contiguous(), bias, cu_seqlens, positions, conv_pool, slot_ids, y, x.stride(0),
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
    positions: Tensor,
    *,
    activation: str | None = "silu",
) -> Tensor:
    """One token per request: y = act(conv) from the slot's ring, the token's input stored in it.

    x: [N, D] (row stride free, last dim contiguous); weight: [D, W]; bias: [D] or None;
    conv_pool: [S, D, W] rings, contiguous; slot_ids: [N] int, < 0 for padding (state untouched,
    output row zero); positions: [N] int64, each token's position, read on the device. Returns
    y: [N, D] in x.dtype.
    """
    W = _check(x, weight, bias, conv_pool, positions, activation)
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
        x, weight.contiguous(), bias, conv_pool, slot_ids, positions, y, x.stride(0),
        D=D, W=W, BD=BD, TAPS=_MAX_WIDTH, HAS_BIAS=bias is not None, SILU=activation == "silu",
        num_warps=4,
    )
    return y
