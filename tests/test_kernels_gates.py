"""kernels/gates.py under the Triton interpreter against kernels/reference.py gdn_gates."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernels import reference
from kernels.gates import gdn_gates


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("T,HV", [(1, 4), (65, 6), (300, 32)])
def test_gates_match_the_reference_on_strided_views(dtype, tol, T, HV):
    gen = torch.Generator().manual_seed(T * HV)
    # a and b as the layer has them: column slices of one projection row, raw values spread wide
    # enough to reach softplus's linear branch (a + dt_bias > 20) and large negative b
    proj = (torch.randn(T, 5 + 2 * HV, generator=gen) * 12).to(dtype)
    b, a = proj[:, 5:5 + HV], proj[:, 5 + HV:]
    A_log = torch.randn(HV, generator=gen)
    dt_bias = torch.randn(HV, generator=gen)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    g_ref, beta_ref = reference.gdn_gates(a, b, A_log, dt_bias)
    assert g.dtype == beta.dtype == torch.float32 and g.shape == beta.shape == (T, HV)
    assert (a.float() + dt_bias > 20).any()
    torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(beta, beta_ref, rtol=tol, atol=tol)
