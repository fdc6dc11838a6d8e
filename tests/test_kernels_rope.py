"""kernels/rope.py's q/k norm + RoPE + key/value store, under the Triton interpreter, against the
model's torch form (engine/models/rope.py and layers.rms_norm)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from engine.models.layers import rms_norm
from engine.models.rope import apply_rope, inverse_frequencies, rope_tables
from kernels.rope import qk_norm_rope_store


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (48, 16)])
def test_qk_norm_rope_store_matches_the_torch_form(norm, head_dim, rotary_dim):
    T, H, KVH, S, L = 6, 4, 2, 6, 3001
    gen = torch.Generator().manual_seed(head_dim + norm)
    qg = torch.randn(T, H, 2 * head_dim, generator=gen)
    q = qg[..., :head_dim]  # a view with the gate beside it, as the gated attention's q_proj yields
    k, v = torch.randn(2, T, KVH, head_dim, generator=gen).unbind(0)
    qw, kw = (1 + 0.2 * torch.randn(2, head_dim, generator=gen)).unbind(0) if norm else (None, None)
    positions = torch.tensor([0, 7, 39, 3, 12, 3000])  # the last far out: angles of up to 3000 rad
    slots = torch.tensor([5, 0, 2, 2, 3, 1])
    cos, sin = rope_tables(positions, rotary_dim, 10000.0)
    keys, values = torch.zeros(2, S, L, KVH, head_dim).unbind(0)
    inv_freq = inverse_frequencies(rotary_dim, 10000.0, positions.device)
    q_out = qk_norm_rope_store(q, k, v, qw, kw, 1e-6, inv_freq, positions, slots, keys, values)

    if norm:
        q, k = rms_norm(q, qw, 1e-6), rms_norm(k, kw, 1e-6)
    ref_keys, ref_values = torch.zeros(2, S, L, KVH, head_dim).unbind(0)
    ref_keys[slots, positions] = apply_rope(k, cos, sin)
    ref_values[slots, positions] = v
    torch.testing.assert_close(q_out, apply_rope(q, cos, sin), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
    assert torch.equal(values, ref_values)
