"""Fused gated RMSNorm, the step between a Gated DeltaNet layer's recurrence and its output
projection:  y = x / sqrt(mean(x^2) + eps) * weight * silu(z),  per row, math in fp32.

Rows are one value head each ([tokens * HV, V]): the norm is per head, as in the checkpoints.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gated_rms_norm_kernel(
    x,  # [M, N], last dim contiguous
    z,  # [M, N], last dim contiguous
    weight,  # [N]
    y,  # [M, N], contiguous
    M,
    stride_x_m,
    stride_z_m,
    eps,
    N: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    mask_n = o_n < N
    mask = (o_m < M)[:, None] & mask_n[None, :]
    b_x = tl.load(x + o_m[:, None] * stride_x_m + o_n[None, :], mask=mask, other=0).to(tl.float32)
    b_z = tl.load(z + o_m[:, None] * stride_z_m + o_n[None, :], mask=mask, other=0).to(tl.float32)
    b_w = tl.load(weight + o_n, mask=mask_n, other=0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / N + eps)  # [BM]
    b_y = b_x * rstd[:, None] * b_w[None, :] * (b_z / (1.0 + tl.exp(-b_z)))
    tl.store(y + o_m[:, None] * N + o_n[None, :], b_y.to(y.dtype.element_ty), mask=mask)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """rmsnorm(x) * weight * silu(z) over the last dim.

    x, z: [M, N] (row strides free, last dim contiguous; any float dtypes); weight: [N].
    Returns y: [M, N] in x.dtype.
    """
    M, N = x.shape
    assert z.shape == (M, N) and weight.shape == (N,), f"x {x.shape}, z {z.shape}, weight {weight.shape}"
    assert N <= 16384, "rows wider than 16384 are not supported"
    x = x if x.stride(-1) == 1 else x.contiguous()
    z = z if z.stride(-1) == 1 else z.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    BN = triton.next_power_of_2(N)
    BM = max(1, min(16, 4096 // BN))  # a few rows per program for narrow heads
    grid = (triton.cdiv(M, BM),)
    _gated_rms_norm_kernel[grid](
        x, z, weight, y, M, x.stride(0), z.stride(0), eps,
        N=N, BM=BM, BN=BN, num_warps=4 if BN <= 1024 else 8,
    )
    return y
