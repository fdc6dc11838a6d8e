"""Greedy decoding's argmax over the logits, at memory bandwidth: argmax(logits [B, vocab]) -> [B].

The result is torch's `logits.argmax(dim=-1)` exactly: ties go to the lowest index (-0.0 ties
+0.0), and a row holding a NaN gives its first NaN's index (torch orders NaN above everything).

Two launches: each (row, split) program scans a contiguous run of its row (one block, unless the
row has more than _MAX_SPLITS), keeping the best (value, index) and the first NaN; a second launch
reduces each row's splits. A [128, 151936] bf16 batch is 39 MB, ~10 us at copy speed, where
torch's reduction took 32 us on an H200.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 4096  # elements of a row loaded at once
_MAX_SPLITS = 64


# B, the number of splits and their length change with the batch: unspecialised, one build serves all.
@triton.jit(do_not_specialize=["num_splits", "split_len"])
def _argmax_splits_kernel(
    logits,  # [B, vocab], last dim contiguous
    best_value,  # [B, num_splits] fp32
    best_index,  # [B, num_splits] int32
    first_nan,  # [B, num_splits] int32, vocab where the split has no NaN
    stride_row,
    vocab,
    num_splits,
    split_len,  # a multiple of BLOCK
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row, split = pid // num_splits, pid % num_splits
    start = split * split_len
    end = tl.minimum(start + split_len, vocab)
    p_row = logits + row * stride_row
    best_v = tl.full([], -float("inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64) + vocab  # none yet
    nan_i = tl.full([], 0, tl.int64) + vocab
    for off in range(start, end, BLOCK):
        o = off + tl.arange(0, BLOCK)
        mask = o < end
        x = tl.load(p_row + o, mask=mask, other=-float("inf")).to(tl.float32)
        is_nan = x != x
        nan_i = tl.minimum(nan_i, tl.min(tl.where(is_nan, o, vocab)))
        x = tl.where(is_nan, -float("inf"), x)
        m = tl.max(x)
        i = tl.min(tl.where(x == m, o, vocab))
        # Blocks come in index order: an equal value later in the row never wins.
        take = (m > best_v) | ((m == best_v) & (i < best_i))
        best_i = tl.where(take, i, best_i)
        best_v = tl.maximum(best_v, m)
    tl.store(best_value + pid, best_v)
    tl.store(best_index + pid, best_i.to(tl.int32))
    tl.store(first_nan + pid, nan_i.to(tl.int32))


@triton.jit(do_not_specialize=["num_splits", "vocab"])
def _argmax_combine_kernel(
    best_value,  # [B, num_splits]
    best_index,  # [B, num_splits]
    first_nan,  # [B, num_splits]
    out,  # [B] int64
    num_splits,
    vocab,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_S)
    mask = o < num_splits
    v = tl.load(best_value + row * num_splits + o, mask=mask, other=-float("inf"))
    i = tl.load(best_index + row * num_splits + o, mask=mask, other=vocab)
    n = tl.load(first_nan + row * num_splits + o, mask=mask, other=vocab)
    best = tl.min(tl.where(v == tl.max(v), i, vocab))
    nan_i = tl.min(n)
    tl.store(out + row, tl.where(nan_i < vocab, nan_i, best).to(tl.int64))


def _num_splits(vocab: int) -> int:
    """Splits per row: a block each, up to _MAX_SPLITS. A program that walked several blocks waited
    on each load in turn: with 5 splits of a 151936-wide row, [128, vocab] bf16 took 48 us on an
    H200, 0.8 TB/s."""
    return max(1, min(triton.cdiv(vocab, _BLOCK), _MAX_SPLITS))


def argmax(logits: Tensor) -> Tensor:
    """logits: [B, vocab] (any float dtype; row stride free, last dim contiguous) -> [B] int64, as
    torch's logits.argmax(dim=-1)."""
    assert logits.dim() == 2 and logits.is_floating_point(), f"logits: [B, vocab] float, not {tuple(logits.shape)}"
    B, vocab = logits.shape
    assert 0 < vocab < 2**31 - 1, "vocab must fit an int32"
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    splits = _num_splits(vocab)
    split_len = triton.cdiv(triton.cdiv(vocab, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(vocab, split_len)  # rounding the length up can leave the last split empty
    best_value = torch.empty(B, splits, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(B, splits, dtype=torch.int32, device=logits.device)
    first_nan = torch.empty(B, splits, dtype=torch.int32, device=logits.device)
    _argmax_splits_kernel[(B * splits,)](
        logits, best_value, best_index, first_nan, logits.stride(0), vocab, splits, split_len,
        BLOCK=_BLOCK, num_warps=8,
    )
    _argmax_combine_kernel[(B,)](best_value, best_index, first_nan, out, splits, vocab,
                                 BLOCK_S=_MAX_SPLITS, num_warps=1)
    return out
