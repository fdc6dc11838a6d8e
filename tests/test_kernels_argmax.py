"""kernels/argmax.py under the Triton interpreter against torch's argmax: rows spanning several pieces with a
tail, ties inside a piece and across pieces (the lowest index wins), -inf, bf16 and fp32, a strided view."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernels import argmax
from kernels.argmax import argmax_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_with_ties_and_tails(dtype, monkeypatch):
    monkeypatch.setattr(argmax, "BLOCK", 64)  # 3 pieces and a tail of 13 at V = 141
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 141, generator=gen).to(dtype)
    logits[1, 100] = logits[1, 5] = 9.0  # a tie across pieces: 5 wins
    logits[2, 70] = logits[2, 66] = 9.0  # inside one piece: 66
    logits[3, 140] = 9.0  # in the tail
    logits[4] = float("-inf")  # nothing but -inf: index 0, as torch
    logits[5, :] = 1.0  # all equal
    got = argmax_rows(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1))


def test_reads_rows_of_a_strided_view_and_nan_counts_as_the_largest(monkeypatch):
    monkeypatch.setattr(argmax, "BLOCK", 32)
    wide = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    logits = wide[:, :90]  # rows 200 apart
    logits[0, 47] = float("nan")
    got = argmax_rows(logits)
    assert got.tolist() == [47] + logits[1:].argmax(dim=-1).tolist()
