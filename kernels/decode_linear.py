"""Dense projections of a decode step (y = x @ W^T for a few rows x), streaming each weight once.

A decode step's GEMMs have M = the batch (1..256 rows) against weights of 4-300 MB: their cost should
be the weight bytes, but at these sizes a launch's fixed latency (~2 us) is as large as the stream,
and cuBLAS's kernels for the bench model's shapes read their weights at 0.2-0.6 of the copy bandwidth
(bench/decode_linear.py; at M = 1 its [1024 x 2048] kernel takes 12.8 us for 4 MB). Here a program owns BN rows of the weight, the wide side of the MMA ("swap
AB": the product is computed as W_tile @ x^T, [BN, BM]) and BM rows of x (all of them up to 256, so
every weight byte is read once), and loops over K with a pipelined load. Where N / BN leaves SMs
idle (N = 1024: the down and out projections), K is split over `split` programs that write fp32
partial products [split, M, N]; a second kernel sums them in a fixed order (no atomics: the same
bits every run) and applies the epilogue.

A caller that adds y into something next (a block's residual stream: the out, o and down projections,
whose add_rms_norm follows) may take the partial products themselves (`partial`, a SplitK) and leave the
sum to that kernel (kernels/norm.py rms_norm), in the same order and rounding: one launch fewer.

Epilogues: none (y in x's dtype), or `silu`: W's rows are [gate | up] (the SwiGLU MLP's gate_up)
and y = silu(x @ Wg^T) * (x @ Wu^T), [M, N / 2]: a program's BN weight rows are BN / 2 gate rows
and the BN / 2 up rows of the same outputs, so the activation happens on the accumulator and the
[M, N] intermediate (and the kernel that read it back) is gone.

Rows past N and M are clamped on load (they read a valid row, whose result is never stored) and
masked on store; K's tail is masked only when K is not a multiple of BK. fp32 inputs multiply in
IEEE fp32 (as torch does by default), not TF32; on the CPU (the Triton interpreter, which multiplies
bf16 operands wrongly) every dtype's operands are widened to fp32 first, which is exact.

`pick` chooses the launch shape per (M, N, K) from the table measured on an H200 (see TABLE), or
None where cuBLAS was as fast (most shapes at M >= 128, where the MMA work and the x tile every
program re-reads from L2 catch up with the weight stream); `project` is what the model calls, on
decode-only steps of the triton backend (engine/models/layers.py, the LM head in hybrid.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import decode_gemv, pdl
from kernels.pdl import gdc_launch_dependents, gdc_wait, prefetch_l2


@dataclass(frozen=True)
class LinearConfig:
    """A launch shape: BN weight rows and BK of K per program step, `split` programs over K, warps and
    pipeline stages. BM (x rows a program holds) follows from M: block_m(M)."""
    bn: int = 64
    bk: int = 128
    split: int = 1
    warps: int = 4
    stages: int = 4


class SplitK(NamedTuple):
    """A projection's output left unreduced: y is parts summed over dim 0 in order (from zero, fp32) and
    rounded to `dtype` (what _reduce_kernel computes; kernels/norm.py rms_norm reads parts as its residual)."""
    parts: Tensor  # [split, M, N] fp32, contiguous
    dtype: torch.dtype


def block_m(M: int) -> int:
    """x rows a program holds: M rounded up to a power of two, 16 (tl.dot's least) to 256."""
    return min(256, max(16, triton.next_power_of_2(M)))


# M changes with the batch: unspecialised, so one compiled kernel serves every M of one block_m.
@triton.jit(do_not_specialize=["M"])
def _decode_linear_kernel(
    x,  # [M, K], last dim contiguous
    w,  # [N, K], last dim contiguous; with SILU rows [gate (HALF) | up (HALF)]
    y,  # [M, N] (or [M, HALF] with SILU), last dim contiguous; unwritten with PARTIAL
    part,  # [split, M, N] fp32, contiguous; written only with PARTIAL
    M,
    N,
    K,
    HALF,  # N // 2 with SILU (unused otherwise)
    k_per_split,  # a multiple of BK
    stride_xm,
    stride_wn,
    stride_ym,
    BN: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    SILU: tl.constexpr,
    PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # 128-byte lines of each weight row to pull into L2 before gdc_wait (0: none)
):
    if PDL:  # whatever comes next on the stream may launch now (it waits for us in its own gdc_wait)
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    o_r = tl.arange(0, BN)
    if SILU:
        # rows [BN/2 gate rows | the BN/2 up rows of the same outputs]
        o_c = pid_n * (BN // 2) + o_r % (BN // 2)  # output column of each tile row
        w_row = tl.minimum(o_c, HALF - 1) + tl.where(o_r >= BN // 2, HALF, 0)
        row_ok = o_c < HALF
    else:
        o_c = pid_n * BN + o_r
        w_row = tl.minimum(o_c, N - 1)
        row_ok = o_c < N
    o_m = pid_m * BM + tl.arange(0, BM)
    m_ok = o_m < M
    x_row = tl.minimum(o_m, M - 1)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    o_k = tl.arange(0, BK)
    if PREFETCH > 0:
        # The weights are no kernel's output: while the kernel before us finishes, this program's
        # rows stream from HBM into L2, and the loads after gdc_wait find them there.
        LINE: tl.constexpr = 1024 // w.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
        o_line = tl.minimum(k_lo + tl.arange(0, PREFETCH) * LINE, K - 1)
        prefetch_l2(w + w_row.to(tl.int64)[:, None] * stride_wn + o_line[None, :])
    if PDL:  # nothing is read or written before the kernel before us is done
        gdc_wait()
    p_w = w + w_row.to(tl.int64)[:, None] * stride_wn + (k_lo + o_k)[None, :]  # [BN, BK]
    p_x = x + x_row.to(tl.int64)[None, :] * stride_xm + (k_lo + o_k)[:, None]  # [BK, BM]: x^T
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k in range(k_lo, k_hi, BK):
        if EVEN_K:
            b_w = tl.load(p_w)
            b_x = tl.load(p_x)
        else:
            k_ok = k + o_k < K
            b_w = tl.load(p_w, mask=k_ok[None, :], other=0)
            b_x = tl.load(p_x, mask=k_ok[:, None], other=0)
        if IEEE:  # fp32 inputs, or any on the CPU (the interpreter multiplies bf16 operands wrongly)
            acc = tl.dot(b_w.to(tl.float32), b_x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_w, b_x, acc)
        p_w += BK
        p_x += BK

    if PARTIAL:  # raw products by weight row; _reduce_kernel sums the splits and applies the epilogue
        p_p = part + (pid_s * M + o_m.to(tl.int64))[None, :] * N + w_row[:, None]
        tl.store(p_p, acc, mask=row_ok[:, None] & m_ok[None, :])
    elif SILU:
        g, u = tl.split(tl.permute(tl.reshape(acc, [2, BN // 2, BM]), [1, 2, 0]))  # [BN/2, BM] each
        b_y = g / (1.0 + tl.exp(-g)) * u
        o_n = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        p_y = y + o_m.to(tl.int64)[None, :] * stride_ym + o_n[:, None]
        tl.store(p_y, b_y.to(y.dtype.element_ty), mask=(o_n < HALF)[:, None] & m_ok[None, :])
    else:
        p_y = y + o_m.to(tl.int64)[None, :] * stride_ym + o_c[:, None]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(
    part,  # [split, M, N] fp32
    y,  # [M, N] or [M, HALF] with SILU
    M,
    N,
    HALF,
    stride_ym,
    SPLIT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    width = HALF if SILU else N
    mask = o_n < width
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if SILU:
        acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: the same sum every run
        row = part + (s * M + i_m) * N
        acc += tl.load(row + o_n, mask=mask, other=0)
        if SILU:
            acc_u += tl.load(row + HALF + o_n, mask=mask, other=0)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    tl.store(y + i_m * stride_ym + o_n, acc.to(y.dtype.element_ty), mask=mask)


def linear(x: Tensor, w: Tensor, config: LinearConfig | None = None, silu: bool = False,
           out: Tensor | None = None, partial: bool = False) -> Tensor | SplitK:
    """x @ w.T, or with `silu` silu(x @ w[:N/2].T) * (x @ w[N/2:].T).

    x: [M, K] (row stride free, last dim contiguous); w: [N, K] (likewise), x's dtype.
    config: the launch shape (default: pick's, else LinearConfig()). out: where to write y (rows free,
    last dim contiguous), else a new tensor. partial (not with silu or out): where the launch splits K,
    return the SplitK partial products instead of reducing them.
    Returns y: [M, N] (with silu [M, N / 2]) in x.dtype, or a SplitK.
    Graph-safe: no host sync; the partial buffer of a split launch comes from torch's allocator.
    """
    assert not partial or (not silu and out is None), "partial: a plain projection into a new tensor"
    x, w, out = decode_gemv.operands(x, w, silu, out)
    M, K = x.shape
    N = w.shape[0]
    width = out.shape[1]
    if M == 0:
        return out
    cfg = config or measured(M, N, K, silu)[1] or default_config(M, N, K, silu)
    BM = block_m(M)
    bk = min(cfg.bk, max(16, triton.next_power_of_2(K)))
    k_blocks = triton.cdiv(K, bk)
    split = max(1, min(cfg.split, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * bk
    split = triton.cdiv(K, k_per_split)  # no empty splits
    tiles_n = triton.cdiv(width, cfg.bn // 2) if silu else triton.cdiv(N, cfg.bn)
    grid = (tiles_n, split, triton.cdiv(M, BM))
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    use_pdl = pdl.enabled(x.device)
    launch = pdl.launch_kwargs(x.device)
    prefetch = prefetch_lines(M, w, min(k_per_split, K), split) if use_pdl else 0
    _decode_linear_kernel[grid](
        x, w, out, part, M, N, K, N // 2 if silu else 0, k_per_split, x.stride(0), w.stride(0), out.stride(0),
        BN=cfg.bn, BM=BM, BK=bk, EVEN_K=K % bk == 0, SILU=silu, PARTIAL=split > 1,
        IEEE=x.dtype == torch.float32 or x.device.type == "cpu", PDL=use_pdl, PREFETCH=prefetch,
        num_warps=cfg.warps, num_stages=cfg.stages, **launch,
    )
    if split > 1 and partial:
        return SplitK(part, x.dtype)
    if split > 1:
        block = min(1024, triton.next_power_of_2(width))
        _reduce_kernel[(M, triton.cdiv(width, block))](
            part, out, M, N, N // 2 if silu else 0, out.stride(0), SPLIT=split, SILU=silu, BLOCK=block, PDL=use_pdl,
            num_warps=4, **launch,
        )
    return out


# Programmatic dependent launch (kernels/pdl.py): each kernel here calls gdc_launch_dependents first (so
# the next PDL launch, the split-K reduction or down after gate_up, may start) and gdc_wait before touching
# memory. Graphed decode logits were bitwise equal with it on and off on an H200 (bench/decode_ops.py
# --check-pdl); engine decode step there (docs/performance.md, "Session 6: decode GEMMs"): B=1 1.011 ->
# 0.977 ms, B=32 1.454 -> 1.410, B=128 and 512 unchanged. An L2 prefetch of the weight rows before gdc_wait
# (cp.async.bulk.prefetch.L2) lost 2-3 us a GEMM then, behind a norm launched without PDL; see PREFETCH_L2.


# L2 prefetch before gdc_wait (kernels/pdl.prefetch_l2): a PDL launch of ours that starts while the kernel
# before it runs pulls its weight rows into L2 meanwhile. Since session 7 every kernel of the decode step
# launches early (the norms too), so this now overlaps; in session 6, behind a norm without PDL, it lost.
# Where, from engine steps on an H200 (docs/performance.md, "Session 8"): from PREFETCH_MIN_M rows, and
# below that only split-K launches (the 4-7 MB N = 1024 projections). B = 32 1.270 -> 1.250 ms; at B = 1
# prefetching every GEMM was 0.022 ms slower (early launches chain, so gate_up's 15 MB would stream during
# the Gated DeltaNet kernel and out_proj, the critical path), split-K only 0.007 faster. Weights over
# PREFETCH_MAX_BYTES (the LM head's 311 MB) would evict themselves. Read at every launch.
PREFETCH_L2 = True
PREFETCH_MAX_BYTES = 32 << 20
PREFETCH_MIN_M = 16


def prefetch_lines(M: int, w: Tensor, k_span: int, split: int) -> int:
    """The PREFETCH constexpr of a PDL launch of M rows, `split` programs over K, each k_span of K:
    the 128-byte lines of each weight row a program pulls into L2 before gdc_wait (rounded up to a power
    of two), or 0 for none (the rules above)."""
    if not PREFETCH_L2 or (M < PREFETCH_MIN_M and split == 1) or w.numel() * w.element_size() > PREFETCH_MAX_BYTES:
        return 0
    return triton.next_power_of_2(triton.cdiv(k_span * w.element_size(), 128))


# ---- which launch shape, and whether at all -------------------------------------------------------------

# "auto": ours where TABLE (or the rule below it) says it beats cuBLAS, on CUDA only; "on": ours for every
# call that reaches project (any device: the interpreter tests); "off": cuBLAS always (A/B timing).
# Read at every call, so flipping it between engine builds is enough (decode graphs capture the path taken).
MODE = "auto"

MAX_M = 256  # above this a decode step's GEMM is cuBLAS's regime

# The compute capability TABLE was measured on (an H200, sm_90): "auto" keeps cuBLAS on any other, where
# nobody has timed ours against it (bench/engine.py --decode-linear-table sets both for the card it runs on).
TABLE_ARCH = (9, 0)


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)

# Measured on an H200 (Triton 3.6, torch 2.11; docs/performance.md, "Session 6: decode GEMMs"):
# bench/decode_linear.py --sweep chose each row's launch shape (a grid of BN, BK, warps, stages and K splits),
# then --spacer timed it against cuBLAS after an RMSNorm writing x, as in a step, with L2 cold for the weights
# (us, the norm's time taken off). A row is ours where it was >= 3% faster, None (cuBLAS) otherwise.
# (N, K, silu) -> [(largest M, config or None), ...] in increasing M; past the last row, cuBLAS.
_C = LinearConfig
TABLE: dict[tuple[int, int, bool], list[tuple[int, LinearConfig | None]]] = {
    # Gated DeltaNet in_proj: M=1 7.3/6.8 us ours/cuBLAS, 8 6.6/6.7, 16 6.2/6.8, 32 6.4/7.1, 64 6.9/7.3,
    # 128 7.9/7.4, 256 9.9/9.3 (weights at copy speed: 4.0 us)
    (8224, 1024, False): [
        (8, None),
        (64, _C(bn=64, bk=128, split=1, warps=4, stages=5)),
    ],
    # MLP gate_up with silu * up (cuBLAS: the GEMM then kernels/swiglu): 6.8/7.8, 6.2/7.8, 5.8/7.9, 6.2/8.1,
    # 6.6/8.5, 7.8/8.6, 9.8/10.8 (copy 3.5 us)
    (7168, 1024, True): [
        (1, _C(bn=128, bk=128, split=1, warps=4, stages=5)),
        (64, _C(bn=64, bk=128, split=1, warps=4, stages=5)),
        (128, _C(bn=64, bk=64, split=1, warps=4, stages=5)),
        (256, _C(bn=64, bk=64, split=1, warps=8, stages=5)),
    ],
    # MLP down: 6.1/7.9, 6.1/7.8, 6.1/8.1, 6.7/8.1, 7.2/8.4, 8.4/8.6, 11.3/8.8 (copy 1.8 us). M = 128 is ours
    # though within 3% here: in a step its split-K sum is the next norm's (SplitK), where cuBLAS launches its own
    # reduction; engine step at B = 128 2.622 -> 2.593 ms (H200, 2026-11-27; o_proj or in_proj ours too: slower).
    # M = 9..32 splits 4, not the sweep's 8: engine step at B = 32 1.174 / 1.175 ms against 1.190-1.216, in two
    # in-engine sweeps (docs/performance.md, "Session 11"); B = 16 unchanged.
    (1024, 3584, False): [
        (1, _C(bn=64, bk=128, split=8, warps=4, stages=5)),
        (8, _C(bn=64, bk=128, split=4, warps=4, stages=5)),
        (32, _C(bn=64, bk=128, split=4, warps=4, stages=5)),
        (64, _C(bn=64, bk=64, split=8, warps=4, stages=5)),
        (128, _C(bn=64, bk=64, split=8, warps=8, stages=5)),
    ],
    # Gated DeltaNet out_proj and attention o_proj: 5.3/12.8 (cuBLAS's M = 1 kernel), 5.4/6.0, 5.5/5.9,
    # 5.8/6.0, 6.3/6.0, 7.3/6.1, 9.9/6.6 (copy 1.0 us)
    (1024, 2048, False): [
        (32, _C(bn=64, bk=128, split=4, warps=4, stages=5)),
    ],
    # attention qkv: 6.2/5.3, 5.3/5.3, 5.1/5.5, 5.2/5.5, 5.7/5.6, 6.8/5.6, 9.2/7.0 (copy 2.5 us)
    (5120, 1024, False): [
        (8, None),
        (32, _C(bn=64, bk=128, split=1, warps=4, stages=5)),
    ],
    # LM head (vocab 151936): 77.4/78.2, 75.9/80.6, 76.6/81.9, 78.5/84.2, 83.4/87.7, 98.6/91.7, 145/123 (copy 74.5)
    (151936, 1024, False): [
        (1, None),
        (16, _C(bn=128, bk=128, split=1, warps=4, stages=3)),
        (64, _C(bn=64, bk=128, split=1, warps=4, stages=3)),
    ],
}


def load_table(path: str) -> dict:
    """A table as bench/decode_linear.py --sweep writes it (JSON: [[N, K, silu, [[M, config dict or null],
    ...]], ...]), for trying a new card's table without editing this file (bench/engine.py --decode-linear-table)."""
    import json
    with open(path) as f:
        rows = json.load(f)
    return {(N, K, bool(silu)): [(M, None if c is None else LinearConfig(**c)) for M, c in entries]
            for N, K, silu, entries in rows}



def default_config(M: int, N: int, K: int, silu: bool) -> LinearConfig:
    """A shape for any (M, N, K): 64 weight rows a program, K split until the grid covers ~132 SMs."""
    bn = 64
    tiles = triton.cdiv(N, bn)
    split = 1
    while tiles * split < 100 and K // (split * 2) >= 512:
        split *= 2
    return LinearConfig(bn=bn, bk=128 if block_m(M) <= 64 else 64, split=split, warps=4, stages=4)


def measured(M: int, N: int, K: int, silu: bool) -> tuple[bool, LinearConfig | None]:
    """(whether TABLE has this (N, K, silu) and M, its config there: None where cuBLAS won)."""
    for largest, cfg in TABLE.get((N, K, silu), []):
        if M <= largest:
            return True, cfg
    return False, None


def _measured_here(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether "auto" may take our kernels: a half-precision GEMM on the card kind TABLE was measured on."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _arch(device) == TABLE_ARCH


def pick(M: int, N: int, K: int, silu: bool, device: torch.device, dtype: torch.dtype) -> LinearConfig | None:
    """The launch shape for this GEMM, or None where cuBLAS should run it (MODE, TABLE, TABLE_ARCH)."""
    if MODE == "off" or not 0 < M <= MAX_M:
        return None
    found, cfg = measured(M, N, K, silu)
    if MODE == "on":
        return cfg or default_config(M, N, K, silu)
    if not _measured_here(device, dtype):
        return None
    return cfg if found else None  # unmeasured shapes stay on cuBLAS


def takes_gemv(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this GEMM goes to kernels/decode_gemv (a few rows, weights loaded before the wait) rather
    than to pick's choice: where decode_gemv.fits, unless MODE is "off" (or "auto" off the measured card).
    Not weights over PREFETCH_MAX_BYTES, the LM head: cuBLAS streams it at copy speed at one row (TABLE),
    and no register tile holds a share of it worth loading early."""
    if MODE == "off" or not decode_gemv.fits(M, K) or N * K * dtype.itemsize > PREFETCH_MAX_BYTES:
        return False
    return MODE == "on" or _measured_here(device, dtype)


def launch_key(M: int, N: int, K: int, silu: bool, device: torch.device, dtype: torch.dtype) -> tuple | None:
    """What a call compiles by (engine/warmup.py builds every distinct one): the config and BM, or None."""
    if takes_gemv(M, N, K, device, dtype):
        return ("gemv", *decode_gemv.gemv_shape(N, K, silu, M), triton.next_power_of_2(M))
    cfg = pick(M, N, K, silu, device, dtype)
    return None if cfg is None else (cfg, block_m(M), min(cfg.split, triton.cdiv(K, cfg.bk)) > 1)


def project(x: Tensor, w: Tensor, silu: bool = False, out: Tensor | None = None,
            partial: bool = False) -> Tensor | SplitK:
    """A decode step's projection: kernels/decode_gemv at a few rows (takes_gemv), else ours where pick
    says so, else cuBLAS (then kernels/swiglu for silu). partial: a SplitK may come back where ours splits
    K (see linear)."""
    M, K = x.shape
    N = w.shape[0]
    if takes_gemv(M, N, K, x.device, x.dtype):
        return decode_gemv.gemv(x, w, silu=silu, out=out)
    assert not isinstance(x, decode_gemv.PendingNorm), "a deferred norm is for decode_gemv's projections"
    cfg = pick(M, N, K, silu, x.device, x.dtype)
    if cfg is not None:
        return linear(x, w, cfg, silu=silu, out=out, partial=partial)
    if silu:
        from kernels.swiglu import silu_mul
        return silu_mul(x @ w.t())
    if out is not None:
        return torch.matmul(x, w.t(), out=out)
    return x @ w.t()
