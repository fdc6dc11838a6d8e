"""Fused single-token Gated DeltaNet decode: one launch per layer for a batch of running requests.

For each request i and value head h (key head h // (HV // H)), with S = state_pool[slot_ids[i], h]:
    g = -exp(A_log) * softplus(a + dt_bias);  beta = sigmoid(b)
    q, k <- l2norm(q), l2norm(k);  q <- scale * q
    S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q
The state is read and written in place through the slot index: a decode step copies no state.
Entries with slot_ids[i] < 0 are padding (a CUDA graph captured for a larger batch): they touch
no state and their output row is zero.

State layout: [K, V] per head (state_pool is [S, HV, K, V] fp32 or bf16), the layout of the
chunkwise prefill (whose inter-chunk update K^T v_new is naturally [K, V]) and of the reference,
so one pool serves both kernels with no transpose. Each program owns a [K, BV] column block of one
head: the K-reductions (S^T k, S^T q) stay inside the program, and every row of the tile is BV
contiguous floats (256 bytes at the default BV=64: two cache lines), wide enough that the [K, V]
layout streams at 89-95% of copy bandwidth (bench/kernels_decode.py); a [V, K] layout would make
the whole tile contiguous but buys nothing measurable here and would transpose against prefill.
Decode is bound by reading and writing the state once: 2 * HV * K * V * 4 bytes per request per
layer.

A bf16 pool halves those bytes: the state is loaded into fp32, updated and used for the output in
fp32, and only the copy stored back is rounded to bf16. Its rows are 128 bytes at BV=64; the launch
shapes below were measured with fp32 state only.

`conv_recurrent_decode` folds the short conv in front (same grid, the pre-conv [q | k | v] row in,
the conv taps a ring by position, kernels/conv.py): a decode-only step's conv and delta rule in one
launch. `FOLD_CONV` in engine/models/gdn_backend.py is the switch the engine reads.

The kernel launches with programmatic dependent launch where kernels/pdl.py enables it (decode steps):
PDL on and off give the same bits (checked on an H200).

Index arithmetic on the pool is 64-bit (the slot index is cast before it is multiplied): a pool
of more than 2^31 elements is normal on an 80 GB card.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.conv import _MAX_WIDTH, _ring_conv, _ring_store, _silu, check_conv_pool
from kernels.pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _gates(b_a, b_b, b_A_log, b_dt_bias):
    """(decay = exp(g), beta) in fp32 from the raw gate inputs of one value head."""
    # softplus with torch's threshold; the select keeps exp's overflow out of the result.
    x = b_a + b_dt_bias
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    return tl.exp(-tl.exp(b_A_log) * softplus), 1.0 / (1.0 + tl.exp(-b_b))


@triton.jit
def _update_tile(p_s, mask_s, b_q, b_k, b_v, decay, beta):
    """Advance one [BK, BV] tile of a state in place (p_s: its pointers, mask_s: what is loaded and
    stored) by the token's q, k [BK] and v [BV] in fp32; returns the tile's output o [BV] in fp32."""
    return _update_loaded_tile(tl.load(p_s, mask=mask_s, other=0), p_s, mask_s, b_q, b_k, b_v, decay, beta)


@triton.jit
def _update_loaded_tile(b_s, p_s, mask_s, b_q, b_k, b_v, decay, beta):
    """_update_tile of a tile already loaded from p_s (b_s, the pool's dtype, zero off mask_s)."""
    b_s = b_s.to(tl.float32)  # [BK, BV]
    # Both K-reductions read the state as loaded; the decay and the rank-one update are folded
    # in afterwards: (d S + k delta^T)^T q = d S^T q + (k . q) delta.
    s_k = tl.sum(b_s * b_k[:, None], 0)  # [BV]
    s_q = tl.sum(b_s * b_q[:, None], 0)  # [BV]
    delta = beta * (b_v - decay * s_k)
    b_o = decay * s_q + tl.sum(b_k * b_q) * delta
    b_s = b_s * decay + b_k[:, None] * delta[None, :]
    tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=mask_s)
    return b_o


