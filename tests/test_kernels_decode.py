"""kernels/recurrent.py's fused decode, run under the Triton interpreter, against the fp32
reference recurrence: several decode steps in a row over slot-indexed state equal the reference
run over the same tokens, padding is skipped, and slots outside the batch are untouched."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernels import reference
from kernels.conv import causal_conv1d_prefill, causal_conv1d_step
from kernels.recurrent import conv_recurrent_decode, fused_recurrent_decode

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


# --- the short conv folded in (conv_recurrent_decode) ------------------------------------------------


def folded_vs_unfolded(*, x_dtype, state_dtype, prefill_lens, slot_ids, BV, steps=5, seed=11):
    """Requests with prompts of prefill_lens (0: a fresh slot) conv-prefilled into their rings, then
    `steps` decode steps three ways: folded (conv_recurrent_decode), unfolded (causal_conv1d_step
    then fused_recurrent_decode) on a copy of the pools, and the reference over each whole sequence."""
    gen = torch.Generator().manual_seed(seed)
    H, HV, K, V, W, S = 2, 4, 16, 32, 4, 12
    D = 2 * H * K + HV * V
    slot_ids = torch.tensor(slot_ids)
    live = (slot_ids >= 0).nonzero().flatten().tolist()
    assert len(live) == len(prefill_lens)
    weight = torch.randn(D, W, generator=gen) * 0.5
    A_log, dt_bias = torch.randn(HV, generator=gen) * 0.5, torch.randn(HV, generator=gen) * 0.5
    conv_pool = torch.randn(S, D, W, generator=gen).to(x_dtype)  # stale taps: position 0 must read none
    state_pool = torch.randn(S, HV, K, V, generator=gen).to(state_dtype)
    prompts = [torch.randn(n, D, generator=gen).to(x_dtype) for n in prefill_lens]
    prefilled = [i for i, n in enumerate(prefill_lens) if n]
    cu = torch.tensor([0] + [prefill_lens[i] for i in prefilled]).cumsum(0)
    causal_conv1d_prefill(torch.cat([prompts[i] for i in prefilled]), weight, None, cu,
                          torch.cat([torch.arange(prefill_lens[i]) for i in prefilled]), conv_pool,
                          slot_ids[[live[i] for i in prefilled]])
    pools = {"folded": (conv_pool, state_pool), "unfolded": (conv_pool.clone(), state_pool.clone())}
    before = (conv_pool.clone(), state_pool.clone())

    positions = torch.zeros(len(slot_ids), dtype=torch.int64)
    positions[live] = torch.tensor(prefill_lens)
    positions[[i for i in range(len(slot_ids)) if i not in live]] = torch.tensor([9, 2])[: len(slot_ids) - len(live)]
    xs, outs = [], {"folded": [], "unfolded": []}
    for step in range(steps):
        x = torch.randn(len(slot_ids), D + 8, generator=gen).to(x_dtype)[:, 5 : 5 + D]  # a view, as the model's
        ab = torch.randn(len(slot_ids), 2 * HV, generator=gen).to(x_dtype)
        a, b = ab[:, :HV], ab[:, HV:]
        xs.append((x, a, b))
        conv, state = pools["folded"]
        outs["folded"].append(conv_recurrent_decode(x, weight, conv, positions + step, a, b, A_log, dt_bias, state,
                                                    slot_ids, num_k_heads=H, BV=BV))
        conv, state = pools["unfolded"]
        qkv = causal_conv1d_step(x, weight, None, conv, slot_ids, positions + step)
        q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
        outs["unfolded"].append(fused_recurrent_decode(q.view(-1, H, K), k.view(-1, H, K), v.view(-1, HV, V), a, b,
                                                       A_log, dt_bias, state, slot_ids, BV=BV))

    # Reference: each live request's whole sequence (prompt + decode tokens) through the conv, then the
    # decode tokens' delta rule from the slot's state before the steps.
    decoded = []
    for n, i in enumerate(live):
        seq = torch.cat([prompts[n], *[x[i : i + 1] for x, _, _ in xs]])
        y, _ = reference.causal_conv1d(seq, weight)
        decoded.append(y[prefill_lens[n]:])
    qkv = torch.cat(decoded)
    q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
    a = torch.cat([torch.stack([a[i] for _, a, _ in xs]) for i in live])
    b = torch.cat([torch.stack([b[i] for _, _, b in xs]) for i in live])
    g, beta = reference.gdn_gates(a, b, A_log, dt_bias)
    o_ref, state_ref = reference.recurrent_gated_delta_rule(
        q.reshape(-1, H, K), k.reshape(-1, H, K), v.reshape(-1, HV, V), g, beta,
        initial_state=before[1][slot_ids[live]].float(), cu_seqlens=torch.arange(len(live) + 1) * steps)
    return dict(pools=pools, before=before, outs=outs, o_ref=o_ref, state_ref=state_ref, live=live,
                slot_ids=slot_ids, ends=positions + steps, W=W)


@pytest.mark.parametrize("x_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_folded_conv_decode_equals_conv_step_then_decode_and_the_reference(x_dtype, state_dtype):
    # Starts 0 (a fresh slot), 1, 2, 3 = W-1, 5, 63, 65 after a prefill of that length; five steps wrap
    # every ring; G = 2 value heads read each key head's q/k taps, in two V blocks each (BV = 16 of 32).
    r = folded_vs_unfolded(x_dtype=x_dtype, state_dtype=state_dtype, prefill_lens=[2, 0, 65, 1, 5, 63, 3],
                           slot_ids=[10, 4, -1, 0, 7, 2, -1, 9, 5], BV=16)
    live = r["live"]
    (conv_f, state_f), (conv_u, state_u) = r["pools"]["folded"], r["pools"]["unfolded"]
    for folded, unfolded in zip(r["outs"]["folded"], r["outs"]["unfolded"]):
        assert folded.dtype == x_dtype and folded.shape == unfolded.shape
        assert torch.equal(folded, unfolded)  # the same values, rounded where the unfused path stores them
        assert torch.equal(folded[[2, 6]], torch.zeros_like(folded[[2, 6]]))
    assert torch.equal(conv_f, conv_u) and torch.equal(state_f, state_u)
    o = torch.stack([torch.stack([out[i] for out in r["outs"]["folded"]]) for i in live]).flatten(0, 1)
    assert rel_err(o, r["o_ref"]) < (1e-5 if x_dtype == torch.float32 else 2e-2)
    slots = r["slot_ids"][live]
    assert rel_err(state_f[slots], r["state_ref"]) < (1e-5 if x_dtype == state_dtype == torch.float32 else 2e-2)
    untouched = [1, 3, 6, 8, 11]
    assert torch.equal(conv_f[untouched], r["before"][0][untouched])
    assert torch.equal(state_f[untouched], r["before"][1][untouched])


def test_folded_conv_decode_leaves_the_last_inputs_in_the_ring_with_the_default_launch():
    r = folded_vs_unfolded(x_dtype=torch.float32, state_dtype=torch.float32, prefill_lens=[3, 0],
                           slot_ids=[1, -1, 6], BV=None, steps=2)
    conv_f, conv_u = r["pools"]["folded"][0], r["pools"]["unfolded"][0]
    assert torch.equal(conv_f, conv_u)
    assert torch.equal(r["outs"]["folded"][1], r["outs"]["unfolded"][1])
    # Request 2 (slot 6) started fresh: its ring holds exactly its two decode inputs at cells 0 and 1.
    assert not torch.equal(conv_f[6, :, :2], r["before"][0][6, :, :2])
    assert torch.equal(conv_f[6, :, 2:], r["before"][0][6, :, 2:])
