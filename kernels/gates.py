"""Gated DeltaNet's per-token gates in one launch: g = -exp(A_log) * softplus(a + dt_bias) and
beta = sigmoid(b), fp32 [T, HV], from the raw projections a, b (views of the layer's input
projection). The torch form (kernels/reference.py gdn_gates) launches eight small kernels per
layer, which is host time in every prefill step; the decode kernel computes the same in its own
launch (kernels/recurrent.py)."""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit(do_not_specialize=["T"])  # one build for every step's token count
def _gates_kernel(
    a,  # [T, HV], last dim contiguous
    b,  # [T, HV], last dim contiguous
    A_log,  # [HV] fp32
    dt_bias,  # [HV] fp32
    g,  # [T, HV] fp32, contiguous
    beta,  # [T, HV] fp32, contiguous
    T,
    stride_a_t,
    stride_b_t,
    HV: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    o_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o_h = tl.arange(0, BH)
    m_h = o_h < HV
    mask = (o_t < T)[:, None] & m_h[None, :]
    b_a = tl.load(a + o_t[:, None] * stride_a_t + o_h[None, :], mask=mask, other=0).to(tl.float32)
    b_b = tl.load(b + o_t[:, None] * stride_b_t + o_h[None, :], mask=mask, other=0).to(tl.float32)
    b_A = tl.load(A_log + o_h, mask=m_h, other=0)
    b_dt = tl.load(dt_bias + o_h, mask=m_h, other=0)
    x = b_a + b_dt[None, :]
    # softplus with torch's threshold; the select keeps exp's overflow out of the result.
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    out = o_t[:, None] * HV + o_h[None, :]
    tl.store(g + out, -tl.exp(b_A)[None, :] * softplus, mask=mask)
    tl.store(beta + out, 1.0 / (1.0 + tl.exp(-b_b)), mask=mask)


def gdn_gates(a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """a, b: [T, HV] any float dtype (row stride free); A_log, dt_bias: [HV]. Returns g, beta: fp32 [T, HV]."""
    T, HV = a.shape
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    g = torch.empty(T, HV, dtype=torch.float32, device=a.device)
    beta = torch.empty_like(g)
    if T == 0:
        return g, beta
    BH = triton.next_power_of_2(HV)
    BT = max(1, min(128, 2048 // BH))
    _gates_kernel[(triton.cdiv(T, BT),)](a, b, A_log.float().contiguous(), dt_bias.float().contiguous(), g, beta, T,
                                          a.stride(0), b.stride(0), HV=HV, BT=BT, BH=BH, num_warps=4)
    return g, beta
