"""kernels/decode_attention.py, under the Triton interpreter, against the torch form
(engine/models/attention.attend_decode, then the output gate)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from engine.models.attention import attend_decode
from kernels.decode_attention import LaunchConfig, decode_attention, launch_config

B, H, KVH, D, S, L = 6, 8, 2, 32, 7, 80


def inputs(dtype, gated, seed=7):
    gen = torch.Generator().manual_seed(seed)
    qg = torch.randn(B, H, 2 * D, generator=gen).to(dtype)
    q, gate = qg[..., :D], (qg[..., D:] if gated else None)  # views, as split from the gated q_proj
    keys, values = torch.randn(2, S, L, KVH, D, generator=gen).to(dtype).unbind(0)
    # sequence 0 sees one key (most splits empty); 2 and 3 several blocks and odd lengths; 5 ends a block
    positions = torch.tensor([0, 3, 79, 40, 33, 15])
    slots = torch.tensor([5, 0, 2, 3, 3, 6])  # two sequences may share a slot (a fork's prefix)
    return q, gate, keys, values, positions, slots


def reference(q, gate, keys, values, positions, slots, window):
    ref = attend_decode(q.float(), positions, keys.float(), values.float(), slots, L, window)
    return ref * torch.sigmoid(gate.float()) if gate is not None else ref


@pytest.mark.parametrize("config", [LaunchConfig(1, 32), LaunchConfig(4, 16, 4, 2), LaunchConfig(16, 16)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_the_torch_form(config, window, gated, dtype, tol):
    q, gate, keys, values, positions, slots = inputs(dtype, gated)
    out = decode_attention(q, gate, keys, values, positions, slots, window, config=config)
    ref = reference(q, gate, keys, values, positions, slots, window)
    assert out.shape == (B, H, D) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [1, 4])
def test_padded_entries_read_nothing_and_get_zeros(splits):
    # A CUDA graph captured for more sequences than a step holds pads with slot id -1: those rows
    # must come out zero (no NaN from an empty softmax) and leave the real rows as they were.
    q, gate, keys, values, positions, slots = inputs(torch.float32, gated=True, seed=3)
    padded = slots.clone()
    padded[[1, 4]] = -1
    config = LaunchConfig(splits, 16)
    out = decode_attention(q, gate, keys, values, positions, padded, config=config)
    real = padded >= 0
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    ref = reference(q[real], gate[real], keys, values, positions[real], slots[real], None)
    torch.testing.assert_close(out[real], ref, atol=1e-5, rtol=1e-5)


def test_small_batches_split_the_keys_and_large_ones_do_not():
    cpu = torch.device("cpu")  # counted as a 132-multiprocessor GPU
    assert launch_config(1, 2, 32768, cpu) == LaunchConfig(64, 64, 8, 3)
    assert launch_config(1, 2, 640, cpu) == LaunchConfig(32, 16, 4, 3)  # narrower blocks, not fewer splits
    assert launch_config(128, 2, 32768, cpu) == LaunchConfig(1, 32, 4, 3)
    assert launch_config(512, 2, 640, cpu) == LaunchConfig(1, 32, 4, 2)
    for B in range(1, 600, 7):
        for max_len in (2, 100, 640, 32768):
            config = launch_config(B, 2, max_len, cpu)
            if config.splits > 1:  # at most a program per multiprocessor, and every split a whole block
                assert B * 2 * config.splits <= 132 and config.splits * config.block <= max_len
            # fp32 buffers: the same bytes a block (shared memory), never under the 16 rows of a dot
            assert launch_config(B, 2, max_len, cpu, elem_bytes=4).block == max(16, config.block // 2)
