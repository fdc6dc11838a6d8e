"""A decode step's projections at one or a few rows (batch 1..GEMV_MAX_M): y = x @ W^T with each
program's weight rows loaded into registers before it waits for x.

At batch 1 a decode step was ~190 kernels of 2-7 us, most of it fixed cost per kernel: a launch that
starts early (programmatic dependent launch, kernels/pdl.py) still reads its weights only after
gdc_wait in kernels/decode_linear.py (or, with its L2 prefetch, again from L2 after it). A weight is
no kernel's output, so here a program loads its whole [BN, K] tile into registers first, while the
kernel before it still runs; after gdc_wait only x (a few KB, from L2) is read, multiplied and summed.
No tensor cores: at M <= 4 the products are a few FMAs per weight element, and a whole-K tile needs no
pipelined loop. The tile is capped at TILE elements a row of x (4 warps, 64 registers a thread in bf16), so
a projection is many programs of BN = TILE / K rows; the LM head never comes here (decode_linear.takes_gemv).

The add_rms_norm before a block's first projection can come along (PendingNorm; engine/models/layers.py
defers_norm): every program builds the normed row itself from the residual stream and the delta the
block before left (a few KB from L2, after its wait; program 0 stores their sum for the next block), so
the norm's launch and the boundary after it are gone: a 24-layer step at one row went from 187
launches to 139.

Epilogues as decode_linear's: none, or `silu` (W's rows [gate | up]: a program loads BN / 2 gate rows
and the BN / 2 up rows of the same outputs, y = silu(g) * u). There is no split over K, so y is
always reduced (in x's dtype): the residual projections hand add_rms_norm a plain delta.
Results equal decode_linear's up to summation order (fp32 sums either way).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.pdl import gdc_launch_dependents, gdc_wait

# Weight elements a program holds at one row of x (bf16: 32 KB, 64 registers a thread over 4 warps), and
# TILE / rows at more: each row walked keeps a widened copy of the tile live (see GEMV_MAX_M). Engine step
# on an H200 (docs/performance.md, "Session 9"): B = 1 0.664 ms at 16384 against 0.668 at 8192 and 0.734
# at 32768 over 8 warps; B = 2 0.794 at 8192 against 0.833-0.885 at 16384.
TILE = 16384
WARPS = 4


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x,  # [M, K], last dim contiguous; with NORM the residual stream before the add
    w,  # [N, K], last dim contiguous; with SILU rows [gate (HALF) | up (HALF)]
    y,  # [M, N] (or [M, HALF] with SILU), last dim contiguous
    delta,  # NORM and HAS_DELTA: [M, K], x's dtype, last dim contiguous: added to x
    norm_w,  # NORM: [K]
    s,  # NORM and HAS_DELTA: [M, K], contiguous: x + delta, written by program 0
    M,
    N,
    K,
    HALF,  # N // 2 with SILU (unused otherwise)
    stride_xm,
    stride_wn,
    stride_ym,
    stride_dm,
    eps,
    BN: tl.constexpr,  # output columns a program computes
    BK: tl.constexpr,  # K rounded up to a power of two
    BM: tl.constexpr,  # rows of x walked (those < M computed): M rounded up to a power of two
    SILU: tl.constexpr,
    NORM: tl.constexpr,  # the operand is rms_norm(x (+ delta)) * norm_w, as kernels/norm.py rms_norm computes it
    HAS_DELTA: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel may launch now; it waits for us in its own gdc_wait
        gdc_launch_dependents()
    pid = tl.program_id(0)
    o_n = pid * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    k_ok = o_k < K
    width = HALF if SILU else N
    n_ok = o_n < width
    row = tl.minimum(o_n, width - 1).to(tl.int64)  # rows past N read a valid row, never stored
    # Before gdc_wait: weights only (kernels/pdl.py's rule), loads whose values are used after it.
    b_w = tl.load(w + row[:, None] * stride_wn + o_k[None, :], mask=k_ok[None, :], other=0)
    if SILU:
        b_u = tl.load(w + (row + HALF)[:, None] * stride_wn + o_k[None, :], mask=k_ok[None, :], other=0)
    if NORM:
        b_g = tl.load(norm_w + o_k, mask=k_ok, other=0).to(tl.float32)
    if PDL:
        gdc_wait()
    for m in tl.static_range(BM):
        if m < M:
            b_x = tl.load(x + m * stride_xm + o_k, mask=k_ok, other=0)
            if NORM:
                # Every program builds the row the norm kernel would write (same rounding), from a few KB
                # in L2; program 0 stores the residual stream's sum for the next block.
                if HAS_DELTA:
                    b_d = tl.load(delta + m * stride_dm + o_k, mask=k_ok, other=0)
                    b_x = (b_x.to(tl.float32) + b_d.to(tl.float32)).to(s.dtype.element_ty, fp_downcast_rounding="rtne")
                    if pid == 0:
                        tl.store(s + m * K + o_k, b_x, mask=k_ok)
                b_x = b_x.to(tl.float32)
                rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x) / K + eps)
                b_x = (b_x * rstd * b_g).to(y.dtype.element_ty)
            b_x = b_x.to(tl.float32)
            acc = tl.sum(b_w.to(tl.float32) * b_x[None, :], 1)  # [BN]
            if SILU:
                acc_u = tl.sum(b_u.to(tl.float32) * b_x[None, :], 1)
                acc = acc / (1.0 + tl.exp(-acc)) * acc_u
            tl.store(y + m * stride_ym + o_n, acc.to(y.dtype.element_ty), mask=n_ok)


# Whether a decode step's add_rms_norm before a projection of ours is left to that projection
# (engine/models/layers.py defers_norm; PendingNorm). Read at every forward.
FOLD_NORM = True

# Rows up to which project() takes this kernel (0: never; at most MAX_ROWS). Read at every call, so a
# benchmark may flip it between graph captures. Each row walked costs registers: the compiler keeps the
# tile widened to fp32 for the rows after the first (sm_90: 80 registers a thread at 1 row, 191 at 4).
# Engine step on an H200 (docs/performance.md, "Session 9"), norms folded: B = 1 0.653 ms, B = 2 0.830
# against 0.893 on decode_linear; 4 rows were slower than decode_linear (1.143 against 0.936 ms).
GEMV_MAX_M = 2
MAX_ROWS = 4


def gemv_shape(N: int, K: int, silu: bool, M: int = 1) -> tuple[int, int]:
    """(BN output columns a program computes, BK) for M rows of x: the [BN, BK] tile (twice that with silu)
    within TILE / M (M rounded up to a power of two)."""
    BK = triton.next_power_of_2(K)
    rows = max(1, TILE // triton.next_power_of_2(M) // BK)
    return (max(1, rows // 2) if silu else rows), BK


def fits(M: int, K: int) -> bool:
    """Whether a projection of M rows of K may take this kernel: M within GEMV_MAX_M, a row within a tile."""
    return 0 < M <= min(GEMV_MAX_M, MAX_ROWS) and triton.next_power_of_2(K) <= TILE


def operands(x: Tensor, w: Tensor, silu: bool, out: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(x, w, out) of a projection y = x @ w.T (silu: y = silu(x @ w[:N/2].T) * (x @ w[N/2:].T)), checked,
    with x and w contiguous in their last dim and out a new [M, width] tensor where none was given (this
    kernel's and kernels/decode_linear.linear's)."""
    M, K = x.shape
    N, K_w = w.shape
    assert K == K_w and x.dtype == w.dtype, f"x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}"
    assert not silu or N % 2 == 0, "silu needs w's rows as [gate | up]"
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    width = N // 2 if silu else N
    if out is None:
        out = torch.empty(M, width, dtype=x.dtype, device=x.device)
    assert out.shape == (M, width) and out.stride(-1) == 1 and out.dtype == x.dtype, "out: [M, width], contiguous rows"
    return x, w, out


