"""Launch 1 of the chunk prefill: the WY representation of every chunk, one program per
(chunk, value head), nothing carried between chunks.

  G = within-chunk cumsum of g, in log2 units, stored to G [T, HV] fp32;
  r = 1 / ||k|| per token (1 without l2norm), stored to rk [T, H] fp32 by the first value head
      of each key head; k itself is never normalised in memory: every product that needs k_hat
      takes raw k and scales its rows by r;
  A = strictly lower beta_i (k_hat_i . k_hat_j) exp2(G_i - G_j)             [64, 64]
  T = (I + A)^-1, two ways (the SOLVE_TOGETHER switch, ChunkConfig.wy_solve):
      "together" (the default): the four diagonal blocks in one [4, 16, 16] forward
                substitution, the rest by four tf32 [64, 64] products (fewer serial steps and
                barriers; on an H200 the whole prefill took 15-18% less time than with "blocks"
                at K = 128, 2% less at K = 256);
      "blocks": forward substitution on the four 16x16 diagonal blocks one after the other,
                tf32 block merges;
  w = T diag(beta exp2(G) r) K -> w [T, HV, K];  u = T diag(beta) V -> u [T, HV, V].
A and T pass through a 16 KB-per-program fp32 scratch to change tile shape; it stays in L1/L2,
and barriers order the program's writes and reads.
"""

import triton
import triton.language as tl

from kernels.chunk_common import _chunk_rows, _decay_mask, _inv_row_norms, _mm


@triton.jit
def _inv_unit_lower(p):
    """(I + A)^-1 for the strictly lower 16x16 block of A at p (row stride 64), by forward
    substitution: row i of N = (I + A)^-1 - I is -A_i - sum_{j<i} A_ij N_j."""
    r = tl.arange(0, 16)
    A = tl.load(p + r[:, None] * 64 + r[None, :])
    X = -A  # rows 0 and 1 are already final
    for i in range(2, 16):
        a = -tl.sum(tl.where(r[:, None] == i, A, 0.0), axis=0)  # -A[i, :], zero for j >= i
        a = a + tl.sum(a[:, None] * X, axis=0)
        X = tl.where(r[:, None] == i, a[None, :], X)
    return X + tl.where(r[:, None] == r[None, :], 1.0, 0.0)


@triton.jit
def _blk(p, i: tl.constexpr, j: tl.constexpr):
    """The 16x16 block (i, j) of the [64, 64] fp32 tile at p."""
    r = tl.arange(0, 16)
    return tl.load(p + (16 * i + r)[:, None] * 64 + (16 * j + r)[None, :])


@triton.jit
def _put(p, i: tl.constexpr, j: tl.constexpr, x):
    r = tl.arange(0, 16)
    tl.store(p + (16 * i + r)[:, None] * 64 + (16 * j + r)[None, :], x)


@triton.jit
def _inv_diag_blocks(p):
    """(I + A_bb)^-1 for the four strictly lower 16x16 diagonal blocks of A, stored at p as
    [64, 16] (row r holds A[r, 16 (r // 16) + j]); returns them as [4, 16, 16]. Forward
    substitution, all four blocks at once: row i of N = (I + A)^-1 - I is
    -A_i - sum_{j<i} A_ij N_j."""
    b = tl.arange(0, 4)[:, None, None]
    i = tl.arange(0, 16)[None, :, None]
    j = tl.arange(0, 16)[None, None, :]
    A = tl.load(p + (16 * b + i) * 16 + j)  # [4, 16, 16]
    X = -A  # rows 0 and 1 are already final
    for s in range(2, 16):
        a = -tl.sum(tl.where(i == s, A, 0.0), axis=1)  # [4, 16]: -A[b, s, :], zero for j >= s
        a = a + tl.sum(a[:, :, None] * X, axis=1)
        X = tl.where(i == s, a[:, None, :], X)
    return X + tl.where(i == j, 1.0, 0.0)


