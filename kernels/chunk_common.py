"""Triton helpers shared by the chunk prefill kernels (kernels/chunk_*.py)."""

import triton
import triton.language as tl

@triton.jit
def _mm(a, b, acc, F32: tl.constexpr):
    """tl.dot(a, b, acc); with F32 the (already rounded) operands are widened to fp32 first,
    which is exact, because the Triton interpreter multiplies bf16 operands wrongly."""
    if F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _chunk_rows(c, cu_seqlens, chunk_start, chunk_seq, N):
    """(valid, tok, m) for chunk c: whether it belongs to a sequence, its 64 token indices [64]
    int64, and which of them are inside the sequence."""
    n = tl.load(chunk_seq + c).to(tl.int64)
    valid = n < N
    n = tl.minimum(n, N - 1)
    eos = tl.load(cu_seqlens + n + 1)
    tok = tl.load(cu_seqlens + n) + (c - tl.load(chunk_start + n)) * 64 + tl.arange(0, 64)
    return valid, tok, tok < eos


@triton.jit
def _inv_row_norms(p, m, K: tl.constexpr, BK: tl.constexpr, EPS: tl.constexpr):
    """1 / ||row|| (with EPS under the root) of the 64 rows p[:, None] + [0, K) where m, in fp32 [64]:
    the l2norm of a chunk's q or k as a per-row scale. Its own loop, after the pipelined product
    loop that loads the same tiles (see kernels/chunk_output.py on why not inside it)."""
    ss = tl.zeros([64], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        x = tl.load(p + ck[None, :], mask=m[:, None] & (ck[None, :] < K), other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.rsqrt(ss + EPS)


@triton.jit
def _decay_mask(Gi, Gj, mask):
    """exp2(Gi - Gj) where mask, else 0; the exponent is forced to 0 where masked."""
    return tl.where(mask, tl.exp2(tl.where(mask, Gi[:, None] - Gj[None, :], 0.0)), 0.0)
