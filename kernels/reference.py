"""Gated DeltaNet ops in plain PyTorch: the ground truth every fast kernel is tested against, and
the CPU path. The math is in GDN.md. Names follow flash-linear-attention; the layout is its
variable-length one without the leading batch dim of 1.

Layout shared by the delta-rule ops (packed variable-length batches, no batch dimension):
  q, k:  [T, H, K]      T = total tokens of N sequences laid end to end
  v:     [T, HV, V]     HV = r * H; value head h reads key head h // r (as repeat_interleave)
  g:     [T, HV]        log decay, <= 0
  beta:  [T, HV]        write strength, in (0, 1)
  state: [N, HV, K, V]  fp32, one per sequence
  cu_seqlens: int64 [N + 1], cu_seqlens[0] = 0, cu_seqlens[-1] = T, every length >= 1;
              None means one sequence (N = 1).
All math is fp32 whatever the input dtype; outputs come back in the input dtype, recurrent
states in fp32. Inputs are never modified, except the conv state that causal_conv1d_update
advances in place by design.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim; fp32 result for any input dtype."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gates(a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Log decay and write strength from the raw projections.

    a, b: [T, HV] (any float dtype); A_log, dt_bias: [HV].
    Returns g = -exp(A_log) * softplus(a + dt_bias) (<= 0) and beta = sigmoid(b), fp32 [T, HV].
    """
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    beta = torch.sigmoid(b.float())
    return g, beta


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule one token at a time, in fp32: the ground truth.

    q, k: [T, H, K]; v: [T, HV, V]; g, beta: [T, HV]; initial_state: [N, HV, K, V] or None (zeros).
    scale (default K ** -0.5) multiplies q. Per token, for each head's [K, V] state S:
        S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = scale * S^T q
    Returns o: [T, HV, V] in v.dtype and final_state: [N, HV, K, V] fp32 (a new tensor).
    """
    T, HV, V = v.shape
    out_dtype = v.dtype
    bounds = _sequence_bounds(cu_seqlens, T)
    q, k, v, g, beta = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    state = _initial_state(initial_state, len(bounds), HV, q.shape[-1], V, q.device)

    o = torch.empty(T, HV, V, dtype=torch.float32, device=q.device)
    for n, (bos, eos) in enumerate(bounds):
        S = state[n]  # [HV, K, V]
        for t in range(bos, eos):
            S = S * g[t].exp()[:, None, None]
            pred = (S * k[t][:, :, None]).sum(1)  # S^T k: [HV, V]
            delta = beta[t][:, None] * (v[t] - pred)
            S = S + k[t][:, :, None] * delta[:, None, :]
            o[t] = (S * q[t][:, :, None]).sum(1)
        state[n] = S
    return o.to(out_dtype), state


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule chunk by chunk (WY / UT-transform form, GDN.md): the CPU prefill path.

    Same arguments, results and semantics as recurrent_gated_delta_rule. Each sequence is cut into
    chunks of chunk_size tokens (the last one shorter); everything inside a chunk is computed for
    all chunks and heads at once, and only the state hand-off between chunks loops, over the
    chunk position within a sequence, all sequences together.
    """
    T, HV, V = v.shape
    K = q.shape[-1]
    out_dtype = v.dtype
    bounds = _sequence_bounds(cu_seqlens, T)
    q, k, v, g, beta = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    state = _initial_state(initial_state, len(bounds), HV, K, V, q.device)
    plan = _plan_chunks(bounds, chunk_size, q.device)

    # [NC, HV, C, ...]; positions past a sequence's end hold zeros (g = 0, beta = 0, k = 0), so
    # they neither decay nor write the state.
    q, k, v, g, beta = (_gather_chunks(x, plan.token) for x in (q, k, v, g, beta))
    intra = _intra_chunk(q, k, v, g, beta)

    # Chunk j of every sequence that has one is a contiguous run of plan.num_active[j] chunks,
    # and those sequences are the first num_active[j] of the state reordered by plan.order.
    state = state[plan.order]  # [N, HV, K, V]
    o = torch.empty_like(intra.u)  # [NC, HV, C, V]
    begin = 0
    for n in plan.num_active:
        ids = slice(begin, begin + n)
        begin += n
        S = state[:n]  # the state entering these chunks
        v_new = intra.u[ids] - intra.w[ids] @ S  # [n, HV, C, V]
        o[ids] = intra.q_decayed[ids] @ S + intra.attn[ids] @ v_new
        # A new tensor rather than an in-place update, so autograd can differentiate through the
        # hand-off (engine/default_model trains with this function); the state is small.
        S = S * intra.decay_all[ids] + intra.k_to_end[ids].transpose(-1, -2) @ v_new
        state = torch.cat([S, state[n:]]) if n < state.shape[0] else S
    final_state = torch.empty_like(state)
    final_state[plan.order] = state

    o_tokens = torch.empty(T, HV, V, dtype=o.dtype, device=o.device)  # back to stream order
    o_tokens[plan.token[plan.valid]] = o.transpose(1, 2)[plan.valid]
    return o_tokens.to(out_dtype), final_state


