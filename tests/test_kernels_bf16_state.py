"""The decode and prefill kernels on a bf16 state pool, under the Triton interpreter, against the
fp32 reference: they load the state into fp32, compute in fp32 and round only what they store, so
the error is what rounding the stored state costs, and slots outside the batch stay bit for bit."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.chunk import chunk_gated_delta_rule_prefill  # noqa: E402
from kernels.recurrent import fused_recurrent_decode  # noqa: E402

# A store to bf16 moves a value by less than one unit in its last place, 2^-7 of itself (the Triton
# interpreter's cast truncates; a GPU rounds to nearest, half that). Inside a launch nothing is
# rounded, so a prefill costs one store and a decode step one per step (measured: 0.0033 after one
# store, 0.008 after three). fp32 agreement is 2e-5 (test_kernels_decode.py, test_kernels_chunk.py).
ONE_STORE = 2**-7
FP32_TOL = 2e-5


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all()
    return ((x - ref).norm() / ref.norm()).item()


def bf16_pool(num_slots, HV, K, V, gen):
    """A random (never zero) bf16 pool [S, HV, K, V]."""
    return torch.randn(num_slots, HV, K, V, generator=gen).to(torch.bfloat16)


def untouched(pool, before, slots):
    others = torch.ones(pool.shape[0], dtype=torch.bool)
    others[slots] = False
    return torch.equal(pool[others], before[others])


def test_decode_on_a_bf16_pool_rounds_only_the_stored_state():
    gen = torch.Generator().manual_seed(0)
    N, H, HV, K, V, steps = 3, 2, 4, 16, 32, 3
    slot_ids = torch.tensor([6, -1, 2])  # shuffled, with one padded entry
    live = torch.tensor([0, 2])
    A_log, dt_bias = torch.randn(HV, generator=gen) * 0.5, torch.randn(HV, generator=gen) * 0.5
    pool = bf16_pool(8, HV, K, V, gen)
    before = pool.clone()
    tokens = [(torch.randn(N, H, K, generator=gen), torch.randn(N, H, K, generator=gen),
               torch.randn(N, HV, V, generator=gen), torch.randn(N, HV, generator=gen),
               torch.randn(N, HV, generator=gen)) for _ in range(steps)]

    outs = [fused_recurrent_decode(*tok, A_log, dt_bias, pool, slot_ids) for tok in tokens]

    # The reference runs request i's tokens as one fp32 sequence from the same (exactly widened) state.
    packed = [torch.stack([tok[j][i] for i in live for tok in tokens]) for j in range(5)]
    g, beta = reference.gdn_gates(packed[3], packed[4], A_log, dt_bias)
    o_ref, state_ref = reference.recurrent_gated_delta_rule(
        *packed[:3], g, beta, initial_state=before[slot_ids[live]].float(),
        cu_seqlens=torch.arange(len(live) + 1) * steps)
    o_ref = o_ref.view(len(live), steps, HV, V)
    assert pool.dtype == torch.bfloat16
    # The first step reads the state exactly and rounds nothing it returns.
    assert rel_err(outs[0][live], o_ref[:, 0]) < FP32_TOL
    o = torch.stack([out[live] for out in outs], dim=1)
    assert rel_err(o, o_ref) < steps * ONE_STORE
    assert rel_err(pool[slot_ids[live]], state_ref) < steps * ONE_STORE
    assert untouched(pool, before, slot_ids[live])
    assert all(torch.equal(out[1], torch.zeros_like(out[1])) for out in outs)


@pytest.mark.parametrize("dtype, out_tol", [(torch.float32, FP32_TOL), (torch.bfloat16, 2e-2)])
def test_prefill_on_a_bf16_pool_rounds_only_the_final_state(dtype, out_tol):
    gen = torch.Generator().manual_seed(1)
    lengths, H, HV, K, V = [1, 65, 130], 1, 2, 16, 32
    T = sum(lengths)
    q, k = torch.randn(T, H, K, generator=gen).to(dtype), torch.randn(T, H, K, generator=gen).to(dtype)
    v = torch.randn(T, HV, V, generator=gen).to(dtype)
    A_log, dt_bias = torch.rand(HV, generator=gen) * 2 - 1, torch.randn(HV, generator=gen) * 0.5
    g, beta = reference.gdn_gates(torch.randn(T, HV, generator=gen), torch.randn(T, HV, generator=gen),
                                  A_log, dt_bias)
    cu = torch.tensor([0] + lengths).cumsum(0)
    pool = bf16_pool(7, HV, K, V, gen)
    before = pool.clone()
    slots = torch.tensor([5, 0, 3])
    has = torch.tensor([True, False, True])

    o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, pool, slots, has)

    init = torch.where(has[:, None, None, None], before[slots].float(), 0.0)
    o_ref, s_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init, cu_seqlens=cu)
    assert pool.dtype == torch.bfloat16
    # With fp32 inputs the outputs are as exact as with an fp32 pool: the state is carried in fp32.
    assert rel_err(o, o_ref) < out_tol
    state_tol = ONE_STORE if dtype == torch.float32 else 2e-2  # bf16 inputs: as test_kernels_chunk.py
    assert rel_err(pool[slots], s_ref) < state_tol
    assert untouched(pool, before, slots)
