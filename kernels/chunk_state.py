"""Launch 2 of the chunk prefill: the only sequential pass. One program per (sequence, value head,
V block) walks the sequence's chunks with the fp32 state S [K, BV] in registers:

  h[c] = S (in the input dtype, for the output kernel);
  v_new = u - w S                                  -> v_new [T, HV, V];
  S <- exp2(G_last) S + K_hat^T (exp2(G_last - G) v_new).
K_hat^T x is computed as K^T (r x) with r = 1/||k|| from the WY kernel. The initial state comes
from state_pool[slot] (zeros where has_initial_state is False or the slot is < 0) and the final
state goes back there (not where the slot is < 0); the pool may be fp32 or bf16, the state is
carried in fp32 either way and rounded only when stored. With TWO_K (ChunkConfig.state_split) the
state is held as two [BK, BV] halves, rows [0, BK) and [BK, 2 BK).

With TMA (K and V split evenly into the tiles), w, k and u come in and h goes out through tensor
descriptors (the copy engine, issued by one thread) instead of per-thread address arithmetic and
copies: at one program (4 warps) per SM the loop is latency-bound, and issuing those copies and
the h store's layout change were over a third of its time (ncu, K = 256, pointer loads). The
descriptors read whole 64-token tiles, also past the sequence's end (other tokens of the batch,
or zeros past T); those rows of v_new are selected out before the update, so the results are the
pointer path's bits. h and v_new of a tail chunk are written only inside the sequence (the h tile
lies within its own chunk's [K, V] block).
"""

import triton
import triton.language as tl

from kernels.chunk_common import _mm


@triton.jit
def _state_kernel(
    k, w, u, G, rk, h, v_new, state_pool, slot_ids, has_initial_state, cu_seqlens, chunk_start,
    k_desc, w_desc, u_desc, h_desc,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, TWO_K: tl.constexpr, BV: tl.constexpr, F32: tl.constexpr, TMA: tl.constexpr,
):
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    n = pid // NV // HV
    hv = pid // NV % HV
    hk = hv // (HV // H)
    dt = w.dtype.element_ty
    bos = tl.load(cu_seqlens + n)
    eos = tl.load(cu_seqlens + n + 1)
    c0 = tl.load(chunk_start + n)
    slot = tl.load(slot_ids + n).to(tl.int64)

    r = tl.arange(0, 64)
    ck = tl.arange(0, BK)  # rows of the first half; the second half is ck + BK
    cv = i_v * BV + tl.arange(0, BV)
    m_s0 = (ck[:, None] < K) & (cv[None, :] < V)
    m_s1 = (ck[:, None] + BK < K) & (cv[None, :] < V)
    off_s = ck[:, None] * V + cv[None, :]  # [BK, BV] within one [K, V] state
    p_state = state_pool + tl.maximum(slot, 0) * (HV * K * V) + hv * (K * V) + off_s
    S0 = tl.zeros([BK, BV], dtype=tl.float32)
    S1 = tl.zeros([BK, BV], dtype=tl.float32)
    if (tl.load(has_initial_state + n) != 0) & (slot >= 0):
        S0 = tl.load(p_state, mask=m_s0, other=0.0).to(tl.float32)
        if TWO_K:
            S1 = tl.load(p_state + BK * V, mask=m_s1, other=0.0).to(tl.float32)

    for i_t in range(tl.cdiv(eos - bos, 64)):
        t0 = bos + i_t * 64
        tok = t0 + r
        m = tok < eos
        # Descriptor coordinates (int32): [token, column] of w, k, u; [row, column] of h [NC HV K, V].
        t0_32 = t0.to(tl.int32)
        h_row = (((c0 + i_t) * HV + hv) * K).to(tl.int32)
        v_col = (i_v * BV).to(tl.int32)
        w_col = (hv * K).to(tl.int32)
        k_col = (hk * K).to(tl.int32)
        p_h = h + ((c0 + i_t) * HV + hv) * (K * V) + off_s
        p_w = w + (tok * (HV * K) + hv * K)[:, None] + ck[None, :]
        if TMA:
            h_desc.store([h_row, v_col], S0.to(dt))
            b_w = w_desc.load([t0_32, w_col])
        else:
            tl.store(p_h, S0.to(dt), mask=m_s0)
            b_w = tl.load(p_w, mask=m[:, None] & (ck[None, :] < K), other=0.0)
        pred = _mm(b_w, S0.to(dt), None, F32)
        if TWO_K:
            if TMA:
                h_desc.store([h_row + BK, v_col], S1.to(dt))
                b_w = w_desc.load([t0_32, w_col + BK])
            else:
                tl.store(p_h + BK * V, S1.to(dt), mask=m_s1)
                b_w = tl.load(p_w + BK, mask=m[:, None] & (ck[None, :] + BK < K), other=0.0)
            pred = _mm(b_w, S1.to(dt), pred, F32)
        off_v = (tok * (HV * V) + hv * V)[:, None] + cv[None, :]
        m_v = m[:, None] & (cv[None, :] < V)
        if TMA:
            b_u = u_desc.load([t0_32, (hv * V).to(tl.int32) + v_col])
        else:
            b_u = tl.load(u + off_v, mask=m_v, other=0.0)
        b_v = b_u.to(tl.float32) - pred
        tl.store(v_new + off_v, b_v.to(dt), mask=m_v)

        G_last = tl.load(G + (tl.minimum(t0 + 64, eos) - 1) * HV + hv)
        b_G = tl.load(G + tok * HV + hv, mask=m, other=0.0)
        b_r = tl.load(rk + tok * H + hk, mask=m, other=0.0)
        to_end = tl.where(m, tl.exp2(tl.where(m, G_last - b_G, 0.0)) * b_r, 0.0)
        if TMA:  # rows past eos hold other tokens' u - w S: select them out (0 * inf is nan)
            b_v = tl.where(m[:, None], b_v * to_end[:, None], 0.0).to(dt)
        else:
            b_v = (b_v * to_end[:, None]).to(dt)
        decay = tl.exp2(G_last)
        p_kt = k + (tok * (H * K) + hk * K)[None, :] + ck[:, None]  # [BK, 64]
        if TMA:
            b_kt = tl.trans(k_desc.load([t0_32, k_col]))
        else:
            b_kt = tl.load(p_kt, mask=m[None, :] & (ck[:, None] < K), other=0.0)
        S0 = _mm(b_kt, b_v, S0 * decay, F32)
        if TWO_K:
            if TMA:
                b_kt = tl.trans(k_desc.load([t0_32, k_col + BK]))
            else:
                b_kt = tl.load(p_kt + BK, mask=m[None, :] & (ck[:, None] + BK < K), other=0.0)
            S1 = _mm(b_kt, b_v, S1 * decay, F32)

    if slot >= 0:
        sdt = state_pool.dtype.element_ty
        tl.store(p_state, S0.to(sdt), mask=m_s0)
        if TWO_K:
            tl.store(p_state + BK * V, S1.to(sdt), mask=m_s1)
