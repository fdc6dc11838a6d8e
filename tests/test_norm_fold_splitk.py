"""A decode step's add_rms_norm folded into the projections either side of it (kernels/decode_linear.py,
FOLD_NORM_SPLITK), under the Triton interpreter: the split-K projection before it does the add and each
output tile's sums of squares (FINISH), the projection after it normalises the x tiles it loads (NORM).
Against the unfolded launches (the SplitK summed by kernels/norm.py rms_norm, then a plain projection) and
float64; which norms fold; and a tiny hybrid's decode steps with the fold on and off."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
import torch.nn.functional as F
import triton

from kernels import decode_linear as dl
from kernels.decode_linear import LinearConfig, linear
from kernels.norm import rms_norm

EPS = 1e-6


def _producer(M, N, K, dtype, seed):
    """(mixer output [M, K], a residual projection's weight [N, K], the residual stream [M, N], a norm weight
    [N] fp32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (0.1 * torch.randn(N, K, generator=gen)).to(dtype)
    stream = torch.randn(M, N, generator=gen).to(dtype)
    return x, w, stream, torch.rand(N, generator=gen) + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,cfg", [
    (3, 100, 72, LinearConfig(bn=32, bk=16, split=3)),  # 4 tiles of N, the last 4 wide; 4.5 K blocks over 3
    (17, 96, 100, LinearConfig(bn=32, bk=32, split=2)),  # BM 32 with 15 padded rows; a K tail of 4
    (33, 70, 64, LinearConfig(bn=16, bk=16, split=4)),  # BM 64
])
def test_finish_stores_the_unfolded_sum_and_its_per_tile_sums_of_squares(dtype, M, N, K, cfg):
    x, w, stream, norm_weight = _producer(M, N, K, dtype, seed=M)
    deferred = dl.DeferredProjection(x, w, cfg)
    pending, s = dl.finish(deferred, stream, norm_weight, EPS)
    _, s_ref = rms_norm(stream, norm_weight, EPS, residual=deferred.splitk().parts)
    assert torch.equal(s, s_ref) and pending.s is s  # the splits summed in the norm kernel's order and rounding
    assert pending.sumsq.shape == (triton.cdiv(N, cfg.bn), M)
    torch.testing.assert_close(pending.sumsq.sum(0), s.float().pow(2).sum(1), rtol=1e-5, atol=0)
    assert not dl.tile_counters(x.device, 1).any()  # each tile's last program put its counter back to zero
    again, s_again = dl.finish(deferred, stream, norm_weight, EPS)  # as a CUDA graph's replay would
    assert torch.equal(s_again, s) and torch.equal(again.sumsq, pending.sumsq)


def _normed_f64(s, weight):
    s = s.double()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()


def _project_f64(h, w, silu):
    y = h @ w.double().t()
    if silu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# against float64: fp32 sums in another order; in bf16 the normed operand and the output are each rounded once
# (the interpreter truncates: up to 2^-8 relative each, more after silu * up's cancellations)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("M,cfg", [(17, LinearConfig(bn=32, bk=16)), (3, LinearConfig(bn=16, bk=32, split=2))])
def test_norm_mode_projects_the_rows_the_norm_kernel_would_write(dtype, tol, silu, M, cfg):
    hidden = 100  # the reader's K: tails at BK 16 and 32
    x, w, stream, norm_weight = _producer(M, hidden, 48, dtype, seed=hidden + M)
    deferred = dl.DeferredProjection(x, w, LinearConfig(bn=32, bk=16, split=3))
    pending, s = dl.finish(deferred, stream, norm_weight, EPS)
    reader = (0.1 * torch.randn(2 * 30 if silu else 44, hidden, generator=torch.Generator().manual_seed(7))).to(dtype)
    y = linear(pending, reader, cfg, silu=silu)
    h, _ = rms_norm(stream, norm_weight, EPS, residual=deferred.splitk().parts)
    unfolded = linear(h, reader, cfg, silu=silu)
    assert y.shape == unfolded.shape and y.dtype == dtype
    # the normed rows differ from the norm kernel's only in the order of the fp32 sum of squares: in bf16 a
    # last-place rounding of a few operands at most
    assert _rel(y, unfolded) < (1e-6 if dtype == torch.float32 else 4e-3)
    normed = _normed_f64(s, norm_weight).to(dtype)  # in the model's dtype, as the norm's output is
    reference = _project_f64(normed.double(), reader, silu)
    assert _rel(y, reference) < tol and _rel(unfolded, reference) < tol


