"""kernels/decode_attention.rope_decode_attention, under the Triton interpreter: bit for bit the two
kernels it replaces (kernels/rope.qk_norm_rope_store, then decode_attention), output and key/value
buffers, and close to the model's torch form."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch

from engine.models.attention import attend_decode
from engine.models.layers import rms_norm
from engine.models.rope import apply_rope, inverse_frequencies, rope_tables
from kernels.decode_attention import LaunchConfig, decode_attention, rope_decode_attention
from kernels.rope import qk_norm_rope_store

S, L, KVH = 6, 70, 2


def step(D, R, G, dtype, norm, gated, seed=0, positions=(0, 69, 33, 16, 47), slots=(4, 0, 2, 5, 1)):
    """One decode step's inputs as the model has them: q, gate, k, v views into one qkv row per token,
    the pool's buffers full of earlier (random) keys and values."""
    gen = torch.Generator().manual_seed(seed)
    B, H = len(positions), G * KVH
    qkv = torch.randn(B, 2 * H * D + 2 * KVH * D, generator=gen).to(dtype)
    qg = qkv[:, :2 * H * D].view(B, H, 2 * D)
    q, gate = qg[..., :D], (qg[..., D:] if gated else None)
    k, v = qkv[:, 2 * H * D:].view(B, 2, KVH, D).unbind(1)
    weights = (1 + 0.2 * torch.randn(2, D, generator=gen)).unbind(0) if norm else (None, None)
    keys, values = torch.randn(2, S, L, KVH, D, generator=gen).to(dtype).unbind(0)
    return dict(q=q, k=k, v=v, q_weight=weights[0], k_weight=weights[1], eps=1e-6,
                inv_freq=inverse_frequencies(R, 10000.0, torch.device("cpu")), positions=torch.tensor(positions),
                slot_ids=torch.tensor(slots), gate=gate, keys=keys, values=values)


def two_kernels(a, window=None, scale=None, config=None):
    """What rope_decode_attention replaces: the rope kernel's store, then decode attention."""
    q = qk_norm_rope_store(a["q"], a["k"], a["v"], a["q_weight"], a["k_weight"], a["eps"], a["inv_freq"],
                           a["positions"], a["slot_ids"], a["keys"], a["values"])
    return decode_attention(q, a["gate"], a["keys"], a["values"], a["positions"], a["slot_ids"], window, scale, config)


def cloned(a):
    return {name: x.clone() if name in ("keys", "values") else x for name, x in a.items()}


CASES = [  # head_dim, rotary dim, query heads per kv head, buffers, norm, gate, window, keys a block
    (64, 32, 1, torch.float32, True, True, None, 16),
    (64, 64, 4, torch.float32, False, True, None, 32),
    (96, 64, 4, torch.bfloat16, True, True, None, 16),
    (96, 32, 1, torch.bfloat16, True, False, 5, 16),
    (64, 32, 4, torch.bfloat16, False, False, 40, 32),
    (64, 48, 4, torch.float32, True, True, 20, 64),
    (96, 64, 1, torch.float32, True, True, None, 64),
]


@pytest.mark.parametrize("D,R,G,dtype,norm,gated,window,block", CASES)
def test_rope_decode_attention_is_the_two_kernels_bit_for_bit(D, R, G, dtype, norm, gated, window, block):
    config = LaunchConfig(1, block)
    a = step(D, R, G, dtype, norm, gated, seed=D + G)
    ref = cloned(a)
    out = rope_decode_attention(**a, window=window, config=config)
    expected = two_kernels(ref, window, config=config)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out, expected)
    assert torch.equal(a["keys"], ref["keys"]) and torch.equal(a["values"], ref["values"])


def test_rope_decode_attention_takes_a_scale_and_refuses_a_split_launch():
    a = step(64, 32, 4, torch.bfloat16, True, True, seed=3)
    ref = cloned(a)
    out = rope_decode_attention(**a, scale=0.3, config=LaunchConfig(1, 16))
    assert torch.equal(out, two_kernels(ref, scale=0.3, config=LaunchConfig(1, 16)))
    assert torch.equal(a["keys"], ref["keys"]) and torch.equal(a["values"], ref["values"])
    with pytest.raises(AssertionError, match="one split"):
        rope_decode_attention(**a, config=LaunchConfig(4, 16))
    with pytest.raises(AssertionError, match="one split"):  # 5 sequences: launch_config splits them
        rope_decode_attention(**a)


