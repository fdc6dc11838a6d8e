"""Attention's step between the q/k/v projections and the scores, in one launch: per-head RMSNorm of
q and k (optional), rotate-half RoPE on their first rotary_dim channels, and k and v written into
the slot pool's key/value buffers at each token's (slot, position). Done as torch ops this is ~20
small kernels a layer (casts, norms, two cats per rotation, the products, two index_puts).

For token t, head h of q (and alike of k):
    x = q[t, h];  x <- rmsnorm(x) * w  (math in fp32, rounded to q's dtype, as the torch form)
    x[:r] <- x[:r] * cos[t] + rotate_half(x[:r]) * sin[t],  rotate_half(u) = [-u[r/2:], u[:r/2]]
    cos[t][j] = cos(p_t * inv_freq[j mod r/2]) (sin alike), p_t the token's position
Math in fp32; outputs in q's dtype. The angles are computed here from the positions and the layer's
inverse frequencies (engine/models/rope.py, the same fp32 product as its tables) rather than read from
cos/sin tables, whose making was nine small torch launches a forward. Launched with PDL where
kernels/pdl.py enables it.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _norm_pairs(b_x, b_p, rstd, weight, o_d, D: tl.constexpr, R: tl.constexpr, dtype: tl.constexpr):
    """Channels o_d of rows loaded in fp32 (b_x, and b_p each channel's rotation partner, channel c +- R / 2,
    zero past R) times rstd and the norm weight, rounded to dtype as a separate RMSNorm would store them."""
    half: tl.constexpr = R // 2
    partner = tl.where(o_d < half, o_d + half, o_d - half)
    b_x = b_x * rstd * tl.load(weight + o_d, mask=o_d < D, other=0).to(tl.float32)
    b_p = b_p * rstd * tl.load(weight + partner, mask=o_d < R, other=0).to(tl.float32)
    return b_x.to(dtype).to(tl.float32), b_p.to(dtype).to(tl.float32)


@triton.jit
def _rotate(b_x, b_p, pos, inv_freq, o_d, R: tl.constexpr):
    """Rotate-half RoPE of channels o_d at position pos in fp32: the first R rotate with their partners b_p,
    the rest pass through. _norm_pairs and this are the one copy of the arithmetic: decode attention's
    one-launch form (kernels/decode_attention.py) calls them too, so the two give the same bits."""
    half: tl.constexpr = R // 2
    in_rot = o_d < R
    sign = tl.where(o_d < half, -1.0, 1.0)  # the sign each channel's partner enters with
    angle = pos.to(tl.float32) * tl.load(inv_freq + o_d % half, mask=in_rot, other=0)
    b_cos = tl.where(in_rot, tl.cos(angle), 1.0)
    b_sin = tl.where(in_rot, tl.sin(angle), 0.0)
    return b_x * b_cos + sign * b_p * b_sin  # channels past R: cos 1, sin 0


@triton.jit
def _qk_norm_rope_store_kernel(
    q,  # [T, H, D], last dim contiguous
    k,  # [T, KVH, D], last dim contiguous
    v,  # [T, KVH, D], last dim contiguous
    q_weight,  # [D] (unread without NORM)
    k_weight,  # [D] (unread without NORM)
    inv_freq,  # [R / 2] fp32
    positions,  # [T]
    token_slots,  # [T]
    q_out,  # [T, H, D], contiguous
    keys,  # [S, L, KVH, D], contiguous
    values,  # [S, L, KVH, D], contiguous
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    max_len,
    eps,
    H: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BD: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel (decode attention) may launch now; it waits for us in its own gdc_wait
        gdc_launch_dependents()
    # One program per (token, head) over the H query heads then the KVH key heads.
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    is_q = i_h < H
    o_d = tl.arange(0, BD)
    mask_d = o_d < D
    half: tl.constexpr = R // 2
    partner = tl.where(o_d < half, o_d + half, o_d - half)  # the channel each rotated one pairs with
    in_rot = o_d < R

    if is_q:
        base = q + i_t * stride_q_t + i_h * stride_q_h
        weight = q_weight
    else:
        base = k + i_t * stride_k_t + (i_h - H) * stride_k_h
        weight = k_weight
    if PDL:  # q, k, v come from the projection before; the positions are this step's too
        gdc_wait()
    b_x = tl.load(base + o_d, mask=mask_d, other=0).to(tl.float32)
    b_p = tl.load(base + partner, mask=in_rot, other=0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 0) / D + eps)
        b_x, b_p = _norm_pairs(b_x, b_p, rstd, weight, o_d, D, R, q_out.dtype.element_ty)
    pos = tl.load(positions + i_t).to(tl.int64)
    b_y = _rotate(b_x, b_p, pos, inv_freq, o_d, R)

    if is_q:
        tl.store(q_out + (i_t * H + i_h) * D + o_d, b_y.to(q_out.dtype.element_ty), mask=mask_d)
    else:
        slot = tl.load(token_slots + i_t).to(tl.int64)
        row = (slot * max_len + pos) * (KVH * D) + (i_h - H) * D
        tl.store(keys + row + o_d, b_y.to(keys.dtype.element_ty), mask=mask_d)
        b_v = tl.load(v + i_t * stride_v_t + (i_h - H) * stride_v_h + o_d, mask=mask_d, other=0)
        tl.store(values + row + o_d, b_v.to(values.dtype.element_ty), mask=mask_d)


def qk_norm_rope_store(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                       eps: float, inv_freq: Tensor, positions: Tensor, token_slots: Tensor,
                       keys: Tensor, values: Tensor) -> Tensor:
    """q: [T, H, D], k, v: [T, KVH, D] (token and head strides free, last dim contiguous: views into the
    projections); q_weight, k_weight: [D] per-head norm weights, or both None for no norm; inv_freq:
    [R / 2] fp32, R <= D the rotary channels (engine/models/rope.inverse_frequencies); positions,
    token_slots: [T] int; keys, values: [S, L, KVH, D] contiguous.
    Writes k (normed, rotated) and v into keys/values[token_slots, positions]; returns q normed and
    rotated, [T, H, D] contiguous in q's dtype."""
    T, H, D = q.shape
    KVH = k.shape[1]
    R = 2 * inv_freq.shape[0]
    assert k.shape == v.shape == (T, KVH, D), f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert (q_weight is None) == (k_weight is None), "norm both q and k or neither"
    assert inv_freq.dim() == 1 and 0 < R <= D and inv_freq.dtype == torch.float32, f"inv_freq {inv_freq.shape}, D {D}"
    assert keys.is_contiguous() and values.is_contiguous() and keys.shape[2:] == (KVH, D), "key/value buffers"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    norm = q_weight is not None
    _qk_norm_rope_store_kernel[(T, H + KVH)](
        q, k, v, q_weight if norm else q, k_weight if norm else k, inv_freq.contiguous(), positions, token_slots, q_out,
        keys, values, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        keys.shape[1], eps, H=H, KVH=KVH, D=D, R=R, BD=triton.next_power_of_2(D), NORM=norm,
        PDL=pdl.enabled(q.device), num_warps=1 if D <= 128 else 2, **pdl.launch_kwargs(q.device),
    )
    return q_out