class _Intra(NamedTuple):
    """Per-chunk quantities that do not depend on the incoming state. All [NC, HV, ...]."""

    w: Tensor  # [C, K]  (I + A)^-1 diag(beta exp(G)) K: how the incoming state shifts each write
    u: Tensor  # [C, V]  (I + A)^-1 diag(beta) V: the writes if the incoming state were zero
    attn: Tensor  # [C, C]  (Q K^T) * exp(G_i - G_j) for j <= i, else 0
    q_decayed: Tensor  # [C, K]  Q * exp(G)
    k_to_end: Tensor  # [C, K]  K * exp(G_last - G)
    decay_all: Tensor  # [1, 1]  exp(G_last): the decay across the whole chunk


def _intra_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> _Intra:
    """q, k: [NC, HV, C, K] (q already scaled); v: [NC, HV, C, V]; g, beta: [NC, HV, C]."""
    C = q.shape[-2]
    G = g.cumsum(-1)  # restarts every chunk, so every exponent below is <= 0
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(G_i - G_j) for j <= i, else 0: [NC, HV, C, C]. Select -inf above the
    # diagonal before exp, where G_i - G_j > 0 could overflow to inf (and inf * 0 is nan).
    decay = torch.where(causal, G[..., :, None] - G[..., None, :], -torch.inf).exp()

    # Solve (I + A) X = rhs, A[i, j] = beta_i (k_i . k_j) exp(G_i - G_j) for i > j, by forward
    # substitution: X = (I + A)^-1 rhs without forming the inverse.
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rhs = torch.cat([k * (beta * G.exp())[..., None], v * beta[..., None]], dim=-1)
    wu = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    w, u = wu.split([k.shape[-1], v.shape[-1]], dim=-1)

    G_last = G[..., -1:]  # [NC, HV, 1]; padding has g = 0, so this is G at the last real token
    return _Intra(
        w=w,
        u=u,
        attn=(q @ k.transpose(-1, -2)) * decay,
        q_decayed=q * G.exp()[..., None],
        k_to_end=k * (G_last - G).exp()[..., None],
        decay_all=G_last.exp()[..., None],
    )


class _ChunkPlan(NamedTuple):
    token: Tensor  # [NC, C] int64 token index of each chunk position; T where past the end
    valid: Tensor  # [NC, C] bool, position holds a real token
    order: Tensor  # [N] sequences by decreasing number of chunks
    num_active: list[int]  # per chunk position j: how many sequences have a chunk j


