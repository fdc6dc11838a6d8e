"""Batched attention over slot buffers (engine/models/attention.py) against a naive per-query softmax."""

import pytest
import torch

from engine.models import attention
from engine.models.state import Batch

HEADS, KV_HEADS, D, MAX_LEN, SLOTS = 4, 2, 8, 96, 6


def _naive(q, keys, values, lens, starts, slots, window):
    """Per sequence, per query: softmax over the keys it may see, in float64."""
    out, begin = [], 0
    for n, start, slot in zip(lens, starts, slots):
        for t in range(n):
            pos = start + t
            lo = 0 if window is None else max(0, pos - window + 1)
            k = keys[slot, lo:pos + 1].double().repeat_interleave(HEADS // KV_HEADS, dim=1)  # [P, heads, d]
            v = values[slot, lo:pos + 1].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
            scores = torch.einsum("hd,phd->hp", q[begin + t].double(), k) / D ** 0.5
            out.append(torch.einsum("hp,phd->hd", scores.softmax(-1), v))
        begin += n
    return torch.stack(out).float()


@pytest.mark.parametrize("window", [None, 5, 40])
def test_one_call_for_mixed_decodes_and_chunks_matches_a_naive_softmax(window, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(SLOTS + 1, MAX_LEN, KV_HEADS, D, generator=gen)
    values = torch.randn(SLOTS + 1, MAX_LEN, KV_HEADS, D, generator=gen)
    # decodes (1 token, deep in their sequence), a fresh prompt, prompt chunks continuing cached
    # keys, odd lengths, slots out of order
    lens, starts, slots = [1, 17, 1, 64, 3, 1], [50, 0, 7, 20, 88, 0], [4, 0, 2, 5, 1, 3]
    batch = Batch.build(lens, slots, starts, torch.device("cpu"))
    q = torch.randn(sum(lens), HEADS, D, generator=gen)
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    # Each call also records whether cuDNN's backend was allowed (it builds a plan per new shape).
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(torch.backends.cuda.cudnn_sdp_enabled()) or sdpa(*a, **k))
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default, outside our calls
    got = attention.attend_groups(q, batch.positions, keys, values, batch.attention_groups, window)
    torch.testing.assert_close(got, _naive(q, keys, values, lens, starts, slots, window), atol=1e-5, rtol=1e-5)
    assert calls == [False, False]  # one for the one-token sequences, one for the chunks; never cuDNN


@pytest.mark.parametrize("window", [None, 1, 7, 64])
def test_decode_at_any_read_length_matches_the_naive_softmax(window):
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(SLOTS + 1, MAX_LEN, KV_HEADS, D, generator=gen)
    values = torch.randn(SLOTS + 1, MAX_LEN, KV_HEADS, D, generator=gen)
    starts, slots = [3, 60, 0, 31], [5, 1, 0, 6]
    q = torch.randn(len(slots), HEADS, D, generator=gen)
    positions, slot_ids = torch.tensor(starts), torch.tensor(slots)
    expected = _naive(q, keys, values, [1] * len(slots), starts, slots, window)
    # just enough, and the whole buffer (what a CUDA graph may read); a window layer reads its window
    for length in (61, MAX_LEN):
        got = attention.attend_decode(q, positions, keys, values, slot_ids, length, window)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
