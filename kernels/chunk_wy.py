"""Launch 1 of the chunk prefill: the WY representation of every chunk, one program per
(chunk, value head), nothing carried between chunks.

  G = within-chunk cumsum of g, in log2 units, stored to G [T, HV] fp32;
  r = 1 / ||k|| per token (1 without l2norm), from the diagonal of the raw K K^T, stored to
      rk [T, H] fp32 by the first value head of each key head; k itself is never normalised in
      memory: every product that needs k_hat takes raw k and scales its rows by r;
  A = strictly lower beta_i (k_hat_i . k_hat_j) exp2(G_i - G_j)             [64, 64]
  T = (I + A)^-1, two ways (ChunkConfig.wy_solve):
      "together" (the default): the four diagonal blocks in one [4, 16, 16] forward
                substitution whose sums stay inside a warp, the rest by four tf32 [64, 64]
                products (fewer serial steps and barriers than "blocks");
      "blocks": forward substitution on the four 16x16 diagonal blocks one after the other,
                tf32 block merges;
  w = (T diag(beta exp2(G) r)) K -> w [T, HV, K];  u = (T diag(beta)) V -> u [T, HV, V]: T's
      columns are scaled in fp32 and rounded to the input dtype once, so the K and V tiles go
      from memory straight into the products.
A and T pass through a 16 KB-per-program fp32 scratch to change tile shape ("together" uses its
first 4 KB); it stays in L1/L2, and barriers order the program's writes and reads.
"""

import triton
import triton.language as tl

from kernels.chunk_common import _chunk_rows, _decay_mask, _mm


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
def _inv_diag_blocks(p_s, A):
    """The block diagonal (I + D)^-1 [64, 64] of a strictly lower A (D: its four 16x16 diagonal
    blocks), by forward substitution on all four blocks at once, held transposed: Y[b, j, l] =
    N[b, l, j] with N = (I + D)^-1 - I, so that step s (column s of Y += Y a, a = -D[b, s, :]
    read from scratch) sums along the tile's contiguous axis, inside each thread and its warp;
    the untransposed form sums across the two warps, a shared-memory round trip and a barrier
    a sum. D and the result pass through the first 4 KB of the scratch at p_s as [64, 16]."""
    r = tl.arange(0, 64)
    diag = r[:, None] // 16 == r[None, :] // 16
    off_d = r[:, None] * 16 + r[None, :] % 16  # [64, 64] -> [64, 16] diagonal blocks
    tl.store(p_s + off_d, A, mask=diag)
    tl.debug_barrier()
    b = tl.arange(0, 4)[:, None, None]
    j = tl.arange(0, 16)[None, :, None]
    l = tl.arange(0, 16)[None, None, :]
    Y = -tl.load(p_s + (16 * b + l) * 16 + j)  # N's rows 0 and 1 are final already
    for s in tl.static_range(2, 16):  # unrolled: the row loads need not wait for the steps
        # a as a whole [4, 16, 16] tile (rows repeated along j) so that it is loaded in Y's layout
        a = -tl.load(p_s + (16 * b + s) * 16 + l + 0 * j)  # zero for l >= s
        Y = tl.where(l == s, Y + tl.sum(a * Y, axis=2)[:, :, None], Y)
    tl.debug_barrier()  # every read of D is done before its inverse overwrites it
    tl.store(p_s + (16 * b + l) * 16 + j, Y + tl.where(j == l, 1.0, 0.0))
    tl.debug_barrier()
    return tl.load(p_s + off_d, mask=diag, other=0.0)


@triton.jit
def _solve_together(p_s, A):
    """(I + A)^-1 [64, 64] fp32 for a strictly lower A = D + L (D block diagonal, 16x16 blocks;
    L strictly block lower): (I + A) = (I + D)(I + N), N = (I + D)^-1 L, N^4 = 0, so
    T = (I - N + N^2 - N^3)(I + D)^-1. The four (I + D_bb)^-1 by forward substitution together
    (_inv_diag_blocks), the rest by four tf32 [64, 64] products."""
    r = tl.arange(0, 64)
    Dinv = _inv_diag_blocks(p_s, A)
    # (I + N)^-1 in Horner form, Y <- I - N Y, to keep few tiles live.
    Nm = -_tf32(Dinv, tl.where(r[:, None] // 16 > r[None, :] // 16, A, 0.0))  # -N
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

        # Raw K K^T over K in blocks of BK; ||k||^2 is its diagonal, so no register code reads
        # the k tiles (which inside the pipelined loop would get a tile one buffer fewer than the
        # asynchronous wgmma needs on Triton 3.6, kernels/chunk_output.py) and no second pass.
        p_k = k + (tok * (H * K) + hk * K)[:, None]
        A = tl.zeros([64, 64], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            b_k = tl.load(p_k + ck[None, :], mask=m[:, None] & (ck[None, :] < K), other=0.0)
            A = _mm(b_k, tl.trans(b_k), A, F32)
        if USE_L2:
            b_r = tl.rsqrt(tl.sum(tl.where(r[:, None] == r[None, :], A, 0.0), axis=1) + EPS)
        else:
            b_r = tl.where(m, 1.0, 0.0)
        if hv % (HV // H) == 0:
            tl.store(rk + tok * H + hk, b_r, mask=m)
        low = (r[:, None] > r[None, :]) & m[:, None]
        A = A * (b_r * b_beta)[:, None] * b_r[None, :] * _decay_mask(b_G, b_G, low)

        p_s = scratch + (c * HV + hv) * 4096
        if SOLVE_TOGETHER:
            b_T = _solve_together(p_s, A)
        else:
            b_T = _solve_by_blocks(p_s, A)

        # w = (T diag(beta exp2(G) r)) K, u = (T diag(beta)) V: T's columns scaled in fp32 and
        # rounded once (scaling K's and V's rows instead took the tiles through registers and
        # back to shared memory before each product, and rounded twice).
        b_Tk = (b_T * (b_r * b_beta * tl.exp2(b_G))[None, :]).to(dt)
        b_Tv = (b_T * b_beta[None, :]).to(dt)
        p_w = w + (tok * (HV * K) + hv * K)[:, None]
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mk = m[:, None] & (ck[None, :] < K)
            b_k = tl.load(p_k + ck[None, :], mask=mk, other=0.0)
            b_w = _mm(b_Tk, b_k, None, F32)
            tl.store(p_w + ck[None, :], b_w.to(dt), mask=mk)
        p_v = (tok * (HV * V) + hv * V)[:, None]
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            mv = m[:, None] & (cv[None, :] < V)
            b_v = tl.load(v + p_v + cv[None, :], mask=mv, other=0.0)
            b_u = _mm(b_Tv, b_v, None, F32)
            tl.store(u + p_v + cv[None, :], b_u.to(dt), mask=mv)