def _plan_chunks(bounds: list[tuple[int, int]], chunk_size: int, device) -> _ChunkPlan:
    """Cut sequences into chunks in hand-off order: every sequence's first chunk, then every
    second chunk, and so on; within each run, sequences by decreasing chunk count."""
    num_chunks = [-(-(eos - bos) // chunk_size) for bos, eos in bounds]
    order = sorted(range(len(bounds)), key=lambda n: -num_chunks[n])
    starts, lengths, num_active = [], [], []
    for j in range(num_chunks[order[0]]):
        active = [n for n in order if num_chunks[n] > j]
        for n in active:
            bos, eos = bounds[n]
            starts.append(bos + j * chunk_size)
            lengths.append(min(chunk_size, eos - starts[-1]))
        num_active.append(len(active))

    offsets = torch.arange(chunk_size, device=device)
    valid = offsets < torch.tensor(lengths, device=device)[:, None]
    T = bounds[-1][1]
    token = torch.where(valid, torch.tensor(starts, device=device)[:, None] + offsets, T)
    return _ChunkPlan(token, valid, torch.tensor(order, device=device), num_active)


def _gather_chunks(x: Tensor, token: Tensor) -> Tensor:
    """x: [T, HV, ...] -> [NC, HV, C, ...], with zeros where token == T (past a sequence's end)."""
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return x[token].transpose(1, 2).contiguous()


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv along time, per sequence of a packed batch (the prefill path).

    x: [T, D]; weight: [D, W]; bias: [D] or None; cu_seqlens as for the delta rule;
    initial_state: [N, D, W-1], the last W-1 inputs before each sequence (None = zeros);
    activation: "silu" or None. y[t] = act(bias + sum_i weight[:, i] * x[t - (W-1) + i]), with
    inputs before a sequence's start taken from its initial state. Computed in fp32.
    Returns y: [T, D] and final_state: [N, D, W-1], the last W-1 inputs of past + this sequence,
    both in x.dtype.
    """
    T, D = x.shape
    W = weight.shape[1]
    assert weight.shape == (D, W), f"weight {tuple(weight.shape)} for {D} channels"
    bounds = _sequence_bounds(cu_seqlens, T)
    N = len(bounds)
    if initial_state is None:
        initial_state = x.new_zeros(N, D, W - 1)
    assert initial_state.shape == (N, D, W - 1), f"initial_state {tuple(initial_state.shape)}"

    # One stream where each sequence is preceded by its W-1 past inputs: [T + N*(W-1), D].
    pieces = []
    for n, (bos, eos) in enumerate(bounds):
        pieces += [initial_state[n].t().float(), x[bos:eos].float()]
    stream = torch.cat(pieces)
    lengths = torch.tensor([eos - bos for bos, eos in bounds], device=x.device)
    seq_of_token = torch.repeat_interleave(torch.arange(N, device=x.device), lengths)
    pos = torch.arange(T, device=x.device) + (W - 1) * (seq_of_token + 1)  # of token t in stream

    y = sum(weight[:, i].float() * stream[pos - (W - 1) + i] for i in range(W))
    y = _bias_and_activation(y, bias, activation)

    ends = torch.tensor([eos for _, eos in bounds], device=x.device)
    ends = ends + (W - 1) * torch.arange(1, N + 1, device=x.device)
    last = ends[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
    final_state = stream[last].transpose(1, 2)  # [N, D, W-1]
    return y.to(x.dtype), final_state.to(x.dtype)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """One new token per sequence (the decode path).

    x: [N, D]; conv_state: [N, D, W-1], the last W-1 inputs, advanced IN PLACE (shift left,
    append x); weight: [D, W]; bias: [D] or None. Returns y: [N, D] in x.dtype.
    """
    window = torch.cat([conv_state.float(), x.float()[:, :, None]], dim=-1)  # [N, D, W]
    y = (window * weight.float()).sum(-1)
    conv_state.copy_(window[:, :, 1:])
    return _bias_and_activation(y, bias, activation).to(x.dtype)


def _bias_and_activation(y: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    assert activation in ("silu", None), f"unknown activation {activation!r}"
    if bias is not None:
        y = y + bias.float()
    return F.silu(y) if activation == "silu" else y


def _sequence_bounds(cu_seqlens: Tensor | None, T: int) -> list[tuple[int, int]]:
    """[(bos, eos)] per sequence from cu_seqlens (int64 [N + 1]); None means one sequence."""
    if cu_seqlens is None:
        assert T >= 1, "empty input"
        return [(0, T)]
    cu = cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == T, f"cu_seqlens {cu} does not span {T} tokens"
    bounds = list(zip(cu[:-1], cu[1:]))
    assert all(eos > bos for bos, eos in bounds), f"cu_seqlens {cu} has an empty sequence"
    return bounds


def _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm):
    """fp32 copies, q and k normalised and expanded to the HV value heads, q scaled."""
    T, H, K = q.shape
    HV = v.shape[1]
    assert k.shape == q.shape and v.shape[0] == T, f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert g.shape == beta.shape == (T, HV), f"g {g.shape}, beta {beta.shape}, v {v.shape}"
    assert HV % H == 0, f"{HV} value heads cannot share {H} key heads"
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = K**-0.5 if scale is None else scale
    q = q.float().repeat_interleave(HV // H, dim=1) * scale
    k = k.float().repeat_interleave(HV // H, dim=1)
    return q, k, v.float(), g.float(), beta.float()


def _initial_state(initial_state, N, HV, K, V, device) -> Tensor:
    """A fresh fp32 [N, HV, K, V] state: a copy of initial_state, or zeros."""
    if initial_state is None:
        return torch.zeros(N, HV, K, V, dtype=torch.float32, device=device)
    assert initial_state.shape == (N, HV, K, V), f"initial_state {tuple(initial_state.shape)}"
    return initial_state.to(torch.float32, copy=True)
