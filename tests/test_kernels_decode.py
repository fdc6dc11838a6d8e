"""kernels/recurrent.py's fused decode, run under the Triton interpreter, against the fp32
reference recurrence: several decode steps in a row over slot-indexed state equal the reference
run over the same tokens, padding is skipped, and slots outside the batch are untouched."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernels import reference
from kernels.recurrent import fused_recurrent_decode

# ||out - ref|| / ||ref|| bounds: fp32 differs from the reference only by summation order; bf16
# outputs are rounded to 8 bits of mantissa (states stay fp32 in both).
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
STATE_TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def decode_inputs(N, H, HV, K, V, dtype, gen):
    """Post-conv q, k, v and raw gates for one step, as strided views into projection outputs
    (the way the model hands them over): q, k [N, H, K], v [N, HV, V], a, b [N, HV]."""
    qkv = torch.randn(N, 2 * H * K + HV * V, generator=gen).to(dtype)
    q = qkv[:, : H * K].view(N, H, K)
    k = qkv[:, H * K : 2 * H * K].view(N, H, K)
    v = qkv[:, 2 * H * K :].view(N, HV, V)
    ab = torch.randn(N, 2 * HV, generator=gen).to(dtype)
    return q, k, v, ab[:, HV:], ab[:, :HV]


def run_steps(*, H, HV, K, V, slot_ids, num_slots, steps, dtype, seed=0, **kwargs):
    """Decode `steps` tokens with the kernel, then the same tokens with the reference."""
    gen = torch.Generator().manual_seed(seed)
    slot_ids = torch.tensor(slot_ids)
    N = len(slot_ids)
    A_log = torch.randn(HV, generator=gen) * 0.5
    dt_bias = torch.randn(HV, generator=gen) * 0.5
    pool = torch.randn(num_slots, HV, K, V, generator=gen)  # [S, HV, K, V]
    before = pool.clone()
    tokens = [decode_inputs(N, H, HV, K, V, dtype, gen) for _ in range(steps)]
    outs = [fused_recurrent_decode(*tok, A_log, dt_bias, pool, slot_ids, **kwargs) for tok in tokens]

    # Reference: request i's tokens form sequence i of a packed batch.
    live = (slot_ids >= 0).nonzero().flatten()
    packed = [torch.stack([tok[j][i] for i in live for tok in tokens]) for j in range(5)]
    g, beta = reference.gdn_gates(packed[3], packed[4], A_log, dt_bias)
    cu_seqlens = torch.arange(len(live) + 1) * steps
    o_ref, state_ref = reference.recurrent_gated_delta_rule(
        packed[0], packed[1], packed[2], g, beta,
        initial_state=before[slot_ids[live]], cu_seqlens=cu_seqlens,
        scale=kwargs.get("scale"), use_qk_l2norm=kwargs.get("use_qk_l2norm", True),
    )
    o = torch.stack([torch.stack([out[i] for out in outs]) for i in live]).flatten(0, 1)
    return dict(pool=pool, before=before, outs=outs, o=o, o_ref=o_ref,
                state=pool[slot_ids[live]], state_ref=state_ref, slot_ids=slot_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_reference_with_gva_shuffled_slots_and_padding(dtype):
    r = run_steps(H=2, HV=4, K=16, V=32, slot_ids=[7, -1, 2, 5, -1], num_slots=9, steps=3, dtype=dtype)
    assert all(out.dtype == dtype and out.shape == (5, 4, 32) for out in r["outs"])
    assert rel_err(r["o"], r["o_ref"]) < OUT_TOL[dtype]
    assert rel_err(r["state"], r["state_ref"]) < STATE_TOL


def test_decode_leaves_other_slots_bit_for_bit_and_zeroes_padded_rows():
    r = run_steps(H=2, HV=4, K=16, V=32, slot_ids=[7, -1, 2, 5, -1], num_slots=9, steps=2,
                  dtype=torch.float32)
    untouched = [0, 1, 3, 4, 6, 8]
    assert torch.equal(r["pool"][untouched], r["before"][untouched])
    for out in r["outs"]:
        assert torch.equal(out[[1, 4]], torch.zeros_like(out[[1, 4]]))


def test_decode_head_dim_64_one_v_block_per_program():
    # K = V = 64 with the whole V row in one program (BV = V), one key head per value head.
    r = run_steps(H=2, HV=2, K=64, V=64, slot_ids=[3, 0], num_slots=4, steps=2,
                  dtype=torch.float32, BV=64, num_warps=4)
    assert rel_err(r["o"], r["o_ref"]) < OUT_TOL[torch.float32]
    assert rel_err(r["state"], r["state_ref"]) < STATE_TOL


def test_decode_without_qk_l2norm_and_custom_scale():
    # Unnormalised keys need a small norm for the delta rule to stay stable over steps.
    gen = torch.Generator().manual_seed(3)
    N, H, HV, K, V = 2, 1, 2, 16, 16
    q, k, v, a, b = decode_inputs(N, H, HV, K, V, torch.float32, gen)
    k = k / K
    A_log, dt_bias = torch.randn(HV, generator=gen), torch.randn(HV, generator=gen)
    pool = torch.randn(3, HV, K, V, generator=gen)
    slot_ids = torch.tensor([2, 0], dtype=torch.int32)
    before = pool.clone()
    o = fused_recurrent_decode(q, k, v, a, b, A_log, dt_bias, pool, slot_ids,
                               scale=0.3, use_qk_l2norm=False)
    g, beta = reference.gdn_gates(a, b, A_log, dt_bias)
    o_ref, state_ref = reference.recurrent_gated_delta_rule(
        q, k, v, g, beta, scale=0.3, use_qk_l2norm=False,
        initial_state=before[[2, 0]], cu_seqlens=torch.arange(N + 1))
    assert rel_err(o, o_ref) < OUT_TOL[torch.float32]
    assert rel_err(pool[[2, 0]], state_ref) < STATE_TOL
    assert torch.equal(pool[1], before[1])


def test_decode_of_an_all_padding_batch_changes_nothing():
    gen = torch.Generator().manual_seed(4)
    q, k, v, a, b = decode_inputs(3, 2, 4, 16, 32, torch.bfloat16, gen)
    pool = torch.randn(2, 4, 16, 32, generator=gen)
    before = pool.clone()
    o = fused_recurrent_decode(q, k, v, a, b, torch.zeros(4), torch.zeros(4), pool,
                               torch.full((3,), -1))
    assert torch.equal(pool, before) and torch.equal(o, torch.zeros_like(o))
