"""A decode step's projections at one or a few rows (batch 1..GEMV_MAX_M): y = x @ W^T with each
program's weight rows loaded into registers before it waits for x.

At batch 1 a decode step is ~190 kernels of 2-7 us, most of it fixed cost per kernel: a launch that
starts early (programmatic dependent launch, kernels/pdl.py) still reads its weights only after
gdc_wait in kernels/decode_linear.py (or, with its L2 prefetch, again from L2 after it). A weight is
no kernel's output, so here a program loads its whole [BN, K] tile into registers first, while the
kernel before it still runs; after gdc_wait only x (a few KB, from L2) is read, multiplied and summed.
No tensor cores: at M <= 4 the products are a few FMAs per weight element, and a whole-K tile needs no
pipelined loop. The tile is capped at TILE elements (4 warps, 64 registers a thread in bf16), so a
projection is many programs of BN = TILE / K rows; the LM head (over decode_linear.PREFETCH_MAX_BYTES)
never comes here.

Epilogues as decode_linear's: none, or `silu` (W's rows [gate | up]: a program loads BN / 2 gate rows
and the BN / 2 up rows of the same outputs, y = silu(g) * u). There is no split over K, so y is
always reduced (in x's dtype): the residual projections hand add_rms_norm a plain delta.
Results equal decode_linear's up to summation order (fp32 sums either way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.pdl import gdc_launch_dependents, gdc_wait

# Weight elements a program holds (bf16: 32 KB, 64 registers a thread over 4 warps).
TILE = 16384
WARPS = 4


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x,  # [M, K], last dim contiguous
    w,  # [N, K], last dim contiguous; with SILU rows [gate (HALF) | up (HALF)]
    y,  # [M, N] (or [M, HALF] with SILU), last dim contiguous
    M,
    N,
    K,
    HALF,  # N // 2 with SILU (unused otherwise)
    stride_xm,
    stride_wn,
    stride_ym,
    BN: tl.constexpr,  # output columns a program computes
    BK: tl.constexpr,  # K rounded up to a power of two
    BM: tl.constexpr,  # rows of x walked (those < M computed): GEMV_MAX_M rounded up to a power of two
    SILU: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel may launch now; it waits for us in its own gdc_wait
        gdc_launch_dependents()
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    k_ok = o_k < K
    width = HALF if SILU else N
    n_ok = o_n < width
    row = tl.minimum(o_n, width - 1).to(tl.int64)  # rows past N read a valid row, never stored
    # Before gdc_wait: the weights only (kernels/pdl.py's rule), loads whose values are used after it.
    b_w = tl.load(w + row[:, None] * stride_wn + o_k[None, :], mask=k_ok[None, :], other=0)
    if SILU:
        b_u = tl.load(w + (row + HALF)[:, None] * stride_wn + o_k[None, :], mask=k_ok[None, :], other=0)
    if PDL:
        gdc_wait()
    for m in tl.static_range(BM):
        if m < M:
            b_x = tl.load(x + m * stride_xm + o_k, mask=k_ok, other=0).to(tl.float32)
            acc = tl.sum(b_w.to(tl.float32) * b_x[None, :], 1)  # [BN]
            if SILU:
                acc_u = tl.sum(b_u.to(tl.float32) * b_x[None, :], 1)
                acc = acc / (1.0 + tl.exp(-acc)) * acc_u
            tl.store(y + m * stride_ym + o_n, acc.to(y.dtype.element_ty), mask=n_ok)


# Rows up to which project() takes this kernel (0: never; at most MAX_ROWS). Read at every call, so a
# benchmark may flip it between graph captures. Each row walked costs registers: the compiler keeps the
# tile widened to fp32 for the rows after the first (sm_90: 80 registers a thread at 1 row, 191 at 4).
GEMV_MAX_M = 1
MAX_ROWS = 4


def gemv_shape(N: int, K: int, silu: bool) -> tuple[int, int]:
    """(BN output columns a program computes, BK): the [BN, BK] tile (twice that with silu) within TILE."""
    BK = triton.next_power_of_2(K)
    rows = max(1, TILE // BK)
    return (max(1, rows // 2) if silu else rows), BK


def fits(M: int, N: int, K: int, element_size: int) -> bool:
    """Whether a projection of M rows may take this kernel: M within GEMV_MAX_M, a row of K within a
    tile, and weights small enough to be streamed once per step anyway (not the LM head)."""
    from kernels.decode_linear import PREFETCH_MAX_BYTES
    return (0 < M <= min(GEMV_MAX_M, MAX_ROWS) and triton.next_power_of_2(K) <= TILE
            and N * K * element_size <= PREFETCH_MAX_BYTES)


def gemv(x: Tensor, w: Tensor, silu: bool = False, out: Tensor | None = None) -> Tensor:
    """x @ w.T, or with `silu` silu(x @ w[:N/2].T) * (x @ w[N/2:].T), for M <= GEMV_MAX_M rows.

    x: [M, K] (row stride free, last dim contiguous); w: [N, K] (likewise), x's dtype. out: where to write
    y (rows free, last dim contiguous), else a new tensor. Returns y: [M, N] (silu: [M, N / 2]) in x.dtype.
    Graph-safe: no host sync.
    """
    M, K = x.shape
    N, K_w = w.shape
    assert K == K_w and x.dtype == w.dtype, f"x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}"
    assert M <= MAX_ROWS, f"{M} rows: this kernel walks up to {MAX_ROWS}"
    assert not silu or N % 2 == 0, "silu needs w's rows as [gate | up]"
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    width = N // 2 if silu else N
    if out is None:
        out = torch.empty(M, width, dtype=x.dtype, device=x.device)
    assert out.shape == (M, width) and out.stride(-1) == 1 and out.dtype == x.dtype, "out: [M, width], contiguous rows"
    if M == 0:
        return out
    BN, BK = gemv_shape(N, K, silu)
    _gemv_kernel[(triton.cdiv(width, BN),)](
        x, w, out, M, N, K, N // 2 if silu else 0, x.stride(0), w.stride(0), out.stride(0),
        BN=BN, BK=BK, BM=triton.next_power_of_2(max(M, GEMV_MAX_M)), SILU=silu, PDL=pdl.enabled(x.device),
        num_warps=WARPS, **pdl.launch_kwargs(x.device),
    )
    return out