def test_only_a_deferred_projection_read_by_our_kernel_folds(monkeypatch):
    """folds_norm: the delta must be a DeferredProjection (project's, with FOLD_NORM_SPLITK, where it splits K)
    and the reader ours at these rows: not decode_gemv (M <= 2), not cuBLAS, not absent (a bias, MoE)."""
    from engine.models.layers import add_rms_norm, folds_norm

    monkeypatch.setattr(dl, "MODE", "on")
    monkeypatch.setattr(dl, "FOLD_NORM_SPLITK", True)
    x, w, stream, norm_weight = _producer(4, 64, 64, torch.float32, seed=1)
    reader = torch.zeros(96, 64)
    split = LinearConfig(bn=16, bk=16, split=2)
    monkeypatch.setattr(dl, "default_config", lambda M, N, K, silu: split if N == 64 else LinearConfig(bn=16, bk=16))
    deferred = dl.project(x, w, partial=True)
    assert deferred == dl.DeferredProjection(x, w, split)
    assert folds_norm(stream, deferred, reader, decode=True)
    assert not folds_norm(stream, deferred, reader, decode=False)
    assert not folds_norm(stream, deferred, None, decode=True)
    assert not folds_norm(stream, deferred.splitk(), reader, decode=True)
    assert not folds_norm(stream[:2], dl.DeferredProjection(x[:2], w, split), reader, decode=True)  # gemv rows
    monkeypatch.setattr(dl, "pick", lambda M, N, K, silu, *a: None if silu else split)  # cuBLAS with silu * up
    assert folds_norm(stream, deferred, reader, decode=True)
    assert not folds_norm(stream, deferred, reader, decode=True, silu=True)  # a gate_up reader
    # unfolded, add_rms_norm launches it as project(partial=True) would have returned it
    assert [torch.equal(a, b) for a, b in zip(add_rms_norm(stream, deferred, norm_weight, EPS, "triton"),
                                              rms_norm(stream, norm_weight, EPS, residual=deferred.splitk().parts))] \
        == [True, True]
    monkeypatch.setattr(dl, "FOLD_NORM_SPLITK", False)
    assert isinstance(dl.project(x, w, partial=True), dl.SplitK)


# ---- in the engine -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from hybrid_steps import load_qwen_pair
    return load_qwen_pair(tmp_path_factory.mktemp("qwen3_5_fold"), seed=9)


def _split_residual_projections(monkeypatch, hidden):
    """Every decode projection on kernels/decode_linear, the residual ones (N = hidden) split over K; the fold on."""
    monkeypatch.setattr(dl, "MODE", "on")
    monkeypatch.setattr(dl, "FOLD_NORM_SPLITK", True)
    monkeypatch.setattr(dl, "default_config", lambda M, N, K, silu: LinearConfig(
        bn=32, bk=16, split=2 if N == hidden else 1))


def test_decode_steps_with_folded_norms_match_the_unfolded_ones(qwen_pair, monkeypatch):
    """Three padded decode steps (4 rows) with each block's add_rms_norm after a residual projection folded:
    only the first block's mixer norm and the final norm launch, and the logits (and greedy tokens) are the
    unfolded step's and the torch backend's; prefill and the mixed step are untouched."""
    from hybrid_steps import prefill_decode_mixed
    from kernels import norm

    torch_model, triton_model = qwen_pair
    expected, _ = prefill_decode_mixed(torch_model)
    _split_residual_projections(monkeypatch, triton_model.config.hidden_size)
    norms, normed_reads = [], []
    run_norm, run = norm.rms_norm, dl.linear
    monkeypatch.setattr(norm, "rms_norm", lambda *a, **k: norms.append(1) or run_norm(*a, **k))
    monkeypatch.setattr(dl, "linear", lambda x, *a, **k: normed_reads.append(isinstance(x, dl.PendingTileNorm))
                        or run(x, *a, **k))
    folded, pool = prefill_decode_mixed(triton_model)
    layers = triton_model.config.num_layers
    assert len(norms) == 2 * (2 * layers + 1) + 3 * 2  # the prefill's and mixed step's, then two a decode step
    assert sum(normed_reads) == 3 * (2 * layers - 1)
    monkeypatch.setattr(dl, "FOLD_NORM_SPLITK", False)
    norms.clear()
    unfolded, unfolded_pool = prefill_decode_mixed(triton_model)
    assert len(norms) == 5 * (2 * layers + 1)
    for got, want, ref in zip(folded, unfolded, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    for layer in range(3):
        torch.testing.assert_close(pool.recurrent[layer], unfolded_pool.recurrent[layer], atol=1e-5, rtol=1e-5)


def test_a_decode_step_with_folded_norms_launches_fewer_kernels(qwen_pair, monkeypatch):
    """The launches of one padded decode step (bench/decode_ops.py's count): 2 * layers - 1 norms fewer, and
    nothing launched in their place."""
    from bench.decode_ops import count_decode_step

    model = qwen_pair[1]
    _split_residual_projections(monkeypatch, model.config.hidden_size)
    folded = count_decode_step(model, 4, max_len=64).counts
    monkeypatch.setattr(dl, "FOLD_NORM_SPLITK", False)
    unfolded = count_decode_step(model, 4, max_len=64).counts
    layers = model.config.num_layers
    assert unfolded["triton:_rms_norm_kernel"] == 2 * layers + 1 and folded["triton:_rms_norm_kernel"] == 2
    assert folded["triton:_decode_linear_kernel"] == unfolded["triton:_decode_linear_kernel"]
    assert sum(unfolded.values()) - sum(folded.values()) == 2 * layers - 1
