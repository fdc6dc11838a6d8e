"""Fused RMSNorms, math in fp32, one launch each:

- gated_rms_norm: the step between a Gated DeltaNet layer's recurrence and its output projection,
  y = x / sqrt(mean(x^2) + eps) * weight * silu(z) per row; rows are one value head each
  ([tokens * HV, V]): the norm is per head, as in the checkpoints.
- rms_norm: the decoder's pre-norm, y = x / sqrt(mean(x^2) + eps) * weight, optionally after the
  residual add it follows (s = x + residual, rounded to x's dtype as a separate add would, is
  normed and returned too), so a block's add and norm are one kernel instead of an add and the
  three of a norm in fp32 (cast in, norm, cast out). The residual may also arrive as the split-K
  partial products of the projection that made it (kernels/decode_linear.py, a decode step's out,
  o and down projections at small batch): summed here, in the order and with the rounding of that
  kernel's own reduction, which is then one launch fewer (48 of a step's ~230 at B <= 32).

Both launch with programmatic dependent launch where kernels/pdl.py enables it (decode steps).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.pdl import gdc_launch_dependents, gdc_wait


# M (rows) changes every step: unspecialised, one compiled kernel serves every batch (Triton would
# otherwise build separate ones for M == 1 and M % 16 == 0, met first mid-serving).
@triton.jit(do_not_specialize=["M"])
def _gated_rms_norm_kernel(
    x,  # [T, H, N]: row m is (m // H, m % H); last dim contiguous
    z,  # [T, H, N], as x
    weight,  # [N]
    y,  # [T * H, N], contiguous
    M,  # T * H
    stride_x_t,
    stride_x_h,
    stride_z_t,
    stride_z_h,
    eps,
    H: tl.constexpr,
    N: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PDL: tl.constexpr,
):
    o_n = tl.arange(0, BN)
    mask_n = o_n < N
    if PDL:  # see kernels/pdl.py: the next kernel may launch now; only the weight is read before the last is done
        gdc_launch_dependents()
    b_w = tl.load(weight + o_n, mask=mask_n, other=0).to(tl.float32)
    if PDL:
        gdc_wait()
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_t, o_h = o_m // H, o_m % H
    mask = (o_m < M)[:, None] & mask_n[None, :]
    p_x = x + (o_t * stride_x_t + o_h * stride_x_h)[:, None] + o_n[None, :]
    p_z = z + (o_t * stride_z_t + o_h * stride_z_h)[:, None] + o_n[None, :]
    b_x = tl.load(p_x, mask=mask, other=0).to(tl.float32)
    b_z = tl.load(p_z, mask=mask, other=0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / N + eps)  # [BM]
    b_y = b_x * rstd[:, None] * b_w[None, :] * (b_z / (1.0 + tl.exp(-b_z)))
    tl.store(y + o_m[:, None] * N + o_n[None, :], b_y.to(y.dtype.element_ty), mask=mask)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """rmsnorm(x) * weight * silu(z) over the last dim.

    x, z: [M, N] or [T, H, N] (token and head strides free, e.g. z a view into the projection
    output; last dim contiguous; any float dtypes); weight: [N].
    Returns y: x's shape, contiguous, in x.dtype.
    """
    shape = x.shape
    assert z.shape == shape and weight.shape == (shape[-1],), f"x {x.shape}, z {z.shape}, weight {weight.shape}"
    assert x.dim() in (2, 3), "x, z: [M, N] or [T, H, N]"
    x = x if x.stride(-1) == 1 else x.contiguous()
    z = z if z.stride(-1) == 1 else z.contiguous()
    if x.dim() == 2:
        x, z = x[:, None], z[:, None]
    T, H, N = x.shape
    assert N <= 16384, "rows wider than 16384 are not supported"
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    M = T * H
    if M == 0:
        return y
    BN = triton.next_power_of_2(N)
    BM = max(1, min(16, 4096 // BN))  # a few rows per program for narrow heads
    grid = (triton.cdiv(M, BM),)
    _gated_rms_norm_kernel[grid](
        x, z, weight, y, M, x.stride(0), x.stride(1), z.stride(0), z.stride(1), eps,
        H=H, N=N, BM=BM, BN=BN, PDL=pdl.enabled(x.device), num_warps=4 if BN <= 1024 else 8,
        **pdl.launch_kwargs(x.device),
    )
    return y


@triton.jit(do_not_specialize=["M"])  # see _gated_rms_norm_kernel
def _rms_norm_kernel(
    x,  # [M, N], last dim contiguous
    residual,  # [M, N], last dim contiguous; SPLIT > 1: [SPLIT, M, N] fp32, contiguous (unread without HAS_RESIDUAL)
    weight,  # [N]
    y,  # [M, N], contiguous
    s,  # [M, N], contiguous: x + residual (unwritten without HAS_RESIDUAL)
    M,
    stride_x_m,
    stride_r_m,
    eps,
    N: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr,  # > 1: residual holds split-K partial products, summed and rounded here
    PDL: tl.constexpr,
):
    o_n = tl.arange(0, BN)
    mask_n = o_n < N
    if PDL:  # see kernels/pdl.py; the weight is no kernel's output, so it is read before the wait
        gdc_launch_dependents()
    b_w = tl.load(weight + o_n, mask=mask_n, other=0).to(tl.float32)
    if PDL:
        gdc_wait()
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    mask = (o_m < M)[:, None] & mask_n[None, :]
    b_x = tl.load(x + o_m[:, None] * stride_x_m + o_n[None, :], mask=mask, other=0)
    if HAS_RESIDUAL:
        if SPLIT > 1:  # as kernels/decode_linear's _reduce_kernel: from zero, splits in order, one rounding
            b_r = tl.zeros([BM, BN], dtype=tl.float32)
            for i_s in tl.static_range(SPLIT):
                b_r += tl.load(residual + (i_s * M + o_m[:, None]) * N + o_n[None, :], mask=mask, other=0)
            b_r = b_r.to(s.dtype.element_ty)
        else:
            b_r = tl.load(residual + o_m[:, None] * stride_r_m + o_n[None, :], mask=mask, other=0)
        b_x = (b_x.to(tl.float32) + b_r.to(tl.float32)).to(s.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(s + o_m[:, None] * N + o_n[None, :], b_x, mask=mask)
    b_x = b_x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / N + eps)  # [BM]
    b_y = b_x * rstd[:, None] * b_w[None, :]
    tl.store(y + o_m[:, None] * N + o_n[None, :], b_y.to(y.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None):
    """rmsnorm(x) * weight over the last dim, or with `residual`: s = x + residual, then
    (rmsnorm(s) * weight, s).

    x: [M, N] (row stride free, last dim contiguous; a float dtype); weight: [N]; residual: [M, N] in
    x's dtype (row stride free, last dim contiguous), or [S, M, N] fp32 split-K partial products
    (kernels/decode_linear.SplitK.parts), which stand for their sum in split order rounded to x's dtype.
    Returns y: [M, N] in x.dtype, or (y, s) with s: [M, N] in x.dtype.
    """
    M, N = x.shape
    assert weight.shape == (N,), f"x {x.shape}, weight {weight.shape}"
    split = 1
    if residual is not None and residual.dim() == 3:
        split = residual.shape[0]
        assert residual.shape[1:] == (M, N) and residual.dtype == torch.float32, "partials: [S, M, N] fp32"
        residual = residual.contiguous()
    else:
        assert residual is None or (residual.shape == (M, N) and residual.dtype == x.dtype), \
            "residual: x's shape, dtype"
    assert N <= 16384, "rows wider than 16384 are not supported"
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    s = None
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        s = torch.empty_like(y)
    if M > 0:
        BN = triton.next_power_of_2(N)
        # One row a program from 1024 wide: more programs share a decode step's few rows (engine step on an
        # H200, hidden 1024: B = 32 1.186 against 1.222-1.227 ms at 4 rows a program, B = 8 0.916 against
        # 0.943, B = 128 2.530 against 2.546-2.557; docs/performance.md, "Session 11").
        BM = max(1, min(16, 1024 // BN))
        _rms_norm_kernel[(triton.cdiv(M, BM),)](
            x, residual if residual is not None else x, weight, y, s if s is not None else y, M, x.stride(0),
            residual.stride(-2) if residual is not None else 0, eps,
            N=N, BM=BM, BN=BN, HAS_RESIDUAL=residual is not None, SPLIT=split, PDL=pdl.enabled(x.device),
            num_warps=4 if BN <= 1024 else 8, **pdl.launch_kwargs(x.device),
        )
    return y if residual is None else (y, s)
