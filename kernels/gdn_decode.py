"""A Gated DeltaNet layer's whole single-token step between its two projections, in one launch:
short conv (SiLU) over [q | k | v] -> gated delta rule -> gated RMSNorm, for a batch of requests.

    y = rmsnorm(o) * w * silu(z),  o = delta_rule(conv(x))  (kernels/conv.py, kernels/recurrent.py)

The unfused step is two or three launches (conv_recurrent_decode or causal_conv1d_step +
fused_recurrent_decode, then gated_rms_norm) plus the gaps between them. Here the grid is the decode
kernel's (kernels/recurrent.py): a program owns a [K, BV] column block of one value head's state,
N * HV * cdiv(V, BV) programs, so even a batch of one spreads its state over the GPU. Every program
of a key head convolves that head's q and k (the conv taps are a ring indexed by position,
kernels/conv.py: reading them from many programs is race-free; the group's first program stores
their inputs), and its own v channels.

The gated RMSNorm needs the head's whole o row, which its cdiv(V, BV) programs make in pieces: each
stores its block of o (rounded to x's dtype, as the unfused path stores it) in y and counts itself
in `arrivals[n, hv]`; the one that arrives last norms the row in place, reading it back whole, and
resets the counter for the next launch. The sum of squares is over the stored row in one fixed
order whichever program arrives last, so the result is the same bits every run. The counters are
zero between launches (each launch leaves them so) and shared by all launches on a device, which
is safe because launches on one stream do not overlap (with PDL too: see kernels/pdl.py).

Padding (slot id < 0) reads and writes no conv or recurrent state; its output row is zero.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.conv import _MAX_WIDTH, _ring_conv, _ring_store, _silu, check_conv_pool
from kernels.pdl import gdc_launch_dependents, gdc_wait
from kernels.recurrent import _gates, _num_sms, _update_tile


@triton.jit
def _conv_silu(x_row, weight, ring, pos, o_d, mask_d, live, write, W: tl.constexpr, TAPS: tl.constexpr,
               dtype: tl.constexpr):
    """SiLU(conv) of channels o_d, rounded to `dtype` as the unfused conv's output is, in fp32; the
    token's inputs go to the ring where `write`."""
    b_x = tl.load(x_row + o_d, mask=mask_d, other=0)
    y = _ring_conv(b_x.to(tl.float32), weight, ring, pos, o_d, mask_d, live, W, TAPS)
    _ring_store(b_x, ring, pos, o_d, write, W)
    return _silu(y).to(dtype).to(tl.float32)


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
    arrivals,  # [>= N * HV] int32, zero
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
    ROW: tl.constexpr,  # next power of two >= V: the whole row, as the last program norms it
    TAPS: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel may launch now; it waits for this one in its own gdc_wait
        gdc_launch_dependents()
    D: tl.constexpr = 2 * H * K + HV * V
    G: tl.constexpr = HV // H
    NV: tl.constexpr = (V + BV - 1) // BV
    # One flat grid (the y/z grid dimensions stop at 65535): consecutive programs walk the V blocks
    # of one head.
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // G
    dtype = y.dtype.element_ty
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    if PDL:  # every input below (x, ids, positions, gates, pools) may be the kernel before's output
        gdc_wait()

    slot_id = tl.load(slot_ids + i_n).to(tl.int64)
    # Validity as vectors (a scalar operand in a mask trips the interpreter); padding addresses
    # slot 0 under a false mask rather than off the pool.
    live_k = mask_k & ((o_k * 0 + slot_id) >= 0)
    live_v = mask_v & ((o_v * 0 + slot_id) >= 0)
    slot = tl.maximum(slot_id, 0)
    x_row = x + i_n * stride_x_n
    ring = conv_pool + slot * (D * W)
    pos = tl.maximum(tl.load(positions + i_n).to(tl.int64), 0)

    # q and k are read by all G * NV programs of the key head; one stores their taps.
    writes_qk = live_k & ((o_k * 0 + (i_hv % G) + i_v) == 0)
    b_q = _conv_silu(x_row, conv_weight, ring, pos, i_h * K + o_k, mask_k, live_k, writes_qk, W, TAPS, dtype)
    b_k = _conv_silu(x_row, conv_weight, ring, pos, H * K + i_h * K + o_k, mask_k, live_k, writes_qk, W, TAPS,
                     dtype)
    b_v = _conv_silu(x_row, conv_weight, ring, pos, 2 * H * K + i_hv * V + o_v, mask_v, live_v, live_v, W, TAPS,
                     dtype)
    if USE_QK_L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    b_q = b_q * scale
    decay, beta = _gates(tl.load(a + i_n * stride_a_n + i_hv).to(tl.float32),
                         tl.load(b + i_n * stride_b_n + i_hv).to(tl.float32),
                         tl.load(A_log + i_hv).to(tl.float32), tl.load(dt_bias + i_hv).to(tl.float32))

    p_s = state_pool + slot * (HV * K * V) + i_hv * (K * V) + o_k[:, None] * V + o_v[None, :]
    b_o = _update_tile(p_s, live_k[:, None] & mask_v[None, :], b_q, b_k, b_v, decay, beta)
    p_y = y + i_nh * V
    tl.store(p_y + o_v, tl.where(live_v, b_o, 0.0).to(dtype), mask=mask_v)

    # Every thread's block of o is stored before the arrival is counted (the barrier), and visible
    # to the GPU before it (the atomic's release); the last arrival's acquire makes the others'
    # blocks visible to it.
    tl.debug_barrier()
    if NV > 1:
        arrived = tl.atomic_add(arrivals + i_nh, 1, sem="acq_rel", scope="gpu")
    else:
        arrived = 0
    if arrived == NV - 1:
        if NV > 1:
            tl.store(arrivals + i_nh, 0)
        tl.debug_barrier()
        o_r = tl.arange(0, ROW)
        mask_r = o_r < V
        # .cg: from L2, where the other programs' blocks are, never a stale line of this SM's L1.
        b_row = tl.load(p_y + o_r, mask=mask_r, other=0, cache_modifier=".cg").to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(b_row * b_row) / V + eps)
        b_z = tl.load(z + i_n * stride_z_n + i_hv * stride_z_h + o_r, mask=mask_r, other=0).to(tl.float32)
        b_w = tl.load(norm_weight + o_r, mask=mask_r, other=0).to(tl.float32)
        tl.store(p_y + o_r, (b_row * rstd * b_w * _silu(b_z)).to(dtype), mask=mask_r)


