"""kernels/decode_gemv.py under the Triton interpreter against torch (x @ W^T in fp32, then cast): one to
MAX_ROWS rows, odd N and K (masked tails), the silu * up epilogue, bf16 and fp32, strided rows; and which
decode projections kernels/decode_linear.project sends to it."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
from test_kernels_decode_linear import TOL, _reference  # the same oracle and tolerances

from kernels import decode_gemv as dg
from kernels import decode_linear as dl


def _rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,silu", [
    (1, 37, 100, False),  # K and N tails
    (1, 70, 100, True),  # 35 outputs: gate rows 0..34, up rows 35..69
    (3, 130, 1000, False),  # 3 of 4 rows walked
    (4, 10, 3000, True),  # BK 4096: one row a program
    (2, 515, 20, False),  # many rows a program, the last program mostly past N
])
def test_matches_torch(dtype, M, N, K, silu):
    gen = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (0.1 * torch.randn(N, K, generator=gen)).to(dtype)
    y = dg.gemv(x, w, silu=silu)
    assert y.shape == (M, N // 2 if silu else N) and y.dtype == dtype
    assert _rel_err(y, _reference(x, w, silu)) < TOL[dtype]


def test_reads_strided_rows_and_writes_into_a_strided_output():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 96, generator=gen)[:, :64]  # row stride 96
    w = torch.randn(50, 64, generator=gen)
    out = torch.full((2, 80), 7.0)
    y = dg.gemv(x, w, out=out[:, 10:60])
    assert y.data_ptr() == out[:, 10:60].data_ptr()
    assert _rel_err(out[:, 10:60], _reference(x, w, False)) < 1e-5
    assert torch.equal(out[:, :10], torch.full((2, 10), 7.0)) and torch.equal(out[:, 60:], torch.full((2, 20), 7.0))


def test_a_tile_holds_at_most_TILE_weights_a_row_of_x():
    for N, K, silu in [(8224, 1024, False), (7168, 1024, True), (1024, 3584, False), (1024, 2048, False)]:
        for M in (1, 2, 3):
            BN, BK = dg.gemv_shape(N, K, silu, M)
            rows = 1 if M == 1 else 2 if M == 2 else 4
            assert BK >= K and BN * BK * (2 if silu else 1) * rows <= dg.TILE and BN >= 1
    assert dg.gemv_shape(8224, 1024, False, 2)[0] == dg.gemv_shape(8224, 1024, False, 1)[0] // 2


def test_project_takes_it_for_few_rows_and_small_weights_only(monkeypatch):
    monkeypatch.setattr(dl, "MODE", "on")
    monkeypatch.setattr(dg, "GEMV_MAX_M", 2)
    calls = []
    run = dg.gemv
    monkeypatch.setattr(dg, "gemv", lambda x, w, **k: calls.append(x.shape[0]) or run(x, w, **k))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=gen)
    for M in (1, 2, 3):
        x = torch.randn(M, 32, generator=gen)
        assert _rel_err(dl.project(x, w, partial=True), _reference(x, w, False)) < 1e-5
    assert calls == [1, 2]  # three rows: decode_linear's kernel
    # weights over PREFETCH_MAX_BYTES (an LM head) are streamed by decode_linear even at one row
    assert not dl.takes_gemv(1, 151936, 1024, torch.device("cpu"), torch.bfloat16)
    assert dl.takes_gemv(1, 8224, 1024, torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(dl, "MODE", "off")
    assert not dl.takes_gemv(1, 8224, 1024, torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(dl, "MODE", "auto")  # auto: on the measured card kind only
    assert not dl.takes_gemv(1, 8224, 1024, torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(dl, "MODE", "on")
    monkeypatch.setattr(dg, "GEMV_MAX_M", 0)
    assert not dl.takes_gemv(1, 8224, 1024, torch.device("cpu"), torch.bfloat16)


def test_norm_folded_into_the_projection_gives_the_norm_kernels_operand():
    # PendingNorm's operand is rms_norm(x + delta) * weight rounded as kernels/norm.py rounds it, and
    # program 0 stores x + delta: the same bits as the norm kernel, then the same projection.
    from kernels.norm import rms_norm

    gen = torch.Generator().manual_seed(9)
    x, delta = (torch.randn(1, 300, generator=gen).to(torch.bfloat16) for _ in range(2))
    weight = torch.randn(300, generator=gen)
    w = (0.1 * torch.randn(70, 300, generator=gen)).to(torch.bfloat16)
    for d in (delta, None):
        pending = dg.pending_norm(x, d, weight, 1e-6)
        y = dg.gemv(pending, w, silu=True)
        normed, s = (rms_norm(x, weight, 1e-6), x) if d is None else rms_norm(x, weight, 1e-6, residual=d)
        assert torch.equal(pending.s, s)
        assert (pending.s is x) == (d is None)  # no add: the stream is x itself, nothing stored
        assert torch.equal(y, dg.gemv(normed, w, silu=True))


def _decode_steps(model, rows, steps=3):
    """Logits of `steps` decode steps of `rows` sequences (DecodeStep: that many rows), after prefills of
    7 and 5 tokens in slots 1 and 0."""
    from engine.cuda_graphs import DecodeStep
    from engine.models.state import Batch

    lens, slots = [7, 5][:rows], [1, 0][:rows]
    pool = model.new_pool(2, max_len=32)
    for _ in range(2):
        pool.allocate()
    prompt = torch.randint(0, 384, (sum(lens),), generator=torch.Generator().manual_seed(2))
    model(prompt, Batch.build(lens, slots, [0] * rows, model.device), pool)
    step = DecodeStep(model, pool, max_batch=rows, capture=False)
    return [step.run([(11 * i + 3 * j) % 384 for j in range(rows)], slots, [n + i for n in lens]).float().clone()
            for i in range(steps)]


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from hybrid_steps import load_qwen_pair
    return load_qwen_pair(tmp_path_factory.mktemp("qwen3_5_gemv"), seed=8)


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_steps_on_gemv_with_folded_norms_match_the_torch_backend(qwen_pair, monkeypatch, rows):
    """A one- or two-row decode step with every projection on decode_gemv, each block's two add_rms_norms
    folded into the projection after them: only the final norm launches, and the logits equal the torch
    backend's and the unfolded step's."""
    from kernels import norm

    torch_model, triton_model = qwen_pair
    expected = _decode_steps(torch_model, rows)
    monkeypatch.setattr(dl, "MODE", "on")
    monkeypatch.setattr(dg, "GEMV_MAX_M", 2)
    pending, norms = [], []
    run, run_norm = dg.gemv, norm.rms_norm
    monkeypatch.setattr(dg, "gemv", lambda x, w, **k: pending.append(isinstance(x, dg.PendingNorm)) or run(x, w, **k))
    monkeypatch.setattr(norm, "rms_norm", lambda *a, **k: norms.append(1) or run_norm(*a, **k))
    folded = _decode_steps(triton_model, rows)
    layers = triton_model.config.num_layers
    # per step: each block's in/qkv, out/o, gate_up and down on gemv, two of them reading a pending norm,
    # and this tiny model's LM head (a 384-row vocabulary: under PREFETCH_MAX_BYTES)
    assert len(pending) == 3 * (4 * layers + 1) and sum(pending) == 3 * 2 * layers
    assert len(norms) == (2 * layers + 1) + 3  # the prefill's, then only each step's final norm
    for got, want in zip(folded, expected):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    monkeypatch.setattr(dg, "FOLD_NORM", False)
    pending.clear()
    unfolded = _decode_steps(triton_model, rows)
    assert len(pending) == 3 * (4 * layers + 1) and sum(pending) == 0
    for got, want in zip(unfolded, folded):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
