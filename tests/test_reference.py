"""The plain-PyTorch Gated DeltaNet ops: the chunked form against the token-by-token recurrence,
the recurrence against transformers' independent implementation, and the causal conv against
torch's conv1d. Everything here is what later kernels are measured against."""

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import (
    causal_conv1d,
    causal_conv1d_update,
    chunk_gated_delta_rule,
    gdn_gates,
    l2norm,
    recurrent_gated_delta_rule,
)

K, V = 32, 24  # unequal, so a transposed [V, K] state cannot pass by accident


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def make_inputs(T, H=2, HV=4, seed=0, dtype=torch.float32, decay_scale=1.0):
    """Random q, k, v and gates shaped like a real layer's (g from gdn_gates, so g <= 0)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, K, generator=gen).to(dtype)
    k = torch.randn(T, H, K, generator=gen).to(dtype)
    v = torch.randn(T, HV, V, generator=gen).to(dtype)
    a, b = torch.randn(T, HV, generator=gen), torch.randn(T, HV, generator=gen)
    A_log = torch.rand(HV, generator=gen).log() + torch.tensor(decay_scale).log()
    dt_bias = torch.randn(HV, generator=gen)
    g, beta = gdn_gates(a.to(dtype), b.to(dtype), A_log, dt_bias)
    return q, k, v, g, beta


def make_state(N, HV=4, seed=1):
    return randn(N, HV, K, V, seed=seed)


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


# --- small ops ---------------------------------------------------------------------------------


def test_l2norm_gives_unit_fp32_vectors_for_bf16_input():
    x = randn(5, 3, K).to(torch.bfloat16)
    y = l2norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(5, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y * x.float().norm(dim=-1, keepdim=True), x.float())


def test_gates_match_the_formula_and_stay_in_range():
    a, b = randn(7, 4, seed=1) * 10, randn(7, 4, seed=2) * 3  # a reaches softplus's linear tail
    A_log, dt_bias = randn(4, seed=3), randn(4, seed=4)
    g, beta = gdn_gates(a.bfloat16(), b.bfloat16(), A_log, dt_bias)
    assert g.dtype == beta.dtype == torch.float32
    expected_g = -A_log.exp() * torch.log1p((a.bfloat16().float() + dt_bias).exp())
    torch.testing.assert_close(g, expected_g, rtol=1e-5, atol=1e-5)
    assert (g <= 0).all() and (beta > 0).all() and (beta < 1).all()


# --- chunked form vs the recurrence -------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("H, HV", [(2, 4), (3, 3)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_recurrence_fp32(T, H, HV, with_state):
    q, k, v, g, beta = make_inputs(T, H, HV)
    s0 = make_state(1, HV) if with_state else None

    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)

    assert o.shape == (T, HV, V) and o.dtype == torch.float32
    assert s.shape == (1, HV, K, V) and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_chunk_matches_recurrence_on_a_varlen_batch_with_states():
    lengths = [1, 37, 64, 129, 5, 200]
    q, k, v, g, beta = make_inputs(sum(lengths))
    s0 = make_state(len(lengths))

    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu(lengths))
    o_ref, s_ref = recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, cu_seqlens=cu(lengths)
    )

    assert rel_err(o, o_ref) < 1e-5
    for n in range(len(lengths)):
        assert rel_err(s[n], s_ref[n]) < 1e-5, f"final state of sequence {n}"


def test_chunk_matches_recurrence_bf16():
    q, k, v, g, beta = make_inputs(300, dtype=torch.bfloat16)
    s0 = make_state(1).bfloat16()

    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)

    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2  # bf16 rounding of the output is all that differs
    assert rel_err(s, s_ref) < 1e-5  # the states never leave fp32


@pytest.mark.parametrize("chunk_size", [16, 128])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q, k, v, g, beta = make_inputs(150)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_chunk_survives_fast_decay_without_overflow():
    # g down to -50 per token: the cumulative decay over a chunk is far below exp's range, and
    # any exponent evaluated with the wrong sign would overflow to inf and turn outputs into nan.
    q, k, v, g, beta = make_inputs(130, decay_scale=50.0)
    assert g.min() < -50

    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=make_state(1))
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=make_state(1))

    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_inputs_are_left_untouched(rule):
    inputs = make_inputs(70)
    s0 = make_state(1)
    copies = [x.clone() for x in (*inputs, s0)]

    _, s = rule(*inputs, initial_state=s0)

    for before, after in zip(copies, (*inputs, s0)):
        assert torch.equal(before, after)
    assert s.data_ptr() != s0.data_ptr()


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_qk_l2norm_flag_normalises_q_and_k_or_takes_them_as_given(rule):
    q, k, v, g, beta = make_inputs(40)

    o_given, s_given = rule(l2norm(q), l2norm(k), v, g, beta, use_qk_l2norm=False)
    o_normed, s_normed = rule(q, k, v, g, beta, use_qk_l2norm=True)
    o_raw, _ = rule(q, k, v, g, beta, use_qk_l2norm=False)

    assert rel_err(o_normed, o_given) < 1e-5 and rel_err(s_normed, s_given) < 1e-5
    assert rel_err(o_raw, o_given) > 0.1


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_scale_multiplies_the_output(rule):
    q, k, v, g, beta = make_inputs(40)

    o_default, s_default = rule(q, k, v, g, beta)
    o_scaled, s_scaled = rule(q, k, v, g, beta, scale=3 * K**-0.5)

    assert rel_err(o_scaled, 3 * o_default) < 1e-5
    assert torch.equal(s_scaled, s_default)  # scale touches only the read-out


# --- the recurrence vs an implementation nobody here wrote ---------------------------------------


@pytest.mark.parametrize("H, HV", [(2, 4), (3, 3)])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrence_matches_transformers(H, HV, with_state):
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    B, T = 2, 50
    q, k, v, g, beta = make_inputs(B * T, H, HV)
    s0 = make_state(B, HV) if with_state else None

    o, s = recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, cu_seqlens=cu([T] * B)
    )
    o_hf, s_hf = qwen3_next.torch_recurrent_gated_delta_rule(
        *(x.reshape(B, T, *x.shape[1:]) for x in (q, k, v, g, beta)),
        initial_state=s0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )

    assert rel_err(o, o_hf.reshape(B * T, HV, V)) < 1e-5
    assert rel_err(s, s_hf) < 1e-5


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_consecutive_value_heads_share_a_key_head(rule):
    q, k, v, g, beta = make_inputs(70, H=2, HV=6)

    o, s = rule(q, k, v, g, beta)
    # Value heads 0-2 read key head 0 and heads 3-5 key head 1: spelled out with 6 key heads.
    o_ref, s_ref = rule(q.repeat_interleave(3, dim=1), k.repeat_interleave(3, dim=1), v, g, beta)

    assert rel_err(o, o_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6


# --- variable-length batches and carried state ---------------------------------------------------


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_packed_batch_equals_each_sequence_alone(rule):
    lengths = [70, 3, 64, 1, 130]
    q, k, v, g, beta = make_inputs(sum(lengths))
    s0 = make_state(len(lengths))

    o, s = rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu(lengths))

    bounds = cu(lengths).tolist()
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = [x[bos:eos] for x in (q, k, v, g, beta)]
        o_n, s_n = rule(*alone, initial_state=s0[n : n + 1])
        assert rel_err(o[bos:eos], o_n) < 1e-5, f"output of sequence {n}"
        assert rel_err(s[n], s_n[0]) < 1e-5, f"final state of sequence {n}"


@pytest.mark.parametrize("rule", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
@pytest.mark.parametrize("split", [1, 64, 77])
def test_splitting_a_prompt_with_the_state_carried_equals_one_call(rule, split):
    q, k, v, g, beta = make_inputs(200)
    s0 = make_state(1)

    o_whole, s_whole = rule(q, k, v, g, beta, initial_state=s0)
    o_first, s_mid = rule(*(x[:split] for x in (q, k, v, g, beta)), initial_state=s0)
    o_rest, s_end = rule(*(x[split:] for x in (q, k, v, g, beta)), initial_state=s_mid)

    assert rel_err(torch.cat([o_first, o_rest]), o_whole) < 1e-5
    assert rel_err(s_end, s_whole) < 1e-5


# --- causal conv ---------------------------------------------------------------------------------

D, W = 6, 4


def make_conv(T):
    return randn(T, D, seed=0), randn(D, W, seed=1), randn(D, seed=2)  # x, weight, bias


@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_matches_torch_conv1d(activation):
    x, weight, bias = make_conv(20)

    y, state = causal_conv1d(x, weight, bias=bias, activation=activation)

    # torch's conv1d is a cross-correlation over [batch, channels, time]; pad W-1 on the left.
    expected = F.conv1d(F.pad(x.t()[None], (W - 1, 0)), weight[:, None, :], bias, groups=D)
    expected = expected[0].t()
    expected = F.silu(expected) if activation == "silu" else expected
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], x[-(W - 1) :].t())


def test_conv_split_with_the_state_carried_equals_one_call():
    x, weight, bias = make_conv(20)
    past = randn(1, D, W - 1, seed=3)

    y_whole, s_whole = causal_conv1d(x, weight, bias=bias, initial_state=past)
    y_first, s_mid = causal_conv1d(x[:9], weight, bias=bias, initial_state=past)
    y_rest, s_end = causal_conv1d(x[9:], weight, bias=bias, initial_state=s_mid)

    torch.testing.assert_close(torch.cat([y_first, y_rest]), y_whole)
    torch.testing.assert_close(s_end, s_whole)


def test_conv_pieces_shorter_than_the_window_carry_the_state():
    x, weight, bias = make_conv(7)
    past = randn(1, D, W - 1, seed=3)

    y_whole, s_whole = causal_conv1d(x, weight, bias=bias, initial_state=past)
    ys, state = [], past
    for bos, eos in [(0, 1), (1, 3), (3, 4), (4, 7)]:  # three pieces shorter than W-1
        y, state = causal_conv1d(x[bos:eos], weight, bias=bias, initial_state=state)
        ys.append(y)

    torch.testing.assert_close(torch.cat(ys), y_whole)
    torch.testing.assert_close(state, s_whole)


def test_conv_update_step_by_step_equals_prefill():
    x, weight, bias = make_conv(10)
    past = randn(1, D, W - 1, seed=3)

    y_prefill, s_prefill = causal_conv1d(x, weight, bias=bias, initial_state=past)
    conv_state = past.clone()
    y_steps = [causal_conv1d_update(x[t : t + 1], conv_state, weight, bias=bias) for t in range(10)]

    torch.testing.assert_close(torch.cat(y_steps), y_prefill)
    torch.testing.assert_close(conv_state, s_prefill)  # advanced in place


def test_conv_update_shifts_each_sequence_state_and_keeps_dtypes():
    x, weight, bias = make_conv(3)
    x = x.bfloat16()
    conv_state = randn(3, D, W - 1, seed=3).bfloat16()
    expected_state = torch.cat([conv_state[:, :, 1:], x[:, :, None]], dim=-1)

    y = causal_conv1d_update(x, conv_state, weight, bias=bias)

    assert y.dtype == torch.bfloat16 and y.shape == (3, D)
    assert torch.equal(conv_state, expected_state)


def test_conv_returns_the_input_dtype():
    x, weight, bias = make_conv(5)
    y, state = causal_conv1d(x.bfloat16(), weight, bias=bias)
    y_ref, _ = causal_conv1d(x.bfloat16().float(), weight, bias=bias)
    assert y.dtype == state.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref.bfloat16())


def test_conv_packed_batch_equals_each_sequence_alone():
    lengths = [5, 1, 2, 12]
    x, weight, bias = make_conv(sum(lengths))
    past = randn(len(lengths), D, W - 1, seed=3)

    y, state = causal_conv1d(x, weight, bias=bias, initial_state=past, cu_seqlens=cu(lengths))

    bounds = cu(lengths).tolist()
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        y_n, s_n = causal_conv1d(x[bos:eos], weight, bias=bias, initial_state=past[n : n + 1])
        torch.testing.assert_close(y[bos:eos], y_n)
        torch.testing.assert_close(state[n], s_n[0])
    # A 1-token sequence keeps the last two inputs of its past and appends its token.
    torch.testing.assert_close(state[1], torch.cat([past[1, :, 1:], x[5:6].t()], dim=-1))
