"""kernels/argmax.py under the Triton interpreter: the same indices as torch's argmax, ties and NaN included."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from kernels.argmax import argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,vocab", [(3, 9001), (70, 517), (1, 20000)])
def test_argmax_equals_torch_on_random_rows(dtype, B, vocab):
    gen = torch.Generator().manual_seed(B * vocab)
    logits = (torch.randn(B, vocab + 5, generator=gen) * 4).to(dtype)[:, 5:]  # a strided view
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))


def test_ties_go_to_the_lowest_index_across_blocks_and_splits():
    # 9001 columns are 3 blocks of 4096, a split each: the maximum repeats within a block, across
    # blocks, and -0.0 ties +0.0 in an all-nonpositive row.
    logits = torch.full((4, 9001), -3.0)
    logits[0, [5000, 4097, 8999]] = 2.0
    logits[1, [9000, 7]] = 1.5
    logits[2, 6000] = -0.0
    logits[2, 3000] = 0.0
    logits[2, :2000] = -float("inf")
    logits[3] = -float("inf")
    assert argmax(logits).tolist() == logits.argmax(dim=-1).tolist() == [4097, 7, 3000, 0]


def test_a_row_wider_than_64_blocks_is_scanned_two_blocks_a_program():
    vocab = 64 * 4096 + 3000  # 64 splits of 8192 columns
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    logits[0, [6000, 100, 200000]] = 50.0  # ties within the first program's two blocks, and in another
    logits[1, [vocab - 1, 8191]] = 50.0
    assert argmax(logits).tolist() == logits.argmax(dim=-1).tolist() == [100, 8191]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_with_nan_gives_its_first_nan_as_torch_does(dtype):
    logits = torch.randn(3, 9001, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[0, [8000, 100]] = float("nan")
    logits[0, 50] = float("inf")
    logits[1, 4500] = float("nan")
    logits[2] = float("nan")
    assert argmax(logits).tolist() == logits.argmax(dim=-1).tolist() == [100, 4500, 0]


def test_an_empty_batch_gives_no_indices():
    assert argmax(torch.randn(0, 100)).shape == (0,)
