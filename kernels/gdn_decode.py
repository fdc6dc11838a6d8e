"""A Gated DeltaNet layer's whole single-token step between its two projections, in one launch:
short conv (SiLU) over [q | k | v] -> gated delta rule -> gated RMSNorm, for a batch of requests.

    y = rmsnorm(o) * w * silu(z),  o = delta_rule(conv(x))  (kernels/conv.py, kernels/recurrent.py)

The unfused step is three launches (causal_conv1d_step, fused_recurrent_decode, gated_rms_norm)
plus the gaps between them. Folding the conv in has one trap: the q and k channels of a key head
are read by every value head of its group and every V block, and the step rolls their conv taps
in place, so a program that rolled them could race another that has yet to read them. Here one
program owns a (request, key head): it convolves that head's q and k once, then walks the group's
G = HV / H value heads, each as a whole [K, V] state tile with its v channels; every conv channel
and state element has exactly one reader-writer in the launch. Holding a whole V row is also what
the gated RMSNorm over V needs, so it is the epilogue.

The price is fewer, larger programs (N * H of them, against N * HV * V / BV for the decode kernel),
which leaves multiprocessors idle at small batches: `use_fused_decode` says when to take it.
Values are rounded where the unfused path stores them (the conv output and o to x's dtype), so
the two paths differ only by summation order.

Padding (slot id < 0) reads and writes no conv or recurrent state; its output row is zero.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.conv import _MAX_WIDTH, _conv_step, _silu
from kernels.recurrent import _gates, _num_sms, _update_tile

# Largest [K, V] tile a program holds in registers (fp32): K = V = 128.
MAX_TILE = 128 * 128


@triton.jit
def _conv_silu(x_row, weight, taps, o_d, mask_d, live, W: tl.constexpr, TAPS: tl.constexpr, dtype: tl.constexpr):
    """SiLU(conv) of channels o_d, rounded to `dtype` as the unfused conv's output is, in fp32."""
    return _silu(_conv_step(x_row, weight, taps, o_d, mask_d, live, W, TAPS)).to(dtype).to(tl.float32)