# Per device: the arrival counters of every launch there, all zero between launches. A buffer that
# grew too small is kept (not freed): a CUDA graph captured with it still uses it.
_ARRIVALS: dict[torch.device, list[Tensor]] = {}


def _arrivals(count: int, device: torch.device) -> Tensor:
    """An int32 counter per (request, value head), zero: count = N * HV of the launch."""
    buffers = _ARRIVALS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def use_fused_decode(N: int, H: int, HV: int, K: int, V: int, device: torch.device, state_bytes: int = 4) -> bool:
    """Whether a decode-only step of N requests takes conv_decode_norm rather than the unfused
    kernels (conv_recurrent_decode, gated_rms_norm): where it was measured faster, an fp32 state in
    batches of up to half a value head per multiprocessor (N * HV; B <= 4 at HV = 16 on an H200).

    Measured on an H200 (CUDA graphs of >= 20 launches over distinct slots, >= 128 MB of state per
    replay so that it streams from memory as in a step; H = HV = 16, K = V = 128, bf16 x, fp32
    state; PDL on; one run), unfused against fused, us per layer: B = 1 8.4 vs 6.9, 2 9.9 vs 7.7,
    4 9.3 vs 9.1, 8 10.4 vs 10.7, 16 13.6 vs 14.8, 32 23.8 vs 26.4, 64 41.5 vs 48.5. Past a few
    requests the split state blocks stream no faster than the decode kernel's, and the fused
    kernel's tail (the arrival, then the last program's norm) costs more than the norm's launch.
    (The whole-row kernel this replaced, one program a key head, without PDL: 7.5, 8.1, 8.8, 10.7,
    15.3, 27.3, 50.0.) A bf16 state was measured at B = 1 only (7.0 vs 9.6 us, PDL off for the
    fused): not taken yet."""
    return state_bytes == 4 and N * HV <= _num_sms(device) // 2


def fused_launch_config(K: int, V: int) -> tuple[int, int]:
    """(BV, num_warps): 32-wide V blocks (four programs a head at V = 128) with 2 warps, at every
    batch, so one compiled kernel serves all the batches that take it (engine/warmup.py counts on
    that). Measured on an H200 at B = 1, 2, 4, 8, PDL on, us: BV = 32 2 warps 6.9, 7.7, 9.1, 10.7;
    32 / 4 warps 6.8, 7.8, 9.5, 11.2; 16 / 4 7.1, 8.5, 9.2, 11.0; 64 / 4 6.9, 8.0, 9.5, 11.2; the
    whole row (128 / 4) 7.2, 7.6, 9.3, 11.0. 4 warps where a wide K makes the tile twice as large."""
    BK, BV = triton.next_power_of_2(K), min(32, triton.next_power_of_2(V))
    return BV, 2 if BK * BV <= 128 * 32 else 4


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
    assert K <= 256 and V <= 1024, "K up to 256 and V up to 1024"
    assert conv_weight.shape == (D, W) and 2 <= W <= _MAX_WIDTH, f"conv_weight is {tuple(conv_weight.shape)}"
    check_conv_pool(conv_pool, D, W)
    assert positions.shape == (N,) and positions.dtype == torch.int64, "positions: [N] int64"
    assert z.shape == (N, HV, V) and a.shape == (N, HV) and b.shape == (N, HV), "z: [N, HV, V]; a, b: [N, HV]"
    assert A_log.shape == (HV,) and dt_bias.shape == (HV,) and norm_weight.shape == (V,)
    assert state_pool.dtype in (torch.float32, torch.bfloat16) and state_pool.is_contiguous()
    assert slot_ids.shape == (N,) and slot_ids.dtype in (torch.int32, torch.int64), "slot_ids: [N] int"
    x, z, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, z, a, b))
    y = torch.empty(N, HV, V, dtype=x.dtype, device=x.device)  # [N, HV, V]
    if N == 0:
        return y
    default_BV, default_warps = fused_launch_config(K, V)
    BV = BV or default_BV
    _conv_decode_norm_kernel[(N * HV * triton.cdiv(V, BV),)](
        x, conv_weight.contiguous(), conv_pool, positions, z, a, b, A_log, dt_bias, norm_weight, state_pool,
        slot_ids, y, _arrivals(N * HV, x.device),
        x.stride(0), z.stride(0), z.stride(1), a.stride(0), b.stride(0),
        K ** -0.5 if scale is None else scale, eps,
        H=H, HV=HV, K=K, V=V, W=W, BK=triton.next_power_of_2(K), BV=BV, ROW=triton.next_power_of_2(V),
        TAPS=_MAX_WIDTH, USE_QK_L2NORM=use_qk_l2norm, PDL=pdl.enabled(x.device),
        num_warps=num_warps or default_warps, **pdl.launch_kwargs(x.device),
    )
    return y
