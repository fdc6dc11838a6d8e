"""A Gated DeltaNet layer's whole single-token step between its two projections, in one launch:
short conv (SiLU) over [q | k | v] -> gated delta rule -> gated RMSNorm, for a batch of requests.

    y = rmsnorm(o) * w * silu(z),  o = delta_rule(conv(x))  (kernels/conv.py, kernels/recurrent.py)

The unfused step is three launches (causal_conv1d_step, fused_recurrent_decode, gated_rms_norm)
plus the gaps between them. Here one program owns a (request, key head): it convolves that head's
q and k once, then walks the group's G = HV / H value heads, each a [K, V] state with its v
channels, in [K, BV] tiles (the whole row where it fits). Owning whole V rows is what the gated
RMSNorm over V needs, so it is the epilogue. (The conv taps are a ring indexed by position,
kernels/conv.py, so reading them from several programs would be race-free too: kernels/recurrent.py
folds the conv into the decode kernel's finer grid that way.)

The price is fewer, longer programs (N * H of them, against N * HV * V / BV for the decode
kernel): at batches that fill the GPU the state streams slower than in the decode kernel and the
three unfused launches win; `use_fused_decode` says when to take it (small batches, fp32 state).
Values are rounded where the unfused path stores them (the conv output and o to x's dtype), so
the two paths differ only by summation order.

Padding (slot id < 0) reads and writes no conv or recurrent state; its output row is zero.
Launched with PDL where kernels/pdl.py enables it.

A split form was tried (2026-11-27): the decode kernel's grid (32-wide V blocks, 64 programs at B = 1),
the head's last-arriving program norming the row (an atomic counter per head). Alone, in graphs of
launches over distinct slots, it was faster (B = 1 6.9 against this kernel's 7.5 us); in the engine's
step it was slower at B = 1 and 4 (0.869 and 0.991 ms against 0.862 and 0.981 with this kernel and
PDL, two runs each, H200): removed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.conv import _MAX_WIDTH, _conv_step, _ring_store, _ring_taps, _silu, _taps_conv, check_conv_pool
from kernels.pdl import gdc_launch_dependents, gdc_wait
from kernels.recurrent import _gates, _num_sms, _update_loaded_tile, _update_tile

# Largest [K, BV] tile a program holds whole (fp32 in 4 warps' registers): K = V = 128.
MAX_TILE = 128 * 128


@triton.jit
def _conv_silu(x_row, weight, ring, pos, o_d, mask_d, live, W: tl.constexpr, TAPS: tl.constexpr,
               dtype: tl.constexpr):
    """SiLU(conv) of channels o_d, rounded to `dtype` as the unfused conv's output is, in fp32."""
    return _silu(_conv_step(x_row, weight, ring, pos, o_d, mask_d, live, W, TAPS)).to(dtype).to(tl.float32)


@triton.jit
def _conv_silu_taps(x_row, ring, pos, o_d, mask_d, live, s, w, w_last, W: tl.constexpr, dtype: tl.constexpr):
    """_conv_silu with the taps already loaded (kernels/conv.py _ring_taps): the same bits."""
    b_x = tl.load(x_row + o_d, mask=mask_d, other=0)
    acc = _taps_conv(b_x.to(tl.float32), s, w, w_last)
    _ring_store(b_x, ring, pos, o_d, live, W)
    return _silu(acc).to(dtype).to(tl.float32)