@triton.jit
def _conv_decode_norm_kernel(
    x,  # [N, D] pre-conv [q | k | v], D = 2 * H * K + HV * V; last dim contiguous
    conv_weight,  # [D, W], contiguous
    conv_pool,  # [S, D, W-1], contiguous
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
):
    D: tl.constexpr = 2 * H * K + HV * V
    G: tl.constexpr = HV // H
    pid = tl.program_id(0).to(tl.int64)
    i_n = pid // H
    i_h = pid % H
    dtype = y.dtype.element_ty

    slot = tl.load(slot_ids + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    # Validity as vectors (a scalar operand in a mask trips the interpreter); padding addresses
    # slot 0 under a false mask rather than off the pool.
    live_k = mask_k & ((o_k * 0 + slot) >= 0)
    live_v = mask_v & ((o_v * 0 + slot) >= 0)
    slot = tl.maximum(slot, 0)
    x_row = x + i_n * stride_x_n
    taps = conv_pool + slot * (D * (W - 1))

    b_q = _conv_silu(x_row, conv_weight, taps, i_h * K + o_k, mask_k, live_k, W, TAPS, dtype)
    b_k = _conv_silu(x_row, conv_weight, taps, H * K + i_h * K + o_k, mask_k, live_k, W, TAPS, dtype)
    if USE_QK_L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    b_q = b_q * scale
    b_w = tl.load(norm_weight + o_v, mask=mask_v, other=0).to(tl.float32)

    for g in tl.static_range(G):
        i_hv = i_h * G + g
        b_v = _conv_silu(x_row, conv_weight, taps, 2 * H * K + i_hv * V + o_v, mask_v, live_v, W, TAPS, dtype)
        decay, beta = _gates(tl.load(a + i_n * stride_a_n + i_hv).to(tl.float32),
                             tl.load(b + i_n * stride_b_n + i_hv).to(tl.float32),
                             tl.load(A_log + i_hv).to(tl.float32), tl.load(dt_bias + i_hv).to(tl.float32))
        p_s = state_pool + slot * (HV * K * V) + i_hv * (K * V) + o_k[:, None] * V + o_v[None, :]
        mask_s = live_k[:, None] & mask_v[None, :]
        b_o = _update_tile(p_s, mask_s, b_q, b_k, b_v, decay, beta)
        b_o = tl.where(live_v, b_o, 0.0).to(dtype).to(tl.float32)

        b_z = tl.load(z + i_n * stride_z_n + i_hv * stride_z_h + o_v, mask=mask_v, other=0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(b_o * b_o) / V + eps)
        b_y = b_o * rstd * b_w * _silu(b_z)
        tl.store(y + (i_n * HV + i_hv) * V + o_v, b_y.to(dtype), mask=mask_v)


def use_fused_decode(N: int, H: int, K: int, V: int, device: torch.device) -> bool:
    """Whether a decode-only step of N requests takes conv_decode_norm: its [K, V] tile fits a
    program, and N * H programs fill the GPU (at least 2 per multiprocessor)."""
    fits = triton.next_power_of_2(K) * triton.next_power_of_2(V) <= MAX_TILE
    return fits and N * H >= 2 * _num_sms(device)


def conv_decode_norm(
    x: Tensor,
    conv_weight: Tensor,
    conv_pool: Tensor,
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
    num_warps: int = 8,
) -> Tensor:
    """One decode token for each of N requests: gated_rms_norm(delta_rule(silu(conv(x))), z), the
    conv taps and recurrent states advancing in place.

    x: [N, 2*H*K + HV*V] pre-conv [q | k | v] (row stride free, last dim contiguous); conv_weight:
    [D, W] (W <= 4, no bias); conv_pool: [S, D, W-1], contiguous; z: [N, HV, V] (token and head
    strides free); a, b: [N, HV] raw gate inputs; A_log, dt_bias: [HV]; norm_weight: [V];
    state_pool: [S, HV, K, V] fp32 or bf16, contiguous; slot_ids: [N] int, < 0 for padding.
    H = num_k_heads; K is state_pool's. scale defaults to K ** -0.5.
    Returns y: [N, HV, V] in x.dtype (zero rows for padding).
    """
    N, D = x.shape
    HV, K, V = state_pool.shape[1:]
    H = num_k_heads
    W = conv_weight.shape[1]
    assert HV % H == 0 and D == 2 * H * K + HV * V, f"x has {D} channels, want 2*{H}*{K} + {HV}*{V}"
    assert triton.next_power_of_2(K) * triton.next_power_of_2(V) <= MAX_TILE, f"a [{K}, {V}] tile is too large"
    assert conv_weight.shape == (D, W) and 2 <= W <= _MAX_WIDTH, f"conv_weight is {tuple(conv_weight.shape)}"
    assert conv_pool.is_contiguous() and conv_pool.shape[1:] == (D, W - 1), f"conv_pool is {tuple(conv_pool.shape)}"
    assert z.shape == (N, HV, V) and a.shape == (N, HV) and b.shape == (N, HV), "z: [N, HV, V]; a, b: [N, HV]"
    assert A_log.shape == (HV,) and dt_bias.shape == (HV,) and norm_weight.shape == (V,)
    assert state_pool.dtype in (torch.float32, torch.bfloat16) and state_pool.is_contiguous()
    assert slot_ids.shape == (N,) and slot_ids.dtype in (torch.int32, torch.int64), "slot_ids: [N] int"
    x, z, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, z, a, b))
    y = torch.empty(N, HV, V, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    _conv_decode_norm_kernel[(N * H,)](
        x, conv_weight.contiguous(), conv_pool, z, a, b, A_log, dt_bias, norm_weight, state_pool, slot_ids, y,
        x.stride(0), z.stride(0), z.stride(1), a.stride(0), b.stride(0),
        K ** -0.5 if scale is None else scale, eps,
        H=H, HV=HV, K=K, V=V, W=W, BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V),
        TAPS=_MAX_WIDTH, USE_QK_L2NORM=use_qk_l2norm, num_warps=num_warps,
    )
    return y
