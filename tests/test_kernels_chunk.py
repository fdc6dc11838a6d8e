"""kernels/chunk.py (chunkwise prefill) against the fp32 token-by-token reference, on the Triton
interpreter: varlen batches with odd lengths, GVA, initial states by shuffled slot, bf16 and fp32."""

import os
from dataclasses import replace

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.chunk import chunk_gated_delta_rule_prefill, pick_config  # noqa: E402

# ||out - ref|| / ||ref||. The interpreter computes fp32 dots exactly; bf16 rounds q, k, v and
# the operands of every product (state, v_new, w, u) to 8 bits.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
LENGTHS = [1, 63, 64, 65, 200]


def _inputs(lengths, H, HV, K, V, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, H, K, generator=gen).to(dtype)
    k = torch.randn(T, H, K, generator=gen).to(dtype)
    v = torch.randn(T, HV, V, generator=gen).to(dtype)
    a, b = torch.randn(T, HV, generator=gen), torch.randn(T, HV, generator=gen)
    A_log, dt_bias = torch.rand(HV, generator=gen) * 2 - 1, torch.randn(HV, generator=gen) * 0.5
    g, beta = reference.gdn_gates(a, b, A_log, dt_bias)
    cu = torch.tensor([0] + lengths).cumsum(0)
    return q, k, v, g, beta, cu, gen


def _rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _check(lengths, H, HV, K, V, dtype, has_init, seed=0, num_slots=11, config=None):
    q, k, v, g, beta, cu, gen = _inputs(lengths, H, HV, K, V, dtype, seed)
    N = len(lengths)
    pool = torch.randn(num_slots, HV, K, V, generator=gen)  # [S, HV, K, V]
    slots = torch.randperm(num_slots, generator=gen)[:N]  # shuffled, non-contiguous
    has = torch.tensor(has_init)
    before = pool.clone()
    init = torch.where(has[:, None, None, None], before[slots], 0.0)

    o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, pool, slots, has, config=config)
    o_ref, s_ref = reference.recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=init, cu_seqlens=cu
    )

    assert o.dtype == v.dtype and o.shape == v.shape
    assert torch.isfinite(o.float()).all()
    assert _rel(o, o_ref) < TOL[dtype], _rel(o, o_ref)
    assert _rel(pool[slots], s_ref) < TOL[dtype], _rel(pool[slots], s_ref)
    others = torch.ones(num_slots, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(pool[others], before[others])  # bit for bit


@pytest.mark.parametrize("solve", ["blocks", "together"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_batch_with_gva_and_mixed_initial_states(dtype, solve):
    cfg = replace(pick_config(len(LENGTHS), 4, 32, 32), wy_solve=solve)
    _check(LENGTHS, H=2, HV=4, K=32, V=32, dtype=dtype, has_init=[True, False, True, True, False],
           config=cfg)


@pytest.mark.parametrize("length", LENGTHS)
def test_single_sequence_each_length(length):
    _check([length], H=1, HV=2, K=16, V=32, dtype=torch.float32, has_init=[length % 2 == 1],
           seed=length)


def test_value_dim_split_across_programs_prebuilt_plan_and_no_l2norm():
    # V = 64 in blocks of 16 puts four programs on one head's state and loops u over V blocks.
    from kernels.chunk import ChunkConfig, plan_chunks

    q, k, v, g, beta, cu, gen = _inputs([70, 5], 1, 1, 16, 64, torch.float32, seed=3)
    q, k = reference.l2norm(q), reference.l2norm(k)  # pre-normalised inputs
    pool = torch.randn(4, 1, 16, 64, generator=gen)
    slots, has = torch.tensor([3, 1]), torch.tensor([True, True])
    init = pool[slots].clone()
    o = chunk_gated_delta_rule_prefill(
        q, k, v, g, beta, cu, pool, slots, has, scale=0.3, use_qk_l2norm=False,
        config=ChunkConfig(state_bv=16, out_bv=32, wy_bv=16, out_bk=16, wy_bk=16),
        plan=plan_chunks(cu, q.shape[0]),
    )
    o_ref, s_ref = reference.recurrent_gated_delta_rule(
        q, k, v, g, beta, scale=0.3, initial_state=init, cu_seqlens=cu, use_qk_l2norm=False
    )
    assert _rel(o, o_ref) < TOL[torch.float32]
    assert _rel(pool[slots], s_ref) < TOL[torch.float32]


def test_key_dim_over_128_holds_the_state_in_two_halves():
    # K = 160 with state_split: two [128, BV] state halves, the second one mostly masked.
    cfg = replace(pick_config(2, 1, 160, 16), state_split=True)
    _check([70, 9], H=1, HV=1, K=160, V=16, dtype=torch.float32, has_init=[True, False], seed=5,
           config=cfg)


def test_key_dim_over_128_in_one_state_tile():
    # pick_config above K = 128: one state tile, here [256, BV] with its last 96 rows masked (K =
    # 160 does not fill the tile, so the pointer loads, not the tensor descriptors, serve it).
    assert not pick_config(2, 1, 160, 16).state_split
    _check([70, 9], H=1, HV=1, K=160, V=16, dtype=torch.float32, has_init=[True, False], seed=5)


def test_key_dim_256_default_goes_through_tensor_descriptors():
    cfg = pick_config(2, 1, 256, 16)
    assert cfg.state_tma and not cfg.state_split
    _check([70, 9], H=1, HV=1, K=256, V=16, dtype=torch.float32, has_init=[True, False], seed=6)


def test_key_dim_looped_in_blocks_split_state_and_fp16_inputs():
    from kernels.chunk import ChunkConfig

    q, k, v, g, beta, cu, gen = _inputs([100, 28], 2, 2, 64, 32, torch.float16, seed=7)
    pool = torch.randn(3, 2, 64, 32, generator=gen)
    slots, has = torch.tensor([2, 0]), torch.tensor([True, True])
    init = pool[slots].clone()
    cfg = ChunkConfig(state_bv=32, state_split=True, out_bv=32, wy_bv=32, out_bk=32, wy_bk=32)
    o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, pool, slots, has, config=cfg)
    o_ref, s_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init,
                                                        cu_seqlens=cu)
    assert o.dtype == torch.float16
    assert _rel(o, o_ref) < 5e-3
    assert _rel(pool[slots], s_ref) < 5e-3


@pytest.mark.parametrize("split", [False, True])
def test_state_pass_through_tensor_descriptors_gives_the_same_bits(split):
    # Tiles that split K and V evenly go through tensor descriptors, which read whole 64-token
    # rows: past a sequence's end they hold the next sequence's tokens (or zeros past T), and
    # those rows must drop out of the state exactly as the masked loads' zeros do. GVA (two
    # value heads per key head) places k's tile by key head.
    lengths = [70, 5, 130]
    q, k, v, g, beta, cu, gen = _inputs(lengths, 2, 4, 64, 32, torch.bfloat16, seed=11)
    pool = torch.randn(5, 4, 64, 32, generator=gen)
    slots, has = torch.tensor([4, 0, 2]), torch.tensor([True, False, True])
    base = replace(pick_config(3, 4, 64, 32), state_bv=16, state_split=split)
    runs = []
    for tma in (False, True):
        p = pool.clone()
        o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, p, slots, has,
                                           config=replace(base, state_tma=tma))
        runs.append((o, p))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    init = torch.where(has[:, None, None, None], pool[slots], 0.0)
    o_ref, s_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init,
                                                        cu_seqlens=cu)
    assert _rel(runs[1][0], o_ref) < TOL[torch.bfloat16]
    assert _rel(runs[1][1][slots], s_ref) < TOL[torch.bfloat16]


