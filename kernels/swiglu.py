"""The SwiGLU MLP's activation in one launch: y = silu(gate) * up from the gate/up projection's
output [T, 2I] = [gate | up], math in fp32 (the torch form is a silu and a product, two kernels
and an intermediate)."""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _silu_mul_kernel(
    x,  # [T, 2I], last dim contiguous
    y,  # [T, I], contiguous
    stride_x_t,
    I: tl.constexpr,
    BI: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_i = tl.program_id(1) * BI + tl.arange(0, BI)
    mask = o_i < I
    b_g = tl.load(x + i_t * stride_x_t + o_i, mask=mask, other=0).to(tl.float32)
    b_u = tl.load(x + i_t * stride_x_t + I + o_i, mask=mask, other=0).to(tl.float32)
    b_y = b_g / (1.0 + tl.exp(-b_g)) * b_u
    tl.store(y + i_t * I + o_i, b_y.to(y.dtype.element_ty), mask=mask)


def silu_mul(x: Tensor) -> Tensor:
    """x: [T, 2I] = [gate | up] (row stride free, last dim contiguous) -> silu(gate) * up: [T, I] in x.dtype."""
    T, two_i = x.shape
    assert two_i % 2 == 0, f"x's last dim {two_i} is not [gate | up]"
    I = two_i // 2
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(T, I, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    BI = min(1024, triton.next_power_of_2(I))
    _silu_mul_kernel[(T, triton.cdiv(I, BI))](x, y, x.stride(0), I=I, BI=BI, num_warps=4)
    return y
