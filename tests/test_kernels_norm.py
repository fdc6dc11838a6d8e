"""kernels/norm.py's fused gated RMSNorm, under the Triton interpreter, against float64 PyTorch."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
import torch.nn.functional as F

from kernels.norm import gated_rms_norm


def gated_rms_norm_f64(x, z, weight, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double() * F.silu(z.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("M,N", [(37, 32), (5, 96)])
def test_gated_rms_norm_matches_float64(dtype, tol, M, N):
    gen = torch.Generator().manual_seed(M)
    xz = torch.randn(M, 2 * N, generator=gen).to(dtype)
    x, z = xz[:, :N], xz[:, N:]  # strided views, as split from one projection
    weight = torch.randn(N, generator=gen)
    y = gated_rms_norm(x, z, weight, 1e-6)
    ref = gated_rms_norm_f64(x, z, weight, 1e-6)
    assert y.dtype == dtype and y.shape == (M, N)
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
