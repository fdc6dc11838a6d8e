"""kernels/gdn_decode.py's one-launch decode step (conv -> delta rule -> gated norm), under the Triton
interpreter: several steps in a row over slot-indexed conv and recurrent state equal the fp32
reference (kernels/reference.py's conv update and recurrence, then the gated norm in float64),
equal the three unfused kernels up to summation order, skip padding and leave other slots alone."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
import torch.nn.functional as F

from conv_ring import ring_from_window, window_of_ring
from kernels import reference
from kernels.conv import causal_conv1d_step
from kernels.gdn_decode import conv_decode_norm, fused_launch_config, use_fused_decode
from kernels.norm import gated_rms_norm
from kernels.recurrent import fused_recurrent_decode

EPS = 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def make_layer(H, HV, K, V, W, num_slots, state_dtype, gen):
    D = 2 * H * K + HV * V
    return dict(
        conv_weight=torch.randn(D, W, generator=gen) * 0.5,
        conv_pool=torch.randn(num_slots, D, W, generator=gen),  # rings by position (kernels/conv.py)
        A_log=torch.randn(HV, generator=gen) * 0.5,
        dt_bias=torch.randn(HV, generator=gen) * 0.5,
        norm_weight=torch.randn(V, generator=gen),
        state_pool=torch.randn(num_slots, HV, K, V, generator=gen).to(state_dtype),
    )


def step_inputs(N, H, HV, K, V, dtype, gen):
    """x [N, D], z [N, HV, V], a, b [N, HV] as views into one projection output, as the model has them."""
    D = 2 * H * K + HV * V
    proj = torch.randn(N, D + HV * V + 2 * HV, generator=gen).to(dtype)
    x = proj[:, :D]
    z = proj[:, D:D + HV * V].view(N, HV, V)
    b, a = proj[:, D + HV * V:].split(HV, dim=-1)
    return x, z, a, b


def fused(x, z, a, b, layer, slot_ids, positions, H, **launch):
    return conv_decode_norm(x, layer["conv_weight"], layer["conv_pool"], positions, z, a, b, layer["A_log"],
                            layer["dt_bias"],
                            layer["norm_weight"], layer["state_pool"], slot_ids, num_k_heads=H, eps=EPS, **launch)


def unfused(x, z, a, b, layer, slot_ids, positions, H):
    """The three kernels the decode path launches without the fusion."""
    HV, K, V = layer["state_pool"].shape[1:]
    qkv = causal_conv1d_step(x, layer["conv_weight"], None, layer["conv_pool"], slot_ids, positions)
    q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
    o = fused_recurrent_decode(q.view(-1, H, K), k.view(-1, H, K), v.view(-1, HV, V), a, b, layer["A_log"],
                               layer["dt_bias"], layer["state_pool"], slot_ids)
    return gated_rms_norm(o, z, layer["norm_weight"], EPS)


def reference_step(x, z, a, b, layer, H):
    """The reference on a gathered batch (no padding), advancing layer's conv windows [N, D, W-1] and states
    in place."""
    HV, K, V = layer["state_pool"].shape[1:]
    N = x.shape[0]
    qkv = reference.causal_conv1d_update(x.float(), layer["conv_pool"], layer["conv_weight"])
    q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
    g, beta = reference.gdn_gates(a, b, layer["A_log"], layer["dt_bias"])
    o, final = reference.recurrent_gated_delta_rule(
        q.reshape(N, H, K), k.reshape(N, H, K), v.reshape(N, HV, V), g, beta,
        initial_state=layer["state_pool"].float(), cu_seqlens=torch.arange(N + 1))
    layer["state_pool"].copy_(final)
    o = o.double()
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS) * layer["norm_weight"].double() * F.silu(z.double())


def run_steps(*, H, HV, K, V, W=4, slot_ids, num_slots, steps, dtype, state_dtype, seed=0, **launch):
    gen = torch.Generator().manual_seed(seed)
    slot_ids = torch.tensor(slot_ids)
    live = (slot_ids >= 0).nonzero().flatten()
    layer = make_layer(H, HV, K, V, W, num_slots, state_dtype, gen)
    starts = torch.tensor([(3 * i) % 7 for i in range(len(slot_ids))])  # 0, 3, 6, 2, 5, ...: the first step's
    # Each live request's inputs before its start, as its slot's ring (zero before position 0).
    windows = torch.randn(len(live), layer["conv_pool"].shape[1], W - 1, generator=gen)
    for n, i in enumerate(live):
        windows[n] = window_of_ring(ring_from_window(windows[n], int(starts[i])), int(starts[i]))
        layer["conv_pool"][slot_ids[i]] = ring_from_window(windows[n], int(starts[i]))
    before = {name: t.clone() for name, t in layer.items()}
    ref = {name: t[slot_ids[live]].float() if name.endswith("pool") else t for name, t in before.items()}
    ref["conv_pool"] = windows
    ys, ys_ref = [], []
    for step in range(steps):
        x, z, a, b = step_inputs(len(slot_ids), H, HV, K, V, dtype, gen)
        ys.append(fused(x, z, a, b, layer, slot_ids, starts + step, H, **launch))
        ys_ref.append(reference_step(x[live], z[live], a[live], b[live], ref, H))
    return dict(layer=layer, before=before, ref=ref, ys=ys, ys_ref=ys_ref, live=live, slot_ids=slot_ids,
                ends=starts + steps)


@pytest.mark.parametrize("dtype,state_dtype,tol", [
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 2e-2),
    (torch.bfloat16, torch.bfloat16, 3e-2),
])
@pytest.mark.parametrize("BV", [32, 16, 8])
def test_steps_match_reference_with_gva_odd_sizes_shuffled_slots_and_padding(dtype, state_dtype, tol, BV):
    # V = 24 and K = 12 are not powers of two: the tiles are masked; G = 2 value heads per key head; a
    # row is one V block (BV = 32), two with the second masked (16), or three (8), normed across them.
    r = run_steps(H=2, HV=4, K=12, V=24, slot_ids=[6, -1, 2, 4, -1], num_slots=8, steps=3, dtype=dtype,
                  state_dtype=state_dtype, BV=BV)
    live, slots = r["live"], r["slot_ids"][r["live"]]
    for y, y_ref in zip(r["ys"], r["ys_ref"]):
        assert y.dtype == dtype and y.shape == (5, 4, 24)
        assert rel_err(y[live], y_ref) < tol
        assert torch.equal(y[[1, 4]], torch.zeros_like(y[[1, 4]]))
    # bf16 inputs: the kernel rounds the conv output to bf16 as the unfused path stores it; the reference does not.
    state_tol = 1e-5 if dtype == state_dtype == torch.float32 else 1e-2
    assert rel_err(r["layer"]["state_pool"][slots], r["ref"]["state_pool"]) < state_tol
    # The conv taps are the last inputs, stored as they came (fp32 pool: bit for bit).
    taps_tol = 0 if dtype == torch.float32 else 1e-2
    taps = torch.stack([window_of_ring(r["layer"]["conv_pool"][slot], int(r["ends"][i]))
                        for i, slot in zip(live, slots)])
    assert rel_err(taps, r["ref"]["conv_pool"]) <= taps_tol


@pytest.mark.parametrize("state_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_whole_head_state_loaded_before_the_wait_steps_as_the_reference(state_dtype, tol):
    # One value head per key head and the row in one V block (V = 24 in a 32-wide tile): the kernel
    # loads the slot's state tile before gdc_wait (PRELOAD), the path a decode step of the bench model takes.
    r = run_steps(H=3, HV=3, K=12, V=24, slot_ids=[4, -1, 1, 0], num_slots=6, steps=3, dtype=torch.float32,
                  state_dtype=state_dtype, BV=32)
    live, slots = r["live"], r["slot_ids"][r["live"]]
    for y, y_ref in zip(r["ys"], r["ys_ref"]):
        assert rel_err(y[live], y_ref) < tol
        assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert rel_err(r["layer"]["state_pool"][slots], r["ref"]["state_pool"]) < (1e-5 if tol < 1e-4 else 1e-2)
    untouched = [2, 3, 5]
    assert all(torch.equal(r["layer"][name][untouched], r["before"][name][untouched])
               for name in ("conv_pool", "state_pool"))


def test_slots_outside_the_batch_and_padding_are_untouched_bit_for_bit():
    r = run_steps(H=1, HV=3, K=8, V=16, W=3, slot_ids=[3, -1, 0], num_slots=5, steps=2, dtype=torch.float32,
                  state_dtype=torch.float32)
    untouched = [1, 2, 4]
    for name in ("conv_pool", "state_pool"):
        assert torch.equal(r["layer"][name][untouched], r["before"][name][untouched])
        assert not torch.equal(r["layer"][name][[3, 0]], r["before"][name][[3, 0]])


def test_an_all_padding_batch_changes_nothing_and_returns_zeros():
    gen = torch.Generator().manual_seed(5)
    layer = make_layer(2, 2, 16, 16, 4, 3, torch.float32, gen)
    before = {name: t.clone() for name, t in layer.items()}
    x, z, a, b = step_inputs(3, 2, 2, 16, 16, torch.bfloat16, gen)
    y = fused(x, z, a, b, layer, torch.full((3,), -1, dtype=torch.int32), torch.tensor([0, 4, 9]), 2)
    assert torch.equal(y, torch.zeros_like(y))
    assert all(torch.equal(layer[name], before[name]) for name in layer)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("BV", [32, 16])
def test_equals_the_three_unfused_kernels_up_to_summation_order(state_dtype, BV):
    # The fused step rounds where the unfused one stores (conv output, o): the same bf16 values
    # but for the last bit now and then.
    gen = torch.Generator().manual_seed(7)
    H, HV, K, V = 2, 4, 32, 32
    slot_ids = torch.tensor([5, 1, -1, 3])
    one = make_layer(H, HV, K, V, 4, 6, state_dtype, gen)
    two = {name: t.clone() for name, t in one.items()}
    for step in range(3):
        x, z, a, b = step_inputs(4, H, HV, K, V, torch.bfloat16, gen)
        positions = torch.tensor([2, 0, 7, 5]) + step
        y_fused = fused(x, z, a, b, one, slot_ids, positions, H, BV=BV)
        y_unfused = unfused(x, z, a, b, two, slot_ids, positions, H)
        assert rel_err(y_fused, y_unfused) < 4e-3
    assert torch.equal(one["conv_pool"], two["conv_pool"])
    assert rel_err(one["state_pool"], two["state_pool"]) < (1e-6 if state_dtype == torch.float32 else 4e-3)


def test_the_fusion_is_taken_for_small_batches_of_an_fp32_state_whose_rows_fit_a_program():
    cpu = torch.device("cpu")  # counted as 132 multiprocessors
    assert use_fused_decode(1, 16, 16, 128, 128, cpu) and use_fused_decode(4, 16, 16, 128, 128, cpu)
    assert not use_fused_decode(5, 16, 16, 128, 128, cpu)  # the unfused kernels were faster from B = 8
    assert not use_fused_decode(1, 16, 16, 128, 128, cpu, state_bytes=2)
    assert not use_fused_decode(1, 4, 8, 256, 512, cpu)  # a [256, 512] row does not fit a program
    assert fused_launch_config(128, 128) == (128, 4)
    assert fused_launch_config(256, 512) == (64, 4)