def test_negative_slot_starts_from_zeros_and_writes_no_state():
    q, k, v, g, beta, cu, gen = _inputs([65, 30], 1, 2, 16, 16, torch.float32, seed=9)
    pool = torch.randn(2, 2, 16, 16, generator=gen)
    before = pool.clone()
    slots, has = torch.tensor([-1, 1]), torch.tensor([True, True])
    o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, pool, slots, has)
    init = torch.stack([torch.zeros(2, 16, 16), before[1]])
    o_ref, s_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init,
                                                        cu_seqlens=cu)
    assert _rel(o, o_ref) < TOL[torch.float32]
    assert _rel(pool[1], s_ref[1]) < TOL[torch.float32]
    assert torch.equal(pool[0], before[0])


def test_a_launch_shape_the_card_cannot_hold_steps_down_and_is_remembered(monkeypatch):
    """fp32 inputs asked the state pass for more shared memory than an H200 has (241 of 227 KB):
    Triton refuses before running anything; the prefill then uses fewer stages, same results."""
    from triton.runtime.errors import OutOfResources

    import kernels.chunk as chunk

    real, asked = chunk._state_kernel, []

    class SmallCard:  # the real kernel, on a card whose shared memory holds one stage only
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                asked.append(num_stages)
                if num_stages > 1:
                    raise OutOfResources(246792, 232448, "shared memory")
                return real[grid](*args, num_stages=num_stages, **kw)
            return launch

    monkeypatch.setattr(chunk, "_state_kernel", SmallCard())
    monkeypatch.setattr(chunk, "_FITTED", {})
    config = replace(pick_config(2, 2, 32, 32), state_stages=3)
    _check([65, 30], 2, 2, 32, 32, torch.float32, [True, False], config=config)
    assert asked == [3, 2, 1]
    _check([40], 2, 2, 32, 32, torch.float32, [True], config=config, seed=1)
    assert asked == [3, 2, 1, 1]  # the fitted shape straight away
