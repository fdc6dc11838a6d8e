"""Chunkwise gated delta rule prefill in Triton (GDN.md, "Chunkwise form"; chunk C = 64).

Packed varlen layout, as kernels/reference.py:
  q, k: [T, H, K]; v: [T, HV, V]; g (log decay, <= 0), beta: [T, HV]; cu_seqlens: [N + 1];
  state_pool: [S, HV, K, V] fp32, read and written in place at slot_ids [N].

Three launches, all over chunks that never cross a sequence boundary:
  1. _solve_kernel   (chunk, head): G = within-chunk cumsum of g; k_hat = l2norm(k);
                     A = strictly lower beta_i (k_i . k_j) exp(G_i - G_j); T = (I + A)^-1 by
                     forward substitution on the four 16x16 diagonal blocks, then block merges,
                     all in fp32.
  2. _intra_kernel   (chunk, head): w = T diag(beta exp(G)) K, u = T diag(beta) V, and the
                     state-free part of the output: q_dec = s Q exp(G), attn = s (Q K^T) exp(G_i -
                     G_j) on and below the diagonal.
  3. _state_kernel   (sequence, head, V block), sequential over the sequence's chunks, state in
                     fp32 registers: v_new = u - w S; o = q_dec S + attn v_new;
                     S <- exp(G_last) S + K^T (exp(G_last - G) v_new). Inference needs no
                     per-chunk states, so they are never written to memory; the output is
                     produced in the same pass and the final state goes straight back to its slot.
G is kept in log2 units (multiplied by log2 e) so every decay is one exp2, and every exponent that is
evaluated is <= 0: masked entries are replaced by 0 with tl.where before exp2 and selected out after.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 64  # C: tokens per chunk
SUB = 16  # diagonal block size of the triangular solve


@dataclass(frozen=True)
class StateConfig:
    """Launch shape of the sequential state kernel (the one that decides prefill speed)."""

    block_v: int  # columns of V per program; smaller gives more programs on few sequences
    num_warps: int = 4
    num_stages: int = 2


def pick_state_config(num_seqs: int, HV: int, K: int, V: int) -> StateConfig:
    """Enough programs to cover the SMs when there are few sequences, wide blocks otherwise.

    Seen on an H200 with Triton 3.6: num_stages=1 with block_v <= 32 and 4 warps compiles to a
    kernel that faults (out-of-range shared address in the dot), and K = 256 with two stages needs
    more shared memory than the SM has; K > 128 therefore runs block_v 64, 8 warps, one stage.
    """
    if K > 128:
        return StateConfig(block_v=64, num_warps=8, num_stages=1)
    BV = min(64, triton.next_power_of_2(V))
    while BV > 16 and num_seqs * HV * triton.cdiv(V, BV) < 256:
        BV //= 2
    return StateConfig(block_v=BV, num_warps=4, num_stages=2)


@dataclass(frozen=True)
class ChunkPlan:
    """Where the chunks of a packed batch are; build once per batch, reuse for every layer.

    Chunk c belongs to sequence chunk_seq[c] (N for the unused tail) and is its chunk number
    c - chunk_start[chunk_seq[c]]. Built on the device with no host synchronisation, sized by the
    bound sum(ceil(len / C)) <= T // C + N.
    """

    cu_seqlens: Tensor  # int64 [N + 1]
    chunk_start: Tensor  # int64 [N + 1], first chunk of each sequence
    chunk_seq: Tensor  # int32 [T // C + N]
    num_tokens: int  # T


def plan_chunks(cu_seqlens: Tensor, num_tokens: int) -> ChunkPlan:
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    num_chunks = (cu[1:] - cu[:-1] + CHUNK - 1) // CHUNK  # [N]
    chunk_start = torch.zeros(N + 1, dtype=torch.int64, device=cu.device)
    torch.cumsum(num_chunks, 0, out=chunk_start[1:])
    NC = num_tokens // CHUNK + N
    ids = torch.arange(NC, device=cu.device)
    chunk_seq = torch.searchsorted(chunk_start[1:], ids, right=True).to(torch.int32)
    return ChunkPlan(cu, chunk_start, chunk_seq, num_tokens)


def chunk_gated_delta_rule_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    state_pool: Tensor,
    slot_ids: Tensor,
    has_initial_state: Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    config: StateConfig | None = None,
    plan: ChunkPlan | None = None,
) -> Tensor:
    """Prefill N packed sequences; returns o [T, HV, V] in v.dtype.

    q, k: [T, H, K]; v: [T, HV, V]; g (fp32 log decay), beta: [T, HV]; cu_seqlens: int [N + 1] on
    the device; state_pool: [S, HV, K, V] fp32; slot_ids: int [N]; has_initial_state: bool [N].
    Sequence i starts from state_pool[slot_ids[i]] (zeros where has_initial_state[i] is False) and
    its final state is written back there. Slots must be distinct; other slots are not touched.
    No host synchronisation. plan (from plan_chunks(cu_seqlens, T)) may be passed to reuse the
    chunk table across layers; config overrides the state kernel's launch shape.
    """
    T, H, K = q.shape
    HV, V = v.shape[1:]
    N = cu_seqlens.numel() - 1
    assert k.shape == q.shape and v.shape[0] == T and HV % H == 0, (q.shape, k.shape, v.shape)
    assert g.shape == beta.shape == (T, HV), (g.shape, beta.shape)
    assert K <= 256 and state_pool.shape[1:] == (HV, K, V), state_pool.shape
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous()
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    dev = q.device
    BK = max(16, triton.next_power_of_2(K))

    plan = plan or plan_chunks(cu_seqlens.to(dev), T)
    assert plan.num_tokens == T and plan.cu_seqlens.numel() == N + 1
    cu, chunk_start, chunk_seq = plan.cu_seqlens, plan.chunk_start, plan.chunk_seq
    NC = chunk_seq.numel()

    G = torch.empty(T, HV, dtype=torch.float32, device=dev)  # within-chunk cumsum of g * log2 e
    Tinv = torch.empty(T, HV, CHUNK, dtype=torch.float32, device=dev)  # rows of (I + A)^-1
    k_hat = torch.empty(T, H, K, dtype=dtype, device=dev)
    # On the CPU the kernels run on the Triton interpreter, whose bf16 dot is wrong: widen first.
    f32 = q.device.type == "cpu"
    common = dict(H=H, HV=HV, K=K, BK=BK, USE_L2=use_qk_l2norm, EPS=1e-6, F32=f32)
    _solve_kernel[(NC, HV)](
        k, g, beta, G, Tinv, k_hat, cu, chunk_start, chunk_seq, N, **common, num_warps=4
    )

    w = torch.empty(T, HV, K, dtype=dtype, device=dev)
    u = torch.empty(T, HV, V, dtype=dtype, device=dev)
    q_dec = torch.empty(T, HV, K, dtype=dtype, device=dev)
    attn = torch.empty(T, HV, CHUNK, dtype=dtype, device=dev)
    _intra_kernel[(NC, HV)](
        q, v, beta, G, Tinv, k_hat, w, u, q_dec, attn, cu, chunk_start, chunk_seq, N, scale,
        V=V, BV=min(64, max(16, triton.next_power_of_2(V))), **common,
        num_warps=8 if K > 128 else 4,
    )

    cfg = config or pick_state_config(N, HV, K, V)
    o = torch.empty(T, HV, V, dtype=dtype, device=dev)
    grid = (triton.cdiv(V, cfg.block_v), N * HV)
    _state_kernel[grid](
        w, u, q_dec, attn, k_hat, G, o, state_pool, slot_ids, has_initial_state, cu,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=cfg.block_v, F32=f32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o


@triton.jit
def _mm(a, b, acc, F32: tl.constexpr):
    """tl.dot(a, b, acc); with F32 the (already rounded) operands are widened to fp32 first,
    which is exact, because the Triton interpreter multiplies bf16 operands wrongly."""
    if F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _chunk_bounds(c, cu_seqlens, chunk_start, chunk_seq, N):
    """(valid, first token of chunk c, end of its sequence), all int64."""
    n = tl.load(chunk_seq + c).to(tl.int64)
    valid = n < N
    n = tl.minimum(n, N - 1)
    eos = tl.load(cu_seqlens + n + 1)
    t0 = tl.load(cu_seqlens + n) + (c - tl.load(chunk_start + n)) * 64
    return valid, t0, eos


@triton.jit
def _load_unit_rows(p, rows, m, cols, K: tl.constexpr, USE_L2: tl.constexpr, EPS):
    """Rows [len(rows), BK] of a [*, K] block at p, l2-normalised in fp32 if USE_L2."""
    x = tl.load(p + rows[:, None] + cols[None, :], mask=m[:, None] & (cols[None, :] < K), other=0.0)
    x = x.to(tl.float32)
    if USE_L2:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) + EPS)[:, None]
    return x


@triton.jit
def _decay_mask(Gi, Gj, mask):
    """exp2(Gi - Gj) where mask, else 0; the exponent is forced to 0 where masked."""
    return tl.where(mask, tl.exp2(tl.where(mask, Gi[:, None] - Gj[None, :], 0.0)), 0.0)


@triton.jit
def _inv_unit_lower(A, BC: tl.constexpr):
    """(I + A)^-1 for a strictly lower [BC, BC] block, row by row (forward substitution)."""
    r = tl.arange(0, BC)
    X = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in tl.static_range(1, BC):
        a_i = tl.sum(tl.where(r[:, None] == i, A, 0.0), axis=0)  # A[i, :]
        x_i = tl.sum(a_i[:, None] * X, axis=0)  # sum_j A[i, j] X[j, :], only j < i nonzero
        X = tl.where(r[:, None] == i, X - x_i[None, :], X)
    return X


@triton.jit
def _solve_kernel(
    k, g, beta, G, Tinv, k_hat, cu_seqlens, chunk_start, chunk_seq, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    USE_L2: tl.constexpr, EPS: tl.constexpr, F32: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1).to(tl.int64)
    valid, t0, eos = _chunk_bounds(c, cu_seqlens, chunk_start, chunk_seq, N)
    if valid:
        hk = hv // (HV // H)
        writes_k = (hv % (HV // H)) == 0  # one value head per key head stores k_hat
        r = tl.arange(0, 16)
        cols = tl.arange(0, BK)

        # Four 16-token sub-blocks: tokens, masks, G (running sum carried across), beta, k_hat.
        tok0 = t0 + r
        tok1 = tok0 + 16
        tok2 = tok0 + 32
        tok3 = tok0 + 48
        m0 = tok0 < eos
        m1 = tok1 < eos
        m2 = tok2 < eos
        m3 = tok3 < eos
        g0 = tl.load(g + tok0 * HV + hv, mask=m0, other=0.0).to(tl.float32) * 1.4426950408889634
        g1 = tl.load(g + tok1 * HV + hv, mask=m1, other=0.0).to(tl.float32) * 1.4426950408889634
        g2 = tl.load(g + tok2 * HV + hv, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
        g3 = tl.load(g + tok3 * HV + hv, mask=m3, other=0.0).to(tl.float32) * 1.4426950408889634
        G0 = tl.cumsum(g0, axis=0)
        G1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
        G2 = tl.cumsum(g2, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0)
        G3 = tl.cumsum(g3, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.sum(g2, axis=0)
        tl.store(G + tok0 * HV + hv, G0, mask=m0)
        tl.store(G + tok1 * HV + hv, G1, mask=m1)
        tl.store(G + tok2 * HV + hv, G2, mask=m2)
        tl.store(G + tok3 * HV + hv, G3, mask=m3)
        b0 = tl.load(beta + tok0 * HV + hv, mask=m0, other=0.0).to(tl.float32)
        b1 = tl.load(beta + tok1 * HV + hv, mask=m1, other=0.0).to(tl.float32)
        b2 = tl.load(beta + tok2 * HV + hv, mask=m2, other=0.0).to(tl.float32)
        b3 = tl.load(beta + tok3 * HV + hv, mask=m3, other=0.0).to(tl.float32)

        dt = k_hat.dtype.element_ty
        pk = k + hk * K
        k0 = _load_unit_rows(pk, tok0 * (H * K), m0, cols, K, USE_L2, EPS).to(dt)
        k1 = _load_unit_rows(pk, tok1 * (H * K), m1, cols, K, USE_L2, EPS).to(dt)
        k2 = _load_unit_rows(pk, tok2 * (H * K), m2, cols, K, USE_L2, EPS).to(dt)
        k3 = _load_unit_rows(pk, tok3 * (H * K), m3, cols, K, USE_L2, EPS).to(dt)
        if writes_k:
            pkh = k_hat + hk * K + cols[None, :]
            mk = cols[None, :] < K
            tl.store(pkh + (tok0 * (H * K))[:, None], k0, mask=m0[:, None] & mk)
            tl.store(pkh + (tok1 * (H * K))[:, None], k1, mask=m1[:, None] & mk)
            tl.store(pkh + (tok2 * (H * K))[:, None], k2, mask=m2[:, None] & mk)
            tl.store(pkh + (tok3 * (H * K))[:, None], k3, mask=m3[:, None] & mk)

        # A blocks: beta_i (k_i . k_j) exp2(G_i - G_j), strictly lower.
        low = r[:, None] > r[None, :]
        A00 = _mm(k0, tl.trans(k0), None, F32) * b0[:, None] * _decay_mask(G0, G0, low & m0[:, None])
        A11 = _mm(k1, tl.trans(k1), None, F32) * b1[:, None] * _decay_mask(G1, G1, low & m1[:, None])
        A22 = _mm(k2, tl.trans(k2), None, F32) * b2[:, None] * _decay_mask(G2, G2, low & m2[:, None])
        A33 = _mm(k3, tl.trans(k3), None, F32) * b3[:, None] * _decay_mask(G3, G3, low & m3[:, None])
        A10 = _mm(k1, tl.trans(k0), None, F32) * b1[:, None] * _decay_mask(G1, G0, m1[:, None] & m0[None, :])
        A20 = _mm(k2, tl.trans(k0), None, F32) * b2[:, None] * _decay_mask(G2, G0, m2[:, None] & m0[None, :])
        A21 = _mm(k2, tl.trans(k1), None, F32) * b2[:, None] * _decay_mask(G2, G1, m2[:, None] & m1[None, :])
        A30 = _mm(k3, tl.trans(k0), None, F32) * b3[:, None] * _decay_mask(G3, G0, m3[:, None] & m0[None, :])
        A31 = _mm(k3, tl.trans(k1), None, F32) * b3[:, None] * _decay_mask(G3, G1, m3[:, None] & m1[None, :])
        A32 = _mm(k3, tl.trans(k2), None, F32) * b3[:, None] * _decay_mask(G3, G2, m3[:, None] & m2[None, :])

        # T = (I + A)^-1, block lower triangular: X_ii = (I + A_ii)^-1 and, for i > j,
        # X_ij = -X_ii sum_{j <= l < i} A_il X_lj.
        X00 = _inv_unit_lower(A00, 16)
        X11 = _inv_unit_lower(A11, 16)
        X22 = _inv_unit_lower(A22, 16)
        X33 = _inv_unit_lower(A33, 16)
        X10 = -tl.dot(X11, tl.dot(A10, X00, input_precision="ieee"), input_precision="ieee")
        X21 = -tl.dot(X22, tl.dot(A21, X11, input_precision="ieee"), input_precision="ieee")
        X32 = -tl.dot(X33, tl.dot(A32, X22, input_precision="ieee"), input_precision="ieee")
        S20 = tl.dot(A20, X00, input_precision="ieee")
        S20 = tl.dot(A21, X10, S20, input_precision="ieee")
        X20 = -tl.dot(X22, S20, input_precision="ieee")
        S31 = tl.dot(A31, X11, input_precision="ieee")
        S31 = tl.dot(A32, X21, S31, input_precision="ieee")
        X31 = -tl.dot(X33, S31, input_precision="ieee")
        S30 = tl.dot(A30, X00, input_precision="ieee")
        S30 = tl.dot(A31, X10, S30, input_precision="ieee")
        S30 = tl.dot(A32, X20, S30, input_precision="ieee")
        X30 = -tl.dot(X33, S30, input_precision="ieee")

        # Row tok of Tinv holds T[i, :] for the chunk; blocks above the diagonal are never
        # stored (the reader masks them).
        pt = Tinv + hv * 64 + r[None, :]
        p0 = pt + (tok0 * (HV * 64))[:, None]
        p1 = pt + (tok1 * (HV * 64))[:, None]
        p2 = pt + (tok2 * (HV * 64))[:, None]
        p3 = pt + (tok3 * (HV * 64))[:, None]
        tl.store(p0, X00, mask=m0[:, None])
        tl.store(p1, X10, mask=m1[:, None])
        tl.store(p1 + 16, X11, mask=m1[:, None])
        tl.store(p2, X20, mask=m2[:, None])
        tl.store(p2 + 16, X21, mask=m2[:, None])
        tl.store(p2 + 32, X22, mask=m2[:, None])
        tl.store(p3, X30, mask=m3[:, None])
        tl.store(p3 + 16, X31, mask=m3[:, None])
        tl.store(p3 + 32, X32, mask=m3[:, None])
        tl.store(p3 + 48, X33, mask=m3[:, None])


@triton.jit
def _intra_kernel(
    q, v, beta, G, Tinv, k_hat, w, u, q_dec, attn, cu_seqlens, chunk_start, chunk_seq, N, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, EPS: tl.constexpr,
    F32: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1).to(tl.int64)
    valid, t0, eos = _chunk_bounds(c, cu_seqlens, chunk_start, chunk_seq, N)
    if valid:
        hk = hv // (HV // H)
        r = tl.arange(0, 64)
        cols = tl.arange(0, BK)
        tok = t0 + r
        m = tok < eos
        mk = m[:, None] & (cols[None, :] < K)
        dt = w.dtype.element_ty

        b_G = tl.load(G + tok * HV + hv, mask=m, other=0.0)
        b_beta = tl.load(beta + tok * HV + hv, mask=m, other=0.0).to(tl.float32)
        b_T = tl.load(
            Tinv + (tok * (HV * 64) + hv * 64)[:, None] + r[None, :],
            mask=m[:, None] & (r[None, :] <= r[:, None]), other=0.0,
        )  # [64, 64] fp32, lower triangular
        b_k = tl.load(k_hat + (tok * (H * K) + hk * K)[:, None] + cols[None, :], mask=mk, other=0.0)

        # w = T diag(beta exp(G)) K, u = T diag(beta) V (fp32 operands).
        kb = b_k.to(tl.float32) * (b_beta * tl.exp2(b_G))[:, None]
        b_w = tl.dot(b_T, kb)  # fp32 operands (tf32 on the GPU)
        tl.store(w + (tok * (HV * K) + hv * K)[:, None] + cols[None, :], b_w.to(dt), mask=mk)
        for i_v in range(tl.cdiv(V, BV)):
            cv = i_v * BV + tl.arange(0, BV)
            mv = m[:, None] & (cv[None, :] < V)
            off = (tok * (HV * V) + hv * V)[:, None] + cv[None, :]
            b_v = tl.load(v + off, mask=mv, other=0.0).to(tl.float32) * b_beta[:, None]
            tl.store(u + off, tl.dot(b_T, b_v).to(dt), mask=mv)

        # The state-free part of the output, scale folded in.
        b_q = _load_unit_rows(q + hk * K, tok * (H * K), m, cols, K, USE_L2, EPS)
        qk = _mm(b_q.to(dt), tl.trans(b_k), None, F32)
        causal = (r[:, None] >= r[None, :]) & m[:, None]
        b_attn = qk * _decay_mask(b_G, b_G, causal) * scale
        tl.store(attn + (tok * (HV * 64) + hv * 64)[:, None] + r[None, :], b_attn.to(dt),
                 mask=m[:, None])
        b_qd = b_q * (tl.exp2(b_G) * scale)[:, None]
        tl.store(q_dec + (tok * (HV * K) + hv * K)[:, None] + cols[None, :], b_qd.to(dt), mask=mk)


@triton.jit
def _state_kernel(
    w, u, q_dec, attn, k_hat, G, o, state_pool, slot_ids, has_initial_state, cu_seqlens,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, F32: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_nh = tl.program_id(1).to(tl.int64)
    n = i_nh // HV
    hv = i_nh % HV
    hk = hv // (HV // H)
    bos = tl.load(cu_seqlens + n)
    eos = tl.load(cu_seqlens + n + 1)
    r = tl.arange(0, 64)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mck = ck < K
    mcv = cv < V
    dt = w.dtype.element_ty

    slot = tl.load(slot_ids + n).to(tl.int64)
    p_state = state_pool + slot * (HV * K * V) + hv * (K * V) + ck[:, None] * V + cv[None, :]
    m_state = mck[:, None] & mcv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if tl.load(has_initial_state + n) != 0:
        S = tl.load(p_state, mask=m_state, other=0.0)

    for i_t in range(tl.cdiv(eos - bos, 64)):
        t0 = bos + i_t * 64
        tok = t0 + r
        m = tok < eos
        mk = m[:, None] & mck[None, :]
        mv = m[:, None] & mcv[None, :]
        off_k = (tok * (HV * K) + hv * K)[:, None] + ck[None, :]
        off_v = (tok * (HV * V) + hv * V)[:, None] + cv[None, :]
        b_w = tl.load(w + off_k, mask=mk, other=0.0)
        b_qd = tl.load(q_dec + off_k, mask=mk, other=0.0)
        b_u = tl.load(u + off_v, mask=mv, other=0.0).to(tl.float32)
        b_attn = tl.load(attn + (tok * (HV * 64) + hv * 64)[:, None] + r[None, :],
                         mask=m[:, None], other=0.0)
        b_kt = tl.load(k_hat + (tok * (H * K) + hk * K)[None, :] + ck[:, None],
                       mask=m[None, :] & mck[:, None], other=0.0)  # [BK, 64]
        b_G = tl.load(G + tok * HV + hv, mask=m, other=0.0)
        G_last = tl.load(G + (tl.minimum(t0 + 64, eos) - 1) * HV + hv)

        S_in = S.to(dt)
        v_new = b_u - _mm(b_w, S_in, None, F32)  # [64, BV] fp32
        b_o = _mm(b_qd, S_in, None, F32)
        b_o = _mm(b_attn, v_new.to(dt), b_o, F32)
        tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=mv)

        to_end = tl.where(m, tl.exp2(tl.where(m, G_last - b_G, 0.0)), 0.0)
        S = S * tl.exp2(G_last)
        S = _mm(b_kt, (v_new * to_end[:, None]).to(dt), S, F32)

    tl.store(p_state, S, mask=m_state)
