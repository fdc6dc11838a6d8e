"""kernels/conv.py's causal conv1d (prefill over a packed varlen batch, and the one-token step),
run under the Triton interpreter against kernels/reference.py, on slot-indexed conv state."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernels import reference
from kernels.conv import causal_conv1d_prefill, causal_conv1d_step

OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # ||y - ref|| / ||ref||


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def strided_rows(T: int, D: int, dtype, gen) -> torch.Tensor:
    """[T, D] random rows that are a view into a wider buffer (row stride > D)."""
    return torch.randn(T, D + 8, generator=gen).to(dtype)[:, 3 : 3 + D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,with_bias", [(4, False), (2, True)])
def test_prefill_matches_reference_on_odd_lengths_with_and_without_initial_state(dtype, width, with_bias):
    gen = torch.Generator().manual_seed(width)
    D, lengths = 40, [1, 2, 3, 33, 65]
    slot_ids = torch.tensor([6, 0, 3, 9, 2])
    has_initial_state = torch.tensor([True, True, False, True, False])
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    x = strided_rows(sum(lengths), D, dtype, gen)
    weight = torch.randn(D, width, generator=gen)
    bias = torch.randn(D, generator=gen) if with_bias else None
    pool = torch.randn(10, D, width - 1, generator=gen).to(dtype)  # [S, D, W-1]
    before = pool.clone()

    y = causal_conv1d_prefill(x, weight, bias, cu_seqlens, pool, slot_ids, has_initial_state)

    initial = before[slot_ids] * has_initial_state[:, None, None]
    y_ref, state_ref = reference.causal_conv1d(x, weight, bias=bias, cu_seqlens=cu_seqlens,
                                               initial_state=initial)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < OUT_TOL[dtype]
    assert torch.equal(pool[slot_ids], state_ref)  # the state is inputs, moved, not computed
    untouched = [1, 4, 5, 7, 8]
    assert torch.equal(pool[untouched], before[untouched])


def test_prefill_with_a_padded_sequence_reads_and_writes_no_state():
    gen = torch.Generator().manual_seed(1)
    D, lengths = 24, [5, 4]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    x = strided_rows(9, D, torch.float32, gen)
    weight = torch.randn(D, 4, generator=gen)
    pool = torch.randn(3, D, 3, generator=gen)
    before = pool.clone()
    y = causal_conv1d_prefill(x, weight, None, cu_seqlens, pool, torch.tensor([-1, 1]),
                              torch.tensor([True, True]))
    y_ref, state_ref = reference.causal_conv1d(
        x, weight, cu_seqlens=cu_seqlens, initial_state=torch.stack([torch.zeros(D, 3), before[1]]))
    assert rel_err(y, y_ref) < OUT_TOL[torch.float32]
    assert torch.equal(pool[1], state_ref[1])
    assert torch.equal(pool[[0, 2]], before[[0, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_reference_update_and_skip_padding(dtype):
    gen = torch.Generator().manual_seed(2)
    D, W = 40, 4
    weight = torch.randn(D, W, generator=gen)
    bias = torch.randn(D, generator=gen)
    pool = torch.randn(8, D, W - 1, generator=gen).to(dtype)
    slot_ids = torch.tensor([5, -1, 0, 3], dtype=torch.int32)
    live, live_slots = [0, 2, 3], [5, 0, 3]
    before = pool.clone()
    state_ref = before[live_slots].clone()  # [3, D, W-1], advanced by the reference
    for _ in range(3):
        x = strided_rows(4, D, dtype, gen)
        y = causal_conv1d_step(x, weight, bias, pool, slot_ids)
        y_ref = reference.causal_conv1d_update(x[live], state_ref, weight, bias=bias)
        assert rel_err(y[live], y_ref) < OUT_TOL[dtype]
        assert torch.equal(y[1], torch.zeros_like(y[1]))
        assert torch.equal(pool[live_slots], state_ref)
    untouched = [1, 2, 4, 6, 7]
    assert torch.equal(pool[untouched], before[untouched])


def test_prefill_then_steps_equal_one_longer_prefill():
    # Chunked prefill and decode hand over through the slot: prefill(first 6), then 3 steps,
    # gives what prefill over all 9 tokens gives.
    gen = torch.Generator().manual_seed(3)
    D, W = 24, 4
    x = torch.randn(9, D, generator=gen)
    weight = torch.randn(D, W, generator=gen)
    pool = torch.randn(2, D, W - 1, generator=gen)
    slot, no_state = torch.tensor([1]), torch.tensor([False])
    y_head = causal_conv1d_prefill(x[:6], weight, None, torch.tensor([0, 6]), pool, slot, no_state)
    y_tail = [causal_conv1d_step(x[t : t + 1], weight, None, pool, slot) for t in range(6, 9)]
    y_split = torch.cat([y_head, *y_tail])

    whole = torch.randn(2, D, W - 1, generator=gen)
    y_whole = causal_conv1d_prefill(x, weight, None, torch.tensor([0, 9]), whole, slot, no_state)
    assert rel_err(y_split, y_whole) < OUT_TOL[torch.float32]
    assert torch.equal(pool[1], whole[1])
