"""kernels/norm.py's fused RMSNorms (gated; plain with the residual add), under the Triton interpreter,
against float64 PyTorch."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
import torch.nn.functional as F

from kernels.norm import gated_rms_norm, rms_norm


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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gated_rms_norm_reads_heads_of_a_projection_in_place(dtype, tol):
    T, H, N = 6, 3, 16
    gen = torch.Generator().manual_seed(1)
    proj = torch.randn(T, 2 * H * N + 5, generator=gen).to(dtype)
    x = torch.randn(T, H, N, generator=gen).to(dtype)
    z = proj[:, H * N:2 * H * N].view(T, H, N)  # token stride 2HN + 5, head stride N
    weight = torch.randn(N, generator=gen)
    y = gated_rms_norm(x, z, weight, 1e-6)
    ref = gated_rms_norm_f64(x, z, weight, 1e-6)
    assert y.shape == (T, H, N) and y.is_contiguous()
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("M,N", [(37, 64), (3, 96)])
def test_rms_norm_with_residual_add_matches_float64(dtype, tol, M, N):
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, N, generator=gen).to(dtype)
    delta = torch.randn(M, 2 * N, generator=gen).to(dtype)[:, :N]  # a strided view
    weight = torch.randn(N, generator=gen)
    y, s = rms_norm(x, weight, 1e-6, residual=delta)
    # The sum is rounded to x's dtype as a separate add's would be (to nearest on a GPU; the interpreter
    # truncates conversions to bf16, hence within one unit of the last place rather than equal).
    torch.testing.assert_close(s, x + delta, atol=0, rtol=2 ** -7)
    ref = rms_norm_f64(s, weight, 1e-6)
    assert y.dtype == dtype and ((y.double() - ref).norm() / ref.norm()).item() < tol
    plain, plain_ref = rms_norm(x, weight, 1e-6), rms_norm_f64(x, weight, 1e-6)
    assert ((plain.double() - plain_ref).norm() / plain_ref.norm()).item() < tol


def rms_norm_f64(x, weight, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
