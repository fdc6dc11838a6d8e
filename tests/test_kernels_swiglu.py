"""kernels/swiglu.py under the Triton interpreter against the torch form of the MLP's activation."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
import torch.nn.functional as F

from kernels.swiglu import silu_mul


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("T,I", [(3, 96), (2, 1500)])
def test_silu_mul_matches_the_torch_form(dtype, tol, T, I):
    x = torch.randn(T, 2 * I, generator=torch.Generator().manual_seed(I)).to(dtype)
    gate, up = x.double().chunk(2, dim=-1)
    ref = F.silu(gate) * up
    y = silu_mul(x)
    assert y.shape == (T, I) and y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