class PendingNorm(NamedTuple):
    """rms_norm(x + delta) * weight (kernels/norm.py rms_norm with a residual) not computed yet: the one
    projection that reads it computes it (gemv's `x`), and stores x + delta into s. delta None: x alone,
    and s is x. shape, dtype and device are x's, so a layer can take it where it takes a tensor."""
    x: Tensor
    delta: Tensor | None
    weight: Tensor
    eps: float
    s: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device


def pending_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> PendingNorm:
    """The add_rms_norm of a block whose next projection is gemv's: (the deferred norm; its .s is the
    residual stream x + delta, valid once that projection has run)."""
    assert delta is None or (delta.shape == x.shape and delta.dtype == x.dtype), "delta: x's shape and dtype"
    s = x if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return PendingNorm(x, delta, weight, eps, s)


def gemv(x: Tensor | PendingNorm, w: Tensor, silu: bool = False, out: Tensor | None = None) -> Tensor:
    """x @ w.T, or with `silu` silu(x @ w[:N/2].T) * (x @ w[N/2:].T), for M <= MAX_ROWS rows.

    x: [M, K] (row stride free, last dim contiguous), or a PendingNorm whose normed rows are the operand;
    w: [N, K] (likewise), x's dtype. out: where to write y (rows free, last dim contiguous), else a new
    tensor. Returns y: [M, N] (silu: [M, N / 2]) in x.dtype. Graph-safe: no host sync.
    """
    norm = x if isinstance(x, PendingNorm) else None
    x, w, out = operands(norm.x if norm is not None else x, w, silu, out)
    M, K = x.shape
    N = w.shape[0]
    assert M <= MAX_ROWS, f"{M} rows: this kernel walks up to {MAX_ROWS}"
    width = out.shape[1]
    if M == 0:
        return out
    delta = norm.delta if norm is not None else None
    if delta is not None:
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        assert norm.s.is_contiguous()
    BN, BK = gemv_shape(N, K, silu, M)
    _gemv_kernel[(triton.cdiv(width, BN),)](
        x, w, out, x if delta is None else delta, x if norm is None else norm.weight, x if delta is None else norm.s,
        M, N, K, N // 2 if silu else 0, x.stride(0), w.stride(0), out.stride(0),
        0 if delta is None else delta.stride(0), 0.0 if norm is None else norm.eps,
        BN=BN, BK=BK, BM=triton.next_power_of_2(M), SILU=silu, NORM=norm is not None,
        HAS_DELTA=delta is not None, PDL=pdl.enabled(x.device), num_warps=WARPS, **pdl.launch_kwargs(x.device),
    )
    return out
