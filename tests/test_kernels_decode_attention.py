"""kernels/decode_attention.py, under the Triton interpreter, against the torch form
(engine/models/attention.attend_decode, then the output gate)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from engine.models.attention import attend_decode
from kernels.decode_attention import decode_attention, num_splits


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_the_torch_form(splits, window, gated, dtype, tol):
    B, H, KVH, D, S, L = 5, 8, 2, 32, 6, 80
    gen = torch.Generator().manual_seed(7)
    qg = torch.randn(B, H, 2 * D, generator=gen).to(dtype)
    q, gate = qg[..., :D], (qg[..., D:] if gated else None)  # views, as split from the gated q_proj
    keys, values = torch.randn(2, S, L, KVH, D, generator=gen).to(dtype).unbind(0)
    positions = torch.tensor([0, 3, 79, 40, 33])  # sequence 0 sees one key (3 of 4 splits empty); 2 and 3 several blocks
    slots = torch.tensor([5, 0, 2, 3, 3])  # two sequences may share a slot (a fork's prefix)
    out = decode_attention(q, gate, keys, values, positions, slots, window, splits=splits)

    ref = attend_decode(q, positions, keys, values, slots, L, window)
    if gated:
        ref = ref * torch.sigmoid(gate)
    assert out.shape == (B, H, D) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_small_batches_split_the_keys_and_large_ones_do_not():
    cpu = torch.device("cpu")  # counted as a 132-multiprocessor GPU
    assert num_splits(1, 2, 32768, cpu) == 16 and num_splits(1, 2, 640, cpu) == 4
    assert num_splits(128, 2, 32768, cpu) == 1