@triton.jit
def _tf32(a, b):
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _solve_by_blocks(p_s, A):
    """(I + A)^-1 [64, 64] fp32 for a strictly lower A: X_ii = (I + A_ii)^-1 by forward
    substitution, one 16x16 block after the other, then for i > j
    X_ij = -X_ii sum_{j <= l < i} A_il X_lj (tf32 block merges). A and T pass through the
    program's 16 KB scratch at p_s to change tile shape."""
    r = tl.arange(0, 64)
    tl.store(p_s + r[:, None] * 64 + r[None, :], A)
    tl.debug_barrier()
    X00 = _inv_unit_lower(p_s)
    X11 = _inv_unit_lower(p_s + 16 * 64 + 16)
    X22 = _inv_unit_lower(p_s + 32 * 64 + 32)
    X33 = _inv_unit_lower(p_s + 48 * 64 + 48)
    A10 = _blk(p_s, 1, 0)
    A20 = _blk(p_s, 2, 0)
    A21 = _blk(p_s, 2, 1)
    A30 = _blk(p_s, 3, 0)
    A31 = _blk(p_s, 3, 1)
    A32 = _blk(p_s, 3, 2)
    X10 = -_tf32(X11, _tf32(A10, X00))
    X21 = -_tf32(X22, _tf32(A21, X11))
    X32 = -_tf32(X33, _tf32(A32, X22))
    X20 = -_tf32(X22, _tf32(A20, X00) + _tf32(A21, X10))
    X31 = -_tf32(X33, _tf32(A31, X11) + _tf32(A32, X21))
    X30 = -_tf32(X33, _tf32(A30, X00) + _tf32(A31, X10) + _tf32(A32, X20))
    tl.debug_barrier()  # every read of A is done before T overwrites it
    _put(p_s, 0, 0, X00)
    _put(p_s, 1, 0, X10)
    _put(p_s, 1, 1, X11)
    _put(p_s, 2, 0, X20)
    _put(p_s, 2, 1, X21)
    _put(p_s, 2, 2, X22)
    _put(p_s, 3, 0, X30)
    _put(p_s, 3, 1, X31)
    _put(p_s, 3, 2, X32)
    _put(p_s, 3, 3, X33)
    tl.debug_barrier()
    return tl.load(p_s + r[:, None] * 64 + r[None, :],
                   mask=(r[None, :] // 16) <= (r[:, None] // 16), other=0.0)


@triton.jit
def _solve_together(p_s, A):
    """(I + A)^-1 [64, 64] fp32 for a strictly lower A = D + L (D block diagonal, 16x16 blocks;
    L strictly block lower): (I + A) = (I + D)(I + N), N = (I + D)^-1 L, N^4 = 0, so
    T = (I - N + N^2 - N^3)(I + D)^-1. The four (I + D_bb)^-1 by forward substitution together
    (one [4, 16, 16] tile, 14 steps), the rest by four tf32 [64, 64] products. D and its inverse
    pass through the first 4 KB of the program's scratch at p_s to change tile shape."""
    r = tl.arange(0, 64)
    rb = r[:, None] // 16
    cb = r[None, :] // 16
    off_d = r[:, None] * 16 + r[None, :] % 16  # [64, 64] -> [64, 16] diagonal blocks
    tl.store(p_s + off_d, A, mask=rb == cb)
    tl.debug_barrier()
    Dinv = _inv_diag_blocks(p_s)
    tl.debug_barrier()  # every read of D is done before its inverse overwrites it
    b3 = tl.arange(0, 4)[:, None, None]
    i3 = tl.arange(0, 16)[None, :, None]
    j3 = tl.arange(0, 16)[None, None, :]
    tl.store(p_s + (16 * b3 + i3) * 16 + j3, Dinv)
    tl.debug_barrier()
    Dinv = tl.load(p_s + off_d, mask=rb == cb, other=0.0)  # [64, 64] block diagonal
    # (I + N)^-1 in Horner form, Y <- I - N Y, to keep few tiles live.
    Nm = -_tf32(Dinv, tl.where(rb > cb, A, 0.0))  # -N
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    Y = eye + Nm
    Y = tl.dot(Nm, Y, eye, input_precision="tf32")
    Y = tl.dot(Nm, Y, eye, input_precision="tf32")
    return _tf32(Y, Dinv)


# N (sequences in the batch) changes every step: unspecialised, so a mixed step meeting N == 1 or
# N % 16 == 0 for the first time does not build a new kernel mid-serving.
@triton.jit(do_not_specialize=["N"])
def _wy_kernel(
    k, v, g, beta, G, rk, w, u, scratch, cu_seqlens, chunk_start, chunk_seq, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, EPS: tl.constexpr,
    F32: tl.constexpr, SOLVE_TOGETHER: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1).to(tl.int64)
    valid, tok, m = _chunk_rows(c, cu_seqlens, chunk_start, chunk_seq, N)
    if valid:
        hk = hv // (HV // H)
        dt = w.dtype.element_ty
        r = tl.arange(0, 64)
        b_g = tl.load(g + tok * HV + hv, mask=m, other=0.0).to(tl.float32) * 1.4426950408889634
        b_G = tl.cumsum(b_g, axis=0)
        tl.store(G + tok * HV + hv, b_G, mask=m)
        b_beta = tl.load(beta + tok * HV + hv, mask=m, other=0.0).to(tl.float32)

        # Raw K K^T over K in blocks of BK, and the squared row norms in a loop of their own:
        # register code reading the product's k tile in the pipelined loop would get that tile
        # one buffer fewer than the asynchronous wgmma needs on Triton 3.6 (kernels/chunk_output.py).
        p_k = k + (tok * (H * K) + hk * K)[:, None]
        A = tl.zeros([64, 64], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            b_k = tl.load(p_k + ck[None, :], mask=m[:, None] & (ck[None, :] < K), other=0.0)
            A = _mm(b_k, tl.trans(b_k), A, F32)
        if USE_L2:
            b_r = _inv_row_norms(p_k, m, K, BK, EPS)
        else:
            b_r = tl.where(m, 1.0, 0.0)
        if hv % (HV // H) == 0:
            tl.store(rk + tok * H + hk, b_r, mask=m)
        low = (r[:, None] > r[None, :]) & m[:, None]
        A = A * (b_r * b_beta)[:, None] * b_r[None, :] * _decay_mask(b_G, b_G, low)

        p_s = scratch + (c * HV + hv) * 4096
        if SOLVE_TOGETHER:
            b_T = _solve_together(p_s, A).to(dt)
        else:
            b_T = _solve_by_blocks(p_s, A).to(dt)

        # w = T diag(beta exp2(G) r) K, u = T diag(beta) V.
        kscale = (b_r * b_beta * tl.exp2(b_G))[:, None]
        p_w = w + (tok * (HV * K) + hv * K)[:, None]
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mk = m[:, None] & (ck[None, :] < K)
            b_k = tl.load(p_k + ck[None, :], mask=mk, other=0.0).to(tl.float32)
            b_w = _mm(b_T, (b_k * kscale).to(dt), None, F32)
            tl.store(p_w + ck[None, :], b_w.to(dt), mask=mk)
        p_v = (tok * (HV * V) + hv * V)[:, None]
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            mv = m[:, None] & (cv[None, :] < V)
            b_v = tl.load(v + p_v + cv[None, :], mask=mv, other=0.0).to(tl.float32)
            b_u = _mm(b_T, (b_v * b_beta[:, None]).to(dt), None, F32)
            tl.store(u + p_v + cv[None, :], b_u.to(dt), mask=mv)