@triton.jit
def _fused_recurrent_decode_kernel(
    q,  # [N, H, K]; with FOLD_CONV the q part of the pre-conv [q | k | v] rows
    k,  # [N, H, K]; with FOLD_CONV the k part of the same rows
    v,  # [N, HV, V]; with FOLD_CONV the v part of the same rows
    a,  # [N, HV]
    b,  # [N, HV]
    A_log,  # [HV]
    dt_bias,  # [HV]
    state_pool,  # [S, HV, K, V] fp32 or bf16, contiguous
    slot_ids,  # [N]
    o,  # [N, HV, V], contiguous
    conv_weight,  # [2*H*K + HV*V, W], contiguous (read only with FOLD_CONV)
    conv_pool,  # [S, 2*H*K + HV*V, W] rings, contiguous (FOLD_CONV)
    positions,  # [N] int64 (FOLD_CONV)
    stride_q_n,
    stride_q_h,
    stride_k_n,
    stride_k_h,
    stride_v_n,
    stride_v_h,
    stride_a_n,
    stride_b_n,
    scale,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    FOLD_CONV: tl.constexpr,
    W: tl.constexpr,
    TAPS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel may launch now; it waits for this one in its own gdc_wait
        gdc_launch_dependents()
    # One flat grid (the y/z grid dimensions stop at 65535): consecutive programs walk the V
    # blocks of one head, so together they sweep its [K, V] state front to back.
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if PDL:  # every input below (q, k, v, ids, positions, gates, pools) may be the kernel before's output
        gdc_wait()

    slot = tl.load(slot_ids + i_n).to(tl.int64)
    valid = slot >= 0

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    # Padding loads and stores nothing (the validity enters as vectors: a scalar operand in a
    # mask trips the interpreter) and addresses slot 0 rather than off the pool.
    live_k = mask_k & ((o_k * 0 + slot) >= 0)
    live_v = mask_v & ((o_v * 0 + slot) >= 0)
    slot = tl.maximum(slot, 0)

    b_q = tl.load(q + i_n * stride_q_n + i_h * stride_q_h + o_k, mask=mask_k, other=0).to(tl.float32)
    b_k = tl.load(k + i_n * stride_k_n + i_h * stride_k_h + o_k, mask=mask_k, other=0).to(tl.float32)
    b_v = tl.load(v + i_n * stride_v_n + i_hv * stride_v_h + o_v, mask=mask_v, other=0).to(tl.float32)
    if FOLD_CONV:
        # The short conv (SiLU) of this token's channels, from the slot's ring of taps (kernels/conv.py).
        # A key head's q/k channels are read by all G * NV programs of its group, so one of them
        # (the group's first value head, V block 0) stores their inputs; each program stores its own
        # v channels. The stored cell is this position's, which no program reads: no race.
        D: tl.constexpr = 2 * H * K + HV * V
        pos = tl.maximum(tl.load(positions + i_n).to(tl.int64), 0)
        ring = conv_pool + slot * (D * W)
        c_q = i_h * K + o_k
        c_k = H * K + i_h * K + o_k
        c_v = 2 * H * K + i_hv * V + o_v
        writes_qk = live_k & ((o_k * 0 + (i_hv % (HV // H)) + i_v) == 0)
        x_dtype = v.dtype.element_ty
        y_q = _ring_conv(b_q, conv_weight, ring, pos, c_q, mask_k, live_k, W, TAPS)
        y_k = _ring_conv(b_k, conv_weight, ring, pos, c_k, mask_k, live_k, W, TAPS)
        y_v = _ring_conv(b_v, conv_weight, ring, pos, c_v, mask_v, live_v, W, TAPS)
        _ring_store(b_q, ring, pos, c_q, writes_qk, W)
        _ring_store(b_k, ring, pos, c_k, writes_qk, W)
        _ring_store(b_v, ring, pos, c_v, live_v, W)
        # Rounded to x's dtype, as the unfused conv stores its output.
        b_q = _silu(y_q).to(x_dtype).to(tl.float32)
        b_k = _silu(y_k).to(x_dtype).to(tl.float32)
        b_v = _silu(y_v).to(x_dtype).to(tl.float32)
    decay, beta = _gates(tl.load(a + i_n * stride_a_n + i_hv).to(tl.float32),
                         tl.load(b + i_n * stride_b_n + i_hv).to(tl.float32),
                         tl.load(A_log + i_hv).to(tl.float32), tl.load(dt_bias + i_hv).to(tl.float32))

    if USE_QK_L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    b_q = b_q * scale

    mask_s = live_k[:, None] & mask_v[None, :]
    p_s = state_pool + slot * (HV * K * V) + i_hv * (K * V) + o_k[:, None] * V + o_v[None, :]
    b_o = _update_tile(p_s, mask_s, b_q, b_k, b_v, decay, beta)

    b_o = tl.where(valid, b_o, 0.0)
    tl.store(o + i_nh * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def decode_launch_config(N: int, HV: int, K: int, V: int, device: torch.device,
                         state_bytes: int = 4) -> tuple[int, int]:
    """(BV, num_warps) for a batch: 64-wide V blocks (256-byte rows of an fp32 state) with 4 warps,
    narrowed while the grid would leave multiprocessors idle.

    Measured on an H200 (bench/kernels_decode.py sweep, B = 256 and 1024, K=V=128 and K=256
    V=512): BV=64 with 4 warps reaches 89-95% of copy bandwidth; BV=32 83-90%; BV <= 16 (rows of
    64 bytes or less) 50-75%; 8 warps at BV=64 only 67-91%.

    A bf16 state (state_bytes 2) takes 2 warps, and 32-wide blocks up to 64 programs per SM:
    measured on an H200 at H=HV=16, K=V=128 (bench/kernels_decode_state_dtype.py, one run), B = 128: 52.7 us against
    85.6 us with the fp32 shape; B = 512 and 1024: BV=64 with 2 warps, 2-3% ahead of 4 warps."""
    BK = triton.next_power_of_2(K)
    BV = min(64, triton.next_power_of_2(V))
    sms = _num_sms(device)
    while BV > 8 and N * HV * triton.cdiv(V, BV) < 2 * sms:
        BV //= 2
    if state_bytes == 2:
        if BV == 64 and N * HV * triton.cdiv(V, 64) <= 64 * sms:
            BV = 32
        return BV, 2
    num_warps = 4 if BK * BV >= 2048 else 2
    return BV, num_warps


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_recurrent_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    state_pool: Tensor,
    slot_ids: Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    BV: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """One decode token for each of N requests, updating their states in place.

    q, k: [N, H, K] and v: [N, HV, V], post-conv activations (any float dtype; the token and head
    strides are free, the last dim must be contiguous, e.g. views into one projection output);
    a, b: [N, HV] raw gate inputs; A_log, dt_bias: [HV]; state_pool: [S, HV, K, V] fp32 or bf16,
    contiguous, updated in place at rows slot_ids; slot_ids: [N] int32/int64, < 0 for padding.
    scale defaults to K ** -0.5. BV and num_warps override the launch heuristic (benchmarks).
    Returns o: [N, HV, V] in v.dtype (zero rows for padding).
    """
    q, k, v, a, b = (_last_dim_contiguous(x) for x in (q, k, v, a, b))
    return _launch(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, None, scale, use_qk_l2norm, BV, num_warps)


def conv_recurrent_decode(
    x: Tensor,
    conv_weight: Tensor,
    conv_pool: Tensor,
    positions: Tensor,
    a: Tensor,
    b: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    state_pool: Tensor,
    slot_ids: Tensor,
    *,
    num_k_heads: int,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    BV: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """fused_recurrent_decode with the short conv (SiLU, no bias) folded in: one launch where the
    unfused step takes causal_conv1d_step and fused_recurrent_decode, same grid, same result.

    x: [N, 2*H*K + HV*V] pre-conv [q | k | v] (row stride free, last dim contiguous), H =
    num_k_heads; conv_weight: [D, W] (W <= 4); conv_pool: [S, D, W] rings (kernels/conv.py),
    contiguous, each request's input stored at its position's cell; positions: [N] int64, read on
    the device. The rest as for fused_recurrent_decode. Returns o: [N, HV, V] in x.dtype.
    """
    N, D = x.shape
    HV, K, V = state_pool.shape[1:]
    H = num_k_heads
    W = conv_weight.shape[1]
    assert HV % H == 0 and D == 2 * H * K + HV * V, f"x has {D} channels, want 2*{H}*{K} + {HV}*{V}"
    assert conv_weight.shape == (D, W) and 2 <= W <= _MAX_WIDTH, f"conv_weight is {tuple(conv_weight.shape)}"
    check_conv_pool(conv_pool, D, W)
    assert positions.shape == (N,) and positions.dtype == torch.int64, "positions: [N] int64"
    x, a, b = (_last_dim_contiguous(t) for t in (x, a, b))
    q = x[:, : H * K].unflatten(1, (H, K))
    k = x[:, H * K : 2 * H * K].unflatten(1, (H, K))
    v = x[:, 2 * H * K :].unflatten(1, (HV, V))
    conv = (conv_weight.contiguous(), conv_pool, positions)
    return _launch(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, conv, scale, use_qk_l2norm, BV, num_warps)


def _launch(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, conv, scale, use_qk_l2norm, BV, num_warps):
    """Both entry points' launch; conv: (weight, pool, positions) to fold the conv in, or None."""
    N, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    assert k.shape == (N, H, K) and v.shape[0] == N, "q, k, v shapes disagree"
    assert HV % H == 0, f"HV={HV} must be a multiple of H={H}"
    assert a.shape == (N, HV) and b.shape == (N, HV), "a, b must be [N, HV]"
    assert A_log.shape == (HV,) and dt_bias.shape == (HV,), "A_log, dt_bias must be [HV]"
    assert state_pool.dtype in (torch.float32, torch.bfloat16), f"pool: fp32 or bf16, not {state_pool.dtype}"
    assert state_pool.is_contiguous(), "pool: contiguous"
    assert state_pool.shape[1:] == (HV, K, V), f"pool is {tuple(state_pool.shape)}, want [S, {HV}, {K}, {V}]"
    assert slot_ids.shape == (N,) and slot_ids.dtype in (torch.int32, torch.int64), "slot_ids: [N] int"
    assert K <= 256 and V <= 1024, "K up to 256 and V up to 1024"

    if scale is None:
        scale = K ** -0.5
    o = torch.empty(N, HV, V, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    default_BV, default_warps = decode_launch_config(N, HV, K, V, v.device, state_pool.element_size())
    BV = BV or default_BV
    num_warps = num_warps or default_warps
    conv_weight, conv_pool, positions = conv or (q, q, slot_ids)  # unread without FOLD_CONV
    grid = (N * HV * triton.cdiv(V, BV),)
    _fused_recurrent_decode_kernel[grid](
        q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, o, conv_weight, conv_pool, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        a.stride(0), b.stride(0),
        scale,
        H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV,
        USE_QK_L2NORM=use_qk_l2norm, FOLD_CONV=conv is not None,
        W=conv_weight.shape[1] if conv else 1, TAPS=_MAX_WIDTH, PDL=pdl.enabled(v.device),
        num_warps=num_warps, **pdl.launch_kwargs(v.device),
    )
    return o
