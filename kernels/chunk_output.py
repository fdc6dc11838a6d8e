"""Launch 3 of the chunk prefill: the output, fully parallel, one program per (chunk, V block,
value head), from the chunk's entering state h[c] and v_new of the state kernel:

  o = s r_q * [ exp2(G) (Q h[c]) + (Q K^T diag(r_k) * exp2(G_i - G_j), j <= i) v_new ]
with raw q, k and the l2norm applied as the row scales r_q = 1/||q||, r_k = 1/||k||.

The K loop holds only the two products, and q's norm is summed in a second loop after it. With
q's tile also read by register code inside the software-pipelined loop, Triton 3.6 gave that tile
one shared-memory buffer fewer than the asynchronous wgmma reading it needs (num_stages - 1, as
for a load with no dot user), so the copy of the next K block overwrote q while the products of
this one still read it: with num_stages >= 2 the output changed from run to run on an H200 (seen
in the TTGIR: q in a 1 x 64 x 64 buffer at 2 stages, k and h in 2; wgmma wait with 2 pending).
"""

import triton
import triton.language as tl

from kernels.chunk_common import _chunk_rows, _decay_mask, _inv_row_norms, _mm


@triton.jit(do_not_specialize=["N"])  # see kernels/chunk_wy.py
def _output_kernel(
    q, k, G, rk, h, v_new, o, cu_seqlens, chunk_start, chunk_seq, N, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, EPS: tl.constexpr,
    F32: tl.constexpr,
):
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0).to(tl.int64)
    c = pid // NV
    i_v = pid % NV
    hv = tl.program_id(1).to(tl.int64)
    valid, tok, m = _chunk_rows(c, cu_seqlens, chunk_start, chunk_seq, N)
    if valid:
        hk = hv // (HV // H)
        dt = v_new.dtype.element_ty
        r = tl.arange(0, 64)
        cv = i_v * BV + tl.arange(0, BV)
        p_q = q + (tok * (H * K) + hk * K)[:, None]
        p_k = k + (tok * (H * K) + hk * K)[:, None]
        p_h = h + (c * HV + hv) * (K * V) + cv[None, :]
        acc_o = tl.zeros([64, BV], dtype=tl.float32)
        acc_a = tl.zeros([64, 64], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            mk = m[:, None] & (ck[None, :] < K)
            b_q = tl.load(p_q + ck[None, :], mask=mk, other=0.0)
            b_k = tl.load(p_k + ck[None, :], mask=mk, other=0.0)
            b_h = tl.load(p_h + ck[:, None] * V, mask=(ck[:, None] < K) & (cv[None, :] < V),
                          other=0.0)
            acc_o = _mm(b_q, b_h, acc_o, F32)
            acc_a = _mm(b_q, tl.trans(b_k), acc_a, F32)
        if USE_L2:  # q's tiles again (from L1/L2), outside the pipelined loop: see the docstring
            r_q = _inv_row_norms(p_q, m, K, BK, EPS) * scale
        else:
            r_q = tl.zeros([64], dtype=tl.float32) + scale

        b_G = tl.load(G + tok * HV + hv, mask=m, other=0.0)
        b_rk = tl.load(rk + tok * H + hk, mask=m, other=0.0)
        causal = (r[:, None] >= r[None, :]) & m[:, None]
        attn = acc_a * b_rk[None, :] * _decay_mask(b_G, b_G, causal)
        off_v = (tok * (HV * V) + hv * V)[:, None] + cv[None, :]
        m_v = m[:, None] & (cv[None, :] < V)
        b_vn = tl.load(v_new + off_v, mask=m_v, other=0.0)
        b_o = acc_o * tl.exp2(b_G)[:, None]
        b_o = _mm(attn.to(dt), b_vn, b_o, F32)
        tl.store(o + off_v, (b_o * r_q[:, None]).to(o.dtype.element_ty), mask=m_v)
