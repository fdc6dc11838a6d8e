"""kernels/decode_linear.py under the Triton interpreter against torch (x @ W^T in fp32, then cast):
odd M, N and K (tails in every dimension), split K, the silu * up epilogue, bf16 and fp32; which
calls take it (MODE, TABLE); and the engine's triton decode step with every projection on it against
the torch backend."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import pytest
import torch
import torch.nn.functional as F

from kernels import decode_linear as dl
from kernels.decode_linear import LinearConfig, linear

# ||y - ref|| / ||ref||: fp32 sums in another order; bf16 rounds the output once (2^-9 relative)
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def _reference(x, w, silu):
    y = x.float() @ w.float().t()
    if silu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y.to(x.dtype)


def _inputs(M, N, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=gen).to(dtype), (0.1 * torch.randn(N, K, generator=gen)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,cfg", [
    (1, 200, 96, LinearConfig(bn=64, bk=32)),  # N: 3 blocks and a tail of 8 rows
    (3, 200, 100, LinearConfig(bn=32, bk=32, split=3)),  # K tail of 4, split in 3 (with the tail in the last)
    (17, 160, 64, LinearConfig(bn=64, bk=16, split=2)),  # BM 32 with 15 padded rows; N = 2.5 blocks (8224-like)
    (67, 130, 48, LinearConfig(bn=16, bk=16)),  # BM 128
])
def test_matches_torch(dtype, M, N, K, cfg):
    x, w = _inputs(M, N, K, dtype, seed=M)
    y = linear(x, w, cfg)
    ref = _reference(x, w, False)
    assert y.shape == (M, N) and y.dtype == dtype
    assert ((y.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,cfg", [
    (1, 2 * 100, 80, LinearConfig(bn=64, bk=32)),  # 100 outputs in tiles of 32: a tail of 4
    (17, 2 * 48, 100, LinearConfig(bn=32, bk=32, split=2)),  # split: the reduction applies silu * up
    (67, 2 * 24, 48, LinearConfig(bn=16, bk=16)),
])
def test_silu_epilogue_matches_torch(dtype, M, N, K, cfg):
    x, w = _inputs(M, N, K, dtype, seed=N)
    y = linear(x, w, cfg, silu=True)
    ref = _reference(x, w, True)
    assert y.shape == (M, N // 2) and y.dtype == dtype
    assert ((y.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[dtype]


def test_writes_into_a_strided_output_and_reads_strided_rows():
    x_big, w = _inputs(5, 72, 40, torch.float32, seed=2)
    x = torch.cat([x_big, x_big], dim=1)[:, :40]  # row stride 80
    out = torch.full((5, 100), 7.0)
    y = linear(x, w, LinearConfig(bn=32, bk=16, split=2), out=out[:, :72])
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:, :72], _reference(x_big, w, False), atol=1e-5, rtol=1e-5)
    assert (out[:, 72:] == 7.0).all()  # nothing written past the 72 columns


def test_split_k_is_deterministic_and_close_to_unsplit():
    x, w = _inputs(9, 96, 160, torch.bfloat16, seed=3)
    a = linear(x, w, LinearConfig(bn=32, bk=32, split=4))
    assert torch.equal(a, linear(x, w, LinearConfig(bn=32, bk=32, split=4)))
    torch.testing.assert_close(a, linear(x, w, LinearConfig(bn=32, bk=32)), atol=2e-2, rtol=2e-2)


def test_pick_follows_the_mode_and_the_table(monkeypatch):
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    cfg = LinearConfig(bn=128, bk=64, split=2, warps=8, stages=3)
    monkeypatch.setattr(dl, "TABLE", {(300, 64, False): [(8, cfg), (64, None)]})
    monkeypatch.setattr(dl, "MODE", "auto")
    monkeypatch.setattr(dl, "_arch", lambda device: dl.TABLE_ARCH)
    assert dl.pick(4, 300, 64, False, cpu, bf16) is None  # auto: CUDA only
    assert dl.pick(4, 300, 64, False, cuda, bf16) == cfg
    monkeypatch.setattr(dl, "_arch", lambda device: (8, 0))
    assert dl.pick(4, 300, 64, False, cuda, bf16) is None  # a card the table was not measured on
    monkeypatch.setattr(dl, "_arch", lambda device: dl.TABLE_ARCH)
    assert dl.pick(4, 300, 64, False, cuda, torch.float32) is None  # fp32 models stay on cuBLAS
    assert dl.pick(9, 300, 64, False, cuda, bf16) is None  # cuBLAS won there
    assert dl.pick(65, 300, 64, False, cuda, bf16) is None  # past the table
    assert dl.pick(4, 301, 64, False, cuda, bf16) is None  # an unmeasured shape
    monkeypatch.setattr(dl, "MODE", "on")
    assert dl.pick(4, 300, 64, False, cpu, bf16) == cfg
    assert dl.pick(9, 300, 64, False, cpu, bf16) == dl.default_config(9, 300, 64, False)
    assert dl.pick(257, 300, 64, False, cpu, bf16) is None  # M past MAX_M: cuBLAS's regime
    monkeypatch.setattr(dl, "MODE", "off")
    assert dl.pick(4, 300, 64, False, cuda, bf16) is None


def test_project_falls_back_to_torch_with_the_same_result(monkeypatch):
    x, w = _inputs(3, 64, 32, torch.float32, seed=4)
    for mode in ("off", "on"):
        monkeypatch.setattr(dl, "MODE", mode)
        torch.testing.assert_close(dl.project(x, w), _reference(x, w, False), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dl.project(x, w, silu=True), _reference(x, w, True), atol=1e-5, rtol=1e-5)


def test_table_configs_are_well_formed():
    for (N, K, silu), rows in dl.TABLE.items():
        assert [m for m, _ in rows] == sorted(m for m, _ in rows) and rows[-1][0] <= dl.MAX_M
        for _, cfg in rows:
            assert cfg is None or (cfg.bn in (16, 32, 64, 128, 256) and cfg.bk in (16, 32, 64, 128, 256)
                                   and cfg.split >= 1 and cfg.warps in (4, 8))


# ---- in the engine -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from hybrid_steps import load_qwen_pair
    return load_qwen_pair(tmp_path_factory.mktemp("qwen3_5_linear"), seed=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,split", [(1, 96, 128, 4), (5, 70, 100, 4)])  # the second with a K tail
def test_split_k_products_summed_by_the_norm_give_the_reduction_bits(dtype, M, N, K, split):
    """A residual projection's SplitK handed to rms_norm: the same y and residual sum, bit for bit, as the
    reduction kernel's output handed to it (the norm sums the splits in the same order and rounding)."""
    from kernels.norm import rms_norm

    x, w = _inputs(M, N, K, dtype, seed=K)
    stream = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    norm_weight = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5
    cfg = LinearConfig(bn=32, bk=32, split=split)
    parts = linear(x, w, cfg, partial=True)
    assert isinstance(parts, dl.SplitK) and parts.parts.shape == (split, M, N) and parts.dtype == dtype
    y, s = rms_norm(stream, norm_weight, 1e-6, residual=parts.parts)
    y_ref, s_ref = rms_norm(stream, norm_weight, 1e-6, residual=linear(x, w, cfg))
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    # unsplit launches have nothing to hand over
    assert isinstance(linear(x, w, LinearConfig(bn=32, bk=32), partial=True), torch.Tensor)


