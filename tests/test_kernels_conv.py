"""kernels/conv.py's causal conv1d (prefill over a packed varlen batch, and the one-token step),
run under the Triton interpreter against kernels/reference.py, on slot-indexed conv state kept as
a ring by position (tests/conv_ring.py spells the layout out)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from conv_ring import ring_from_window, window_of_ring
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


def token_positions(lengths: list[int], starts: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n) for n, s in zip(lengths, starts)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,with_bias", [(4, False), (2, True)])
def test_prefill_matches_reference_on_odd_lengths_from_various_start_positions(dtype, width, with_bias):
    gen = torch.Generator().manual_seed(width)
    D, lengths, starts = 40, [1, 2, 3, 33, 65, 2], [5, 1, 0, 2, 0, 7]
    slot_ids = torch.tensor([6, 0, 3, 9, 2, 8])
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    x = strided_rows(sum(lengths), D, dtype, gen)
    weight = torch.randn(D, width, generator=gen)
    bias = torch.randn(D, generator=gen) if with_bias else None
    windows = torch.randn(len(lengths), D, width - 1, generator=gen).to(dtype)  # the inputs before each start
    pool = torch.randn(10, D, width, generator=gen).to(dtype)  # [S, D, W]
    for n, start in enumerate(starts):
        pool[slot_ids[n]] = ring_from_window(windows[n], start)
    before = pool.clone()

    y = causal_conv1d_prefill(x, weight, bias, cu_seqlens, token_positions(lengths, starts), pool, slot_ids)

    initial = torch.stack([window_of_ring(before[s], start) for s, start in zip(slot_ids, starts)])
    y_ref, state_ref = reference.causal_conv1d(x, weight, bias=bias, cu_seqlens=cu_seqlens, initial_state=initial)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < OUT_TOL[dtype]
    for n, (slot, start) in enumerate(zip(slot_ids, starts)):
        # the taps are inputs, moved, not computed
        assert torch.equal(window_of_ring(pool[slot], start + lengths[n]), state_ref[n])
    untouched = [1, 4, 5, 7]
    assert torch.equal(pool[untouched], before[untouched])


def test_prefill_with_a_padded_sequence_reads_and_writes_no_state():
    gen = torch.Generator().manual_seed(1)
    D, lengths = 24, [5, 4]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    x = strided_rows(9, D, torch.float32, gen)
    weight = torch.randn(D, 4, generator=gen)
    pool = torch.randn(3, D, 4, generator=gen)
    before = pool.clone()
    y = causal_conv1d_prefill(x, weight, None, cu_seqlens, token_positions(lengths, [3, 6]), pool,
                              torch.tensor([-1, 1]))
    initial = torch.stack([torch.zeros(D, 3), window_of_ring(before[1], 6)])
    y_ref, state_ref = reference.causal_conv1d(x, weight, cu_seqlens=cu_seqlens, initial_state=initial)
    assert rel_err(y, y_ref) < OUT_TOL[torch.float32]
    assert torch.equal(window_of_ring(pool[1], 10), state_ref[1])
    assert torch.equal(pool[[0, 2]], before[[0, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_from_various_positions_match_reference_update_and_skip_padding(dtype):
    gen = torch.Generator().manual_seed(2)
    D, W = 40, 4
    weight = torch.randn(D, W, generator=gen)
    bias = torch.randn(D, generator=gen)
    pool = torch.randn(8, D, W, generator=gen).to(dtype)
    slot_ids = torch.tensor([5, -1, 0, 3, 6], dtype=torch.int32)
    starts = torch.tensor([0, 9, 1, 3, 5])
    live, live_slots = [0, 2, 3, 4], [5, 0, 3, 6]
    window_ref = torch.randn(4, D, W - 1, generator=gen).to(dtype)
    window_ref[0] = 0  # position 0: nothing before it
    window_ref[1, :, :2] = 0  # position 1: only x_0 before it
    for i, slot in zip(live, live_slots):
        pool[slot] = ring_from_window(window_ref[live.index(i)], int(starts[i]))
    before = pool.clone()
    for step in range(W + 1):
        x = strided_rows(5, D, dtype, gen)
        y = causal_conv1d_step(x, weight, bias, pool, slot_ids, starts + step)
        y_ref = reference.causal_conv1d_update(x[live], window_ref, weight, bias=bias)
        assert rel_err(y[live], y_ref) < OUT_TOL[dtype]
        assert torch.equal(y[1], torch.zeros_like(y[1]))
        for n, (i, slot) in enumerate(zip(live, live_slots)):
            assert torch.equal(window_of_ring(pool[slot], int(starts[i]) + step + 1), window_ref[n])
    untouched = [1, 2, 4, 7]
    assert torch.equal(pool[untouched], before[untouched])


def test_prefill_then_steps_equal_one_longer_prefill():
    # Chunked prefill and decode hand over through the slot: prefill(first 6), then 3 steps,
    # gives what prefill over all 9 tokens gives.
    gen = torch.Generator().manual_seed(3)
    D, W = 24, 4
    x = torch.randn(9, D, generator=gen)
    weight = torch.randn(D, W, generator=gen)
    pool = torch.randn(2, D, W, generator=gen)  # stale taps: a sequence at position 0 reads none
    slot = torch.tensor([1])
    y_head = causal_conv1d_prefill(x[:6], weight, None, torch.tensor([0, 6]), torch.arange(6), pool, slot)
    y_tail = [causal_conv1d_step(x[t : t + 1], weight, None, pool, slot, torch.tensor([t])) for t in range(6, 9)]
    y_split = torch.cat([y_head, *y_tail])

    whole = torch.randn(2, D, W, generator=gen)
    y_whole = causal_conv1d_prefill(x, weight, None, torch.tensor([0, 9]), torch.arange(9), whole, slot)
    assert rel_err(y_split, y_whole) < OUT_TOL[torch.float32]
    assert torch.equal(window_of_ring(pool[1], 9), window_of_ring(whole[1], 9))
    assert torch.equal(window_of_ring(pool[1], 9), x[6:].t())