@pytest.mark.parametrize("config", [LaunchConfig(1, 16), LaunchConfig(1, 64)])
def test_padded_entries_write_no_cell_and_get_zeros(config):
    # slot id -1: nothing of the token is stored, its output is zero, and the real rows are as without it
    a = step(64, 32, 4, torch.float32, True, True, seed=5)
    a["slot_ids"] = torch.tensor([4, -1, 2, -1, 1])
    real = a["slot_ids"] >= 0
    ref = cloned(a)
    # The buffers as views one slot into a larger one: a store at slot -1 would land in the guard row.
    guarded = torch.cat([torch.zeros(2, 1, L, KVH, 64), torch.stack([a["keys"], a["values"]])], dim=1)
    a["keys"], a["values"] = guarded[0, 1:], guarded[1, 1:]
    out = rope_decode_attention(**a, config=config)
    q = torch.zeros_like(a["q"])
    q[real] = qk_norm_rope_store(a["q"][real], a["k"][real], a["v"][real], a["q_weight"], a["k_weight"], a["eps"],
                                 a["inv_freq"], a["positions"][real], a["slot_ids"][real], ref["keys"], ref["values"])
    expected = decode_attention(q, a["gate"], ref["keys"], ref["values"], a["positions"], a["slot_ids"], config=config)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    assert torch.equal(out, expected)
    assert torch.equal(a["keys"], ref["keys"]) and torch.equal(a["values"], ref["values"])
    assert torch.equal(guarded[:, 0], torch.zeros_like(guarded[:, 0]))


def test_rope_decode_attention_matches_the_torch_form():
    a = step(96, 64, 4, torch.float32, True, True, seed=11)
    keys, values = a["keys"].clone(), a["values"].clone()
    out = rope_decode_attention(**a, window=30, config=LaunchConfig(1, 16))

    positions, slots = a["positions"], a["slot_ids"]
    cos, sin = rope_tables(positions, 64, 10000.0)
    q = apply_rope(rms_norm(a["q"], a["q_weight"], 1e-6), cos, sin)
    keys[slots, positions] = apply_rope(rms_norm(a["k"], a["k_weight"], 1e-6), cos, sin)
    values[slots, positions] = a["v"]
    ref = attend_decode(q, positions, keys, values, slots, L, 30) * torch.sigmoid(a["gate"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["keys"], keys, atol=1e-5, rtol=1e-5)
    assert torch.equal(a["values"], values)


def test_fuses_rope_where_the_launch_has_one_split(monkeypatch):
    """The engine takes the one launch where launch_config gives one split over more programs than
    multiprocessors (B = 128 of the bench model's 2 kv heads over 640 positions), not where it splits (B = 1)
    nor at one split over at most one program a multiprocessor (B = 48, 66), and never with FUSE_ROPE off."""
    from kernels import decode_attention as da

    cpu = torch.device("cpu")  # launch_config counts 132 multiprocessors off CUDA
    assert da.launch_config(128, 2, 640, cpu).splits == 1 and da.fuses_rope(128, 2, 640, cpu)
    assert da.fuses_rope(67, 2, 640, cpu)
    assert da.launch_config(1, 2, 640, cpu).splits > 1 and not da.fuses_rope(1, 2, 640, cpu)
    for B in (48, 66):
        assert da.launch_config(B, 2, 640, cpu).splits == 1 and not da.fuses_rope(B, 2, 640, cpu)
    monkeypatch.setattr(da, "FUSE_ROPE", False)
    assert not da.fuses_rope(128, 2, 640, cpu)


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from hybrid_steps import load_qwen_pair
    return load_qwen_pair(tmp_path_factory.mktemp("qwen3_5_rope_attention"), seed=11)


def test_decode_steps_with_one_split_take_the_one_launch_and_compute_the_same(qwen_pair, monkeypatch):
    """A tiny Qwen3.5 hybrid's padded decode steps with one split a sequence: the attention layer runs
    rope_decode_attention, and every step's logits and the real slots' keys and values are those of the
    three launches; the prefill and the mixed step are untouched (they never take it)."""
    from hybrid_steps import prefill_decode_mixed
    from kernels import decode_attention as da

    monkeypatch.setattr(da, "launch_config", lambda *args, **kwargs: LaunchConfig(1, 16, 4, 2))
    monkeypatch.setattr(da, "_num_sms", lambda device: 1)  # more programs than multiprocessors
    calls = []
    fused = da.rope_decode_attention
    monkeypatch.setattr(da, "rope_decode_attention", lambda *a, **k: calls.append(a[0].shape[0]) or fused(*a, **k))
    model = qwen_pair[1]
    got, pool = prefill_decode_mixed(model)
    attention_layers = sum(keys is not None for keys in pool.keys)
    assert attention_layers > 0 and calls == [4] * 3 * attention_layers  # three decode steps, padded to 4
    monkeypatch.setattr(da, "FUSE_ROPE", False)
    calls.clear()
    want, want_pool = prefill_decode_mixed(model)
    assert not calls
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    real = [0, 1, 2]  # the scenario's slots; the padded row's scratch slot is written by the rope kernel only
    for keys, want_keys in zip(pool.keys + pool.values, want_pool.keys + want_pool.values):
        if keys is not None:
            assert torch.equal(keys[real], want_keys[real])