def test_triton_decode_step_on_the_kernel_matches_the_torch_backend(qwen_pair, monkeypatch):
    """The padded decode step CUDA graphs capture, with every projection (and the LM head) on
    kernels/decode_linear, against the torch backend; prefill and mixed steps stay on torch matmuls.
    The projections into the residual stream (out, o, down: N = hidden) split K, so they hand their
    products to the next add_rms_norm (SplitK); the others run unsplit."""
    from hybrid_steps import prefill_decode_mixed

    hidden = qwen_pair[0].config.hidden_size
    monkeypatch.setattr(dl, "MODE", "on")
    monkeypatch.setattr(dl, "default_config", lambda M, N, K, silu: LinearConfig(
        bn=32, bk=16, split=2 if N == hidden else 1))
    calls = []
    run = dl.linear
    monkeypatch.setattr(dl, "linear", lambda x, w, cfg, **k: calls.append((x.shape[0], w.shape[0], k.get("silu")))
                        or run(x, w, cfg, **k))
    from kernels import norm
    residual_dims, run_norm = [], norm.rms_norm
    monkeypatch.setattr(norm, "rms_norm", lambda x, w, eps, residual=None: residual_dims.append(
        None if residual is None else residual.dim()) or run_norm(x, w, eps, residual=residual))
    results = [prefill_decode_mixed(model) for model in qwen_pair]  # prefill and the mixed step: torch matmuls
    # per decode step: 3 GDN layers x (in, out) + attention (qkv, o) + 4 MLPs (gate_up with silu, down) + head
    per_step = 3 * 2 + 2 + 4 * 2 + 1
    assert len(calls) == 3 * per_step and {c[0] for c in calls} == {4}
    assert sum(1 for c in calls if c[2]) == 3 * 4
    # each decode step's 8 residual adds after the first take split-K products
    assert residual_dims.count(3) == 3 * 8
    (expected, ref_pool), (got, pool) = results
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-4)
    for layer in range(3):
        torch.testing.assert_close(pool.recurrent[layer], ref_pool.recurrent[layer], atol=1e-4, rtol=1e-4)


def test_decode_step_launches_on_the_kernel(monkeypatch):
    """With the kernel on, a 24-layer decode step's 97 GEMMs are its launches and the SwiGLU kernel is gone."""
    from bench.decode_ops import count_decode_step, random_model

    monkeypatch.setattr(dl, "MODE", "on")
    counts = count_decode_step(random_model("triton", torch.bfloat16), 4).counts
    assert counts["triton:_decode_linear_kernel"] == 4 * 24 + 1
    assert counts["triton:_silu_mul_kernel"] == counts["matmul"] == counts["linear"] == 0


def test_prefetch_covers_a_programs_k_span_and_skips_what_would_not_fit(monkeypatch):
    monkeypatch.setattr(dl, "PREFETCH_L2", True)
    w = torch.empty(8224, 1024, dtype=torch.bfloat16, device="meta")  # in_proj, 16.8 MB
    # 1024 bf16 columns are 2048 bytes: 16 lines; a split's 288 columns (576 bytes) need 4.5, rounded to 8
    assert dl.prefetch_lines(32, w, 1024, split=1) == 16
    assert dl.prefetch_lines(32, w, 288, split=4) == 8
    assert dl.prefetch_lines(dl.PREFETCH_MIN_M - 1, w, 1024, split=1) == 0  # few rows: only split launches
    assert dl.prefetch_lines(1, w, 256, split=4) == 4
    head = torch.empty(151936, 1024, dtype=torch.bfloat16, device="meta")  # the LM head would evict itself
    assert dl.prefetch_lines(32, head, 1024, split=1) == 0
    fp32 = torch.empty(1024, 2048, dtype=torch.float32, device="meta")
    assert dl.prefetch_lines(64, fp32, 512, split=4) == 16
    monkeypatch.setattr(dl, "PREFETCH_L2", False)
    assert dl.prefetch_lines(32, w, 1024, split=1) == 0