@triton.jit
def _conv_decode_norm_kernel(
    x,  # [N, D] pre-conv [q | k | v], D = 2 * H * K + HV * V; last dim contiguous
    conv_weight,  # [D, W], contiguous
    conv_pool,  # [S, D, W] rings, contiguous
    positions,  # [N] int64
    z,  # [N, HV, V] output gate; last dim contiguous
    a,  # [N, HV]
    b,  # [N, HV]
    A_log,  # [HV]
    dt_bias,  # [HV]
    norm_weight,  # [V]
    state_pool,  # [S, HV, K, V] fp32 or bf16, contiguous
    slot_ids,  # [N]
    y,  # [N, HV, V], contiguous
    stride_x_n,
    stride_z_n,
    stride_z_h,
    stride_a_n,
    stride_b_n,
    scale,
    eps,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    W: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    TAPS: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # see kernels/pdl.py
        gdc_launch_dependents()
    D: tl.constexpr = 2 * H * K + HV * V
    G: tl.constexpr = HV // H
    NV: tl.constexpr = (V + BV - 1) // BV
    # A head's whole state in one tile: loaded before gdc_wait (below).
    PRELOAD: tl.constexpr = G == 1 and NV == 1
    pid = tl.program_id(0).to(tl.int64)
    i_n = pid // H
    i_h = pid % H
    dtype = y.dtype.element_ty

    # Before gdc_wait only what no kernel of the step writes (kernels/pdl.py): slot ids and positions
    # (copied in before the step) and this slot's state (written by this layer's kernel in earlier
    # steps only), so the state's stream overlaps the kernel before, not our critical path.
    slot_id = tl.load(slot_ids + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    mask_k = o_k < K
    # Validity as vectors (a scalar operand in a mask trips the interpreter); padding addresses
    # slot 0 under a false mask rather than off the pool.
    live_k = mask_k & ((o_k * 0 + slot_id) >= 0)
    slot = tl.maximum(slot_id, 0)
    x_row = x + i_n * stride_x_n
    ring = conv_pool + slot * (D * W)
    pos = tl.maximum(tl.load(positions + i_n).to(tl.int64), 0)
    if PRELOAD:  # and the head's constants
        o_v0 = tl.arange(0, BV)
        mask_v0 = o_v0 < V
        mask_s0 = live_k[:, None] & mask_v0[None, :]
        p_s0 = state_pool + slot * (HV * K * V) + i_h * (K * V) + o_k[:, None] * V + o_v0[None, :]
        b_s0 = tl.load(p_s0, mask=mask_s0, other=0)
        b_A_log = tl.load(A_log + i_h).to(tl.float32)
        b_dt_bias = tl.load(dt_bias + i_h).to(tl.float32)
        b_nw = tl.load(norm_weight + o_v0, mask=mask_v0, other=0).to(tl.float32)
        # The conv's earlier taps too (written by this layer's kernel in earlier steps only): after the
        # wait only this token's q, k, v are read, from L2, where the ring's cells came from memory.
        c_q, c_k, c_v0 = i_h * K + o_k, H * K + i_h * K + o_k, 2 * H * K + i_h * V + o_v0
        live_v0 = mask_v0 & ((o_v0 * 0 + slot_id) >= 0)
        s_q, w_q, last_q = _ring_taps(conv_weight, ring, pos, c_q, mask_k, live_k, W, TAPS)
        s_k, w_k, last_k = _ring_taps(conv_weight, ring, pos, c_k, mask_k, live_k, W, TAPS)
        s_v, w_v, last_v = _ring_taps(conv_weight, ring, pos, c_v0, mask_v0, live_v0, W, TAPS)
    if PDL:  # everything below reads the kernel before's outputs
        gdc_wait()
    if PRELOAD:  # the output gate's load goes out with the conv's, not after the state update
        b_z0 = tl.load(z + i_n * stride_z_n + i_h * stride_z_h + o_v0, mask=mask_v0, other=0).to(tl.float32)
        b_q = _conv_silu_taps(x_row, ring, pos, c_q, mask_k, live_k, s_q, w_q, last_q, W, dtype)
        b_k = _conv_silu_taps(x_row, ring, pos, c_k, mask_k, live_k, s_k, w_k, last_k, W, dtype)
    else:
        b_q = _conv_silu(x_row, conv_weight, ring, pos, i_h * K + o_k, mask_k, live_k, W, TAPS, dtype)
        b_k = _conv_silu(x_row, conv_weight, ring, pos, H * K + i_h * K + o_k, mask_k, live_k, W, TAPS, dtype)
    if USE_QK_L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    b_q = b_q * scale

    if PRELOAD:
        # The head's whole row is this program's: o stays in registers, normed and gated in one pass,
        # with the rounding of the two-pass form below (o to x's dtype first).
        decay, beta = _gates(tl.load(a + i_n * stride_a_n + i_h).to(tl.float32),
                             tl.load(b + i_n * stride_b_n + i_h).to(tl.float32), b_A_log, b_dt_bias)
        b_v = _conv_silu_taps(x_row, ring, pos, c_v0, mask_v0, live_v0, s_v, w_v, last_v, W, dtype)
        b_o = _update_loaded_tile(b_s0, p_s0, mask_s0, b_q, b_k, b_v, decay, beta)
        b_o = tl.where(live_v0, b_o, 0.0).to(dtype).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(b_o * b_o) / V + eps)
        tl.store(y + (i_n * HV + i_h) * V + o_v0, (b_o * rstd * b_nw * _silu(b_z0)).to(dtype), mask=mask_v0)
        return

    for g in tl.static_range(G):
        i_hv = i_h * G + g
        decay, beta = _gates(tl.load(a + i_n * stride_a_n + i_hv).to(tl.float32),
                             tl.load(b + i_n * stride_b_n + i_hv).to(tl.float32),
                             tl.load(A_log + i_hv).to(tl.float32), tl.load(dt_bias + i_hv).to(tl.float32))
        p_y = y + (i_n * HV + i_hv) * V
        # Pass 1, the V blocks of the head: its state advances and o, rounded as the unfused path
        # stores it, goes to y; pass 2 norms the row. One block where the whole row fits a program.
        sum_sq = 0.0
        for i_v in tl.static_range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            mask_v = o_v < V
            live_v = mask_v & ((o_v * 0 + slot_id) >= 0)
            b_v = _conv_silu(x_row, conv_weight, ring, pos, 2 * H * K + i_hv * V + o_v, mask_v, live_v, W, TAPS, dtype)
            p_s = state_pool + slot * (HV * K * V) + i_hv * (K * V) + o_k[:, None] * V + o_v[None, :]
            b_o = _update_tile(p_s, live_k[:, None] & mask_v[None, :], b_q, b_k, b_v, decay, beta)
            b_o = tl.where(live_v, b_o, 0.0).to(dtype)
            tl.store(p_y + o_v, b_o, mask=mask_v)
            b_o = b_o.to(tl.float32)
            sum_sq += tl.sum(b_o * b_o)
        rstd = 1.0 / tl.sqrt(sum_sq / V + eps)
        tl.debug_barrier()  # o, stored by other threads of this program, is read back below
        for i_v in tl.static_range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            mask_v = o_v < V
            b_o = tl.load(p_y + o_v, mask=mask_v, other=0).to(tl.float32)
            b_z = tl.load(z + i_n * stride_z_n + i_hv * stride_z_h + o_v, mask=mask_v, other=0).to(tl.float32)
            b_w = tl.load(norm_weight + o_v, mask=mask_v, other=0).to(tl.float32)
            tl.store(p_y + o_v, (b_o * rstd * b_w * _silu(b_z)).to(dtype), mask=mask_v)


def use_fused_decode(N: int, H: int, HV: int, K: int, V: int, device: torch.device, state_bytes: int = 4) -> bool:
    """Whether a decode-only step of N requests takes conv_decode_norm rather than the unfused kernels
    (conv_recurrent_decode, gated_rms_norm): where it was measured faster, an fp32 state whose [K, V]
    tile a program holds whole, in batches of up to half a value head per multiprocessor (N * HV;
    B <= 4 at HV = 16 on an H200).

    Measured on an H200 (2026-11-27; graphs of >= 20 launches over distinct slots, >= 128 MB of state a
    replay so it streams from memory as in a step; H = HV = 16, K = V = 128, fp32 state), us per
    layer, this kernel without PDL against the unfused two with PDL: B = 1 7.5 vs 8.4, 2 8.1 vs 9.9,
    4 8.8 vs 9.3, 8 10.7 vs 10.4, 16 15.3 vs 13.6, 32 27.3 vs 23.8, 64 50.0 vs 41.5. The state
    streams slower in N * H programs than in the decode kernel's N * HV * V / BV once the batch fills
    the GPU. In the engine's step (bench/engine.py) the unfused kernels took B = 32 from 1.333 to
    1.309 ms. An earlier sweep that left the state in L2 had put the crossing at B = 48. A bf16 state
    lost already at B = 32 (14.8 vs 14.1 us)."""
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    return state_bytes == 4 and BK * BV <= MAX_TILE and N * HV <= _num_sms(device) // 2


def fused_launch_config(K: int, V: int) -> tuple[int, int]:
    """(BV, num_warps): the whole V row as one tile where a [K, V] fp32 tile fits 4 warps'
    registers, else 64-wide blocks (256-byte rows of an fp32 state, as the decode kernel's).
    8 warps were 20-40% slower than 4 on an H200 at every batch from 1 to 256."""
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    return (BV if BK * BV <= MAX_TILE else min(BV, 64)), 4


def conv_decode_norm(
    x: Tensor,
    conv_weight: Tensor,
    conv_pool: Tensor,
    positions: Tensor,
    z: Tensor,
    a: Tensor,
    b: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    state_pool: Tensor,
    slot_ids: Tensor,
    *,
    num_k_heads: int,
    eps: float = 1e-6,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    BV: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """One decode token for each of N requests: gated_rms_norm(delta_rule(silu(conv(x))), z), the
    conv taps and recurrent states advancing in place.

    x: [N, 2*H*K + HV*V] pre-conv [q | k | v] (row stride free, last dim contiguous); conv_weight:
    [D, W] (W <= 4, no bias); conv_pool: [S, D, W] rings (kernels/conv.py), contiguous; positions: [N]
    int64, each token's position (read on the device); z: [N, HV, V] (token and head
    strides free); a, b: [N, HV] raw gate inputs; A_log, dt_bias: [HV]; norm_weight: [V];
    state_pool: [S, HV, K, V] fp32 or bf16, contiguous; slot_ids: [N] int, < 0 for padding.
    H = num_k_heads; K is state_pool's. scale defaults to K ** -0.5. BV and num_warps override
    fused_launch_config (benchmarks).
    Returns y: [N, HV, V] in x.dtype (zero rows for padding).
    """
    N, D = x.shape
    HV, K, V = state_pool.shape[1:]
    H = num_k_heads
    W = conv_weight.shape[1]
    assert HV % H == 0 and D == 2 * H * K + HV * V, f"x has {D} channels, want 2*{H}*{K} + {HV}*{V}"
    assert K <= 256, "K up to 256"
    assert conv_weight.shape == (D, W) and 2 <= W <= _MAX_WIDTH, f"conv_weight is {tuple(conv_weight.shape)}"
    check_conv_pool(conv_pool, D, W)
    assert positions.shape == (N,) and positions.dtype == torch.int64, "positions: [N] int64"
    assert z.shape == (N, HV, V) and a.shape == (N, HV) and b.shape == (N, HV), "z: [N, HV, V]; a, b: [N, HV]"
    assert A_log.shape == (HV,) and dt_bias.shape == (HV,) and norm_weight.shape == (V,)
    assert state_pool.dtype in (torch.float32, torch.bfloat16) and state_pool.is_contiguous()
    assert slot_ids.shape == (N,) and slot_ids.dtype in (torch.int32, torch.int64), "slot_ids: [N] int"
    x, z, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, z, a, b))
    y = torch.empty(N, HV, V, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    default_BV, default_warps = fused_launch_config(K, V)
    BV = BV or default_BV
    _conv_decode_norm_kernel[(N * H,)](
        x, conv_weight.contiguous(), conv_pool, positions, z, a, b, A_log, dt_bias, norm_weight, state_pool,
        slot_ids, y,
        x.stride(0), z.stride(0), z.stride(1), a.stride(0), b.stride(0),
        K ** -0.5 if scale is None else scale, eps,
        H=H, HV=HV, K=K, V=V, W=W, BK=triton.next_power_of_2(K), BV=BV,
        TAPS=_MAX_WIDTH, USE_QK_L2NORM=use_qk_l2norm, num_warps=num_warps or default_warps,
        PDL=pdl.enabled(x.device), **pdl.launch_kwargs(x.device),
    )
    return y
