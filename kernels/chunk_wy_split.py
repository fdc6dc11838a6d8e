"""Launch 1 of the chunk prefill split in two (ChunkConfig.wy_split), each part lighter than the
fused kernel of kernels/chunk_wy.py so that more programs fit a multiprocessor:

  1a. _wy_solve_kernel, one program per (chunk, value head), value heads side by side (those
      of one key head read the same k): G, r = 1/||k||, A and T = (I + A)^-1 exactly as the
      fused kernel (the same _chunk_T), then T stored in the input dtype to Tm [T, HV, 64]
      (row = token, column = position in its chunk). The fused kernel rounds T to the input
      dtype before its products too, so nothing is lost by storing it.
  1b. _wy_apply_kernel, one program per (chunk, value head, block), the blocks being the
      ceil(K / BK) column blocks of w then the ceil(V / BV) column blocks of u, side by side so
      that T and k come from L2 after the first read:
        w[:, block] = T diag(beta exp2(G) r) K[:, block];  u[:, block] = T diag(beta) V[:, block].
      One [64, 64] x [64, B] product a program, nothing carried.
Same arithmetic as the fused kernel, so on the interpreter the outputs are the same bits (on an
H200 too, at the default launch shapes).

Off by default: slower than the fused kernel on an H200 (Triton 3.6, bench/kernels_prefill.py
--variants, graph ms, fused -> split): H16 HV32 K128 V128 16x4096 3.713 -> 3.870, T=8192
0.523 -> 0.549; H16 HV16 16x4096 1.863 -> 1.940. Per kernel at HV32 16x4096: fused 1781 us,
split 1298 (solve) + 644 (apply) us. The solve kernel still needs ~209 registers a thread at
2 warps (sm_90 SASS from a local Triton 3.9 build), so it runs at the fused kernel's occupancy
(4 programs an SM) while the split adds T's round trip through memory; at 4 warps (124
registers) it took 2056 us, with the "blocks" solve 1715 us. What is left to win is in the Gram
and the solve (fla's kkt + solve: ~740 us there).
"""

import triton
import triton.language as tl

from kernels.chunk_common import _chunk_rows, _mm
from kernels.chunk_wy import _chunk_T


@triton.jit(do_not_specialize=["N"])
def _wy_solve_kernel(
    k, g, beta, G, rk, Tm, scratch, cu_seqlens, chunk_start, chunk_seq, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    USE_L2: tl.constexpr, EPS: tl.constexpr, F32: tl.constexpr, SOLVE_TOGETHER: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    hv = pid % HV
    c = pid // HV
    valid, tok, m = _chunk_rows(c, cu_seqlens, chunk_start, chunk_seq, N)
    if valid:
        b_T, b_r, b_beta, b_G = _chunk_T(k, g, beta, G, rk, scratch, c, hv, tok, m, H, HV, K, BK,
                                         USE_L2, EPS, F32, SOLVE_TOGETHER)
        r = tl.arange(0, 64)
        tl.store(Tm + (tok * HV + hv)[:, None] * 64 + r[None, :], b_T.to(Tm.dtype.element_ty),
                 mask=m[:, None])


@triton.jit(do_not_specialize=["N"])
def _wy_apply_kernel(
    k, v, beta, G, rk, Tm, w, u, cu_seqlens, chunk_start, chunk_seq, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, F32: tl.constexpr,
):
    NK = tl.cdiv(K, BK)
    NB = NK + tl.cdiv(V, BV)
    pid = tl.program_id(0).to(tl.int64)
    blk = pid % NB
    hv = pid // NB % HV
    c = pid // NB // HV
    valid, tok, m = _chunk_rows(c, cu_seqlens, chunk_start, chunk_seq, N)
    if valid:
        hk = hv // (HV // H)
        dt = w.dtype.element_ty
        r = tl.arange(0, 64)
        b_T = tl.load(Tm + (tok * HV + hv)[:, None] * 64 + r[None, :], mask=m[:, None], other=0.0)
        b_beta = tl.load(beta + tok * HV + hv, mask=m, other=0.0).to(tl.float32)
        if blk < NK:
            b_G = tl.load(G + tok * HV + hv, mask=m, other=0.0)
            b_r = tl.load(rk + tok * H + hk, mask=m, other=0.0)
            kscale = (b_r * b_beta * tl.exp2(b_G))[:, None]
            ck = blk * BK + tl.arange(0, BK)
            mk = m[:, None] & (ck[None, :] < K)
            b_k = tl.load(k + (tok * (H * K) + hk * K)[:, None] + ck[None, :], mask=mk,
                          other=0.0).to(tl.float32)
            b_w = _mm(b_T, (b_k * kscale).to(dt), None, F32)
            tl.store(w + (tok * (HV * K) + hv * K)[:, None] + ck[None, :], b_w.to(dt), mask=mk)
        else:
            cv = (blk - NK) * BV + tl.arange(0, BV)
            mv = m[:, None] & (cv[None, :] < V)
            p_v = (tok * (HV * V) + hv * V)[:, None] + cv[None, :]
            b_v = tl.load(v + p_v, mask=mv, other=0.0).to(tl.float32)
            b_u = _mm(b_T, (b_v * b_beta[:, None]).to(dt), None, F32)
            tl.store(u + p_v, b_u.to(dt), mask=mv)
