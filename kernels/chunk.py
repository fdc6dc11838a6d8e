"""Chunkwise gated delta rule prefill in Triton (GDN.md, "Chunkwise form"; chunk C = 64).

Packed varlen layout, as kernels/reference.py:
  q, k: [T, H, K]; v: [T, HV, V]; g (log decay, <= 0), beta: [T, HV]; cu_seqlens: [N + 1];
  state_pool: [S, HV, K, V] fp32 or bf16, read and written in place at slot_ids [N] (the
  state kernel carries it in fp32 and rounds only the final store to the pool's dtype).

Three launches, all over chunks that never cross a sequence boundary:
  1. kernels/chunk_wy.py     (chunk, value head), parallel: G (cumsum of g), 1/||k||,
                             T = (I + A)^-1 kept on chip, w = T diag(beta exp G) K_hat,
                             u = T diag(beta) V.
  2. kernels/chunk_state.py  (sequence, value head, V block), sequential over the sequence's
                             chunks: carries the fp32 state, writes each chunk's entering state
                             h[c] (input dtype) and v_new = u - w h[c]; final state to its slot.
  3. kernels/chunk_output.py (chunk, V block, value head), parallel:
                             o = s (Q_hat exp G) h[c] + s (Q_hat K_hat^T * decay, causal) v_new.
q and k are never normalised in memory: the l2norm is a per-row scale applied to the products.
G is kept in log2 units (multiplied by log2 e) so every decay is one exp2, and every exponent that
is evaluated is <= 0: masked entries are replaced by 0 with tl.where before exp2 and selected out
after. All index arithmetic is in int64 (but the coordinates of tensor-descriptor tiles, which the
copy engine takes as int32).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.chunk_output import _output_kernel
from kernels.chunk_state import _state_kernel
from kernels.chunk_wy import _wy_kernel

CHUNK = 64  # C: tokens per chunk


@dataclass(frozen=True)
class ChunkConfig:
    """Launch shapes of the three kernels (block sizes are columns of V or rows of K)."""

    state_bv: int = 64  # V columns per state program; smaller gives more programs
    state_warps: int = 4
    state_stages: int = 2
    state_split: bool = False  # hold the state as two [K/2, BV] halves instead of one [K, BV] tile
    state_tma: bool = False  # w, k, u in and h out through tensor descriptors where the tiles fit
    out_bv: int = 64
    out_bk: int = 64  # K is looped in blocks of out_bk
    out_warps: int = 4
    out_stages: int = 3
    wy_bk: int = 64
    wy_bv: int = 64
    wy_warps: int = 4
    wy_stages: int = 3
    wy_solve: str = "together"  # (I + A)^-1: "together" or "blocks" (kernels/chunk_wy.py)


def pick_config(num_seqs: int, HV: int, K: int, V: int) -> ChunkConfig:
    """Launch shapes from sweeps on an H200 (Triton 3.6, docs/performance.md): the state pass
    takes V blocks of 64 where that still gives two programs per SM (many sequences: 10% less
    time at 16 x 4096), else 32, and 16 when V blocks of 32 would leave over half the SMs idle
    (K <= 128); the WY kernel solves "together" (15-18% faster whole prefill than "blocks" at
    K = 128) on 2 warps for K <= 128 (at K = 256, 2 warps were 1% faster at 16 x 4096 and 2-4%
    slower at T = 2048 and 8192 in session 6); the output kernel takes V blocks of 128 (V blocks of 32
    faulted there on Triton 3.6), 3 pipeline stages. Above K = 128 the state pass holds one
    [K, BV] tile and moves w, k, u and h through tensor descriptors at 2 stages (3 do not fit
    shared memory): 3.6% off the whole prefill at one sequence of 65536 tokens, 3.8% at 8192, 7.8%
    at 16 x 4096, same bits (session 6, K = 256; K <= 128 not timed with descriptors yet). Every
    launch was bitwise deterministic run to run in the sweep (bench/kernels_prefill.py checks it);
    the output kernel was not with 2-3 stages until q's norm left its pipelined loop
    (kernels/chunk_output.py says why)."""
    vp = max(16, triton.next_power_of_2(V))
    kp = max(16, triton.next_power_of_2(K))
    if num_seqs * HV * triton.cdiv(V, 64) >= 264:  # two programs per SM even with V blocks of 64
        bv = 64
    else:
        bv = 16 if K <= 128 and num_seqs * HV * triton.cdiv(V, 32) <= 66 else 32
    small_k = K <= 128
    return ChunkConfig(
        state_bv=min(bv, vp), state_warps=4, state_stages=3 if small_k else 2, state_tma=not small_k,
        out_bv=min(128, vp), out_bk=min(64, kp), out_warps=4, out_stages=3,
        wy_bk=min(32 if small_k else 64, kp), wy_bv=min(64, vp), wy_warps=2 if small_k else 4,
    )


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
    config: ChunkConfig | None = None,
    plan: ChunkPlan | None = None,
) -> Tensor:
    """Prefill N packed sequences; returns o [T, HV, V] in v.dtype.

    q, k: [T, H, K]; v: [T, HV, V]; g (fp32 log decay), beta: [T, HV]; cu_seqlens: int [N + 1] on
    the device; state_pool: [S, HV, K, V] fp32 or bf16; slot_ids: int [N]; has_initial_state: bool [N].
    Sequence i starts from state_pool[slot_ids[i]] (zeros where has_initial_state[i] is False or
    the slot is < 0) and its final state is written back there (nowhere for a slot < 0). Slots
    must be distinct; other slots are not touched. No host synchronisation. plan (from
    plan_chunks(cu_seqlens, T)) may be passed to reuse the chunk table across layers; config
    overrides the launch shapes.
    """
    T, H, K = q.shape
    HV, V = v.shape[1:]
    N = cu_seqlens.numel() - 1
    assert k.shape == q.shape and v.shape[0] == T and HV % H == 0, (q.shape, k.shape, v.shape)
    assert g.shape == beta.shape == (T, HV), (g.shape, beta.shape)
    assert K <= 256 and state_pool.shape[1:] == (HV, K, V), state_pool.shape
    assert state_pool.dtype in (torch.float32, torch.bfloat16) and state_pool.is_contiguous(), state_pool.dtype
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    dev = q.device
    cfg = config or pick_config(N, HV, K, V)
    assert cfg.wy_solve in ("blocks", "together"), cfg.wy_solve
    plan = plan or plan_chunks(cu_seqlens.to(dev), T)
    assert plan.num_tokens == T and plan.cu_seqlens.numel() == N + 1
    fit_key = (cfg, dtype, dev)
    cfg = _FITTED.get(fit_key, cfg)
    cfg, G, rk, w, u = launch_wy(k, v, g, beta, plan, cfg, use_qk_l2norm)
    cfg, h, v_new = launch_state(k, w, u, G, rk, state_pool, slot_ids, has_initial_state, plan, cfg)
    cfg, o = launch_output(q, k, G, rk, h, v_new, plan, cfg, scale, use_qk_l2norm)
    _FITTED[fit_key] = cfg
    return o


# The three launches, each its own function so that bench/kernels_prefill.py can run one of them
# twice on the same inputs (the bitwise determinism check). Each returns the config it launched
# with (see _launch_fitting) and its outputs. On the CPU the kernels run on the Triton
# interpreter, whose bf16 dot is wrong: F32 widens the operands first.


def launch_wy(k: Tensor, v: Tensor, g: Tensor, beta: Tensor, plan: ChunkPlan, cfg: ChunkConfig,
              use_qk_l2norm: bool = True) -> tuple:
    """Launch 1: returns (cfg, G [T, HV] fp32, rk [T, H] fp32, w [T, HV, K], u [T, HV, V])."""
    T, H, K = k.shape
    HV, V = v.shape[1:]
    dev, dtype = k.device, v.dtype
    N, NC = plan.cu_seqlens.numel() - 1, plan.chunk_seq.numel()
    G = torch.empty(T, HV, dtype=torch.float32, device=dev)  # within-chunk cumsum of g * log2 e
    rk = torch.empty(T, H, dtype=torch.float32, device=dev)  # 1 / ||k|| (1 without l2norm)
    w = torch.empty(T, HV, K, dtype=dtype, device=dev)
    u = torch.empty(T, HV, V, dtype=dtype, device=dev)
    scratch = torch.empty(NC, HV, CHUNK, CHUNK, dtype=torch.float32, device=dev)
    cfg = _launch_fitting(cfg, "wy", lambda c: _wy_kernel[(NC, HV)](
        k, v, g, beta, G, rk, w, u, scratch, plan.cu_seqlens, plan.chunk_start, plan.chunk_seq, N,
        H=H, HV=HV, K=K, V=V, BK=c.wy_bk, BV=c.wy_bv, USE_L2=use_qk_l2norm, EPS=1e-6,
        F32=dev.type == "cpu", SOLVE_TOGETHER=c.wy_solve == "together", num_warps=c.wy_warps,
        num_stages=c.wy_stages,
    ))
    return cfg, G, rk, w, u


def launch_state(k: Tensor, w: Tensor, u: Tensor, G: Tensor, rk: Tensor, state_pool: Tensor,
                 slot_ids: Tensor, has_initial_state: Tensor, plan: ChunkPlan,
                 cfg: ChunkConfig) -> tuple:
    """Launch 2, in place on state_pool: returns (cfg, h [NC, HV, K, V], v_new [T, HV, V]); h of
    the unused tail chunks (chunk_seq == N) is not written."""
    T, H, K = k.shape
    HV, V = u.shape[1:]
    dev, dtype = k.device, u.dtype
    N, NC = plan.cu_seqlens.numel() - 1, plan.chunk_seq.numel()
    h = torch.empty(NC, HV, K, V, dtype=dtype, device=dev)  # state entering each chunk
    v_new = torch.empty(T, HV, V, dtype=dtype, device=dev)
    two_k = cfg.state_split and K >= 32
    BK = max(16, triton.next_power_of_2((K + 1) // 2 if two_k else K))

    def launch(c):
        descs = _state_descriptors(k, w, u, h, BK, c.state_bv, two_k) if c.state_tma else None
        _state_kernel[(N * HV * triton.cdiv(V, c.state_bv),)](
            k, w, u, G, rk, h, v_new, state_pool, slot_ids, has_initial_state, plan.cu_seqlens,
            plan.chunk_start, *(descs or (None,) * 4), H=H, HV=HV, K=K, V=V, BK=BK, TWO_K=two_k,
            BV=c.state_bv, F32=dev.type == "cpu", TMA=descs is not None, num_warps=c.state_warps,
            num_stages=c.state_stages,
        )

    cfg = _launch_fitting(cfg, "state", launch)
    return cfg, h, v_new


def _state_descriptors(k: Tensor, w: Tensor, u: Tensor, h: Tensor, BK: int, BV: int,
                       two_k: bool) -> tuple | None:
    """Tensor descriptors (k, w, u, h) for the state pass, each a 2-D view with the last axis
    contiguous: k [T, H K] and w [T, HV K] in [64, BK] tiles, u [T, HV V] in [64, BV], h
    [NC HV K, V] in [BK, BV]. None where the tiles do not split K and V evenly (a tile would
    reach into the next head) or a row is not a multiple of 16 bytes (the copy engine's rule)."""
    T, H, K = k.shape
    HV, V = u.shape[1:]
    views = k.view(T, H * K), w.view(T, HV * K), u.view(T, HV * V), h.view(-1, V)
    rows_ok = all(x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0 for x in views)
    if K != (2 * BK if two_k else BK) or V % BV or not rows_ok or T == 0:
        return None
    k2, w2, u2, h2 = views
    return (TensorDescriptor.from_tensor(k2, [64, BK]), TensorDescriptor.from_tensor(w2, [64, BK]),
            TensorDescriptor.from_tensor(u2, [64, BV]), TensorDescriptor.from_tensor(h2, [BK, BV]))


def launch_output(q: Tensor, k: Tensor, G: Tensor, rk: Tensor, h: Tensor, v_new: Tensor,
                  plan: ChunkPlan, cfg: ChunkConfig, scale: float,
                  use_qk_l2norm: bool = True) -> tuple:
    """Launch 3: returns (cfg, o [T, HV, V])."""
    T, H, K = q.shape
    HV, V = v_new.shape[1:]
    N, NC = plan.cu_seqlens.numel() - 1, plan.chunk_seq.numel()
    o = torch.empty_like(v_new)
    cfg = _launch_fitting(cfg, "out", lambda c: _output_kernel[(NC * triton.cdiv(V, c.out_bv), HV)](
        q, k, G, rk, h, v_new, o, plan.cu_seqlens, plan.chunk_start, plan.chunk_seq, N, scale,
        H=H, HV=HV, K=K, V=V, BK=c.out_bk, BV=c.out_bv, USE_L2=use_qk_l2norm, EPS=1e-6,
        F32=q.device.type == "cpu", num_warps=c.out_warps, num_stages=c.out_stages,
    ))
    return cfg, o


# Launch shapes that fit this card's shared memory, by (asked-for config, input dtype, device).
# pick_config's shapes come from bf16 sweeps on an H200; fp32 inputs need twice the shared memory
# for the same tiles (the state pass asked for 241 KB of 227), as may a card with less of it.
_FITTED: dict[tuple, ChunkConfig] = {}


def _launch_fitting(cfg: ChunkConfig, kernel: str, launch: Callable[[ChunkConfig], object]) -> ChunkConfig:
    """Launch with cfg; where the card has too little shared memory for it, with ever smaller
    shapes for this kernel (Triton refuses before anything runs, so a retry is safe). Returns the
    config that launched."""
    while True:
        try:
            launch(cfg)
            return cfg
        except OutOfResources:
            smaller = _shrink(cfg, kernel)
            if smaller is None:
                raise
            cfg = smaller


def _shrink(cfg: ChunkConfig, kernel: str) -> ChunkConfig | None:
    """One step down for one kernel: fewer pipeline stages first, then narrower blocks."""
    if kernel == "state":
        if cfg.state_stages > 1:
            return replace(cfg, state_stages=cfg.state_stages - 1)
        return replace(cfg, state_bv=cfg.state_bv // 2) if cfg.state_bv > 16 else None
    if kernel == "out":
        if cfg.out_stages > 1:
            return replace(cfg, out_stages=cfg.out_stages - 1)
        if cfg.out_bk > 16:
            return replace(cfg, out_bk=cfg.out_bk // 2)
        return None  # out_bv is not narrowed: V blocks of 32 faulted on Triton 3.6 (see pick_config)
    if cfg.wy_stages > 1:
        return replace(cfg, wy_stages=cfg.wy_stages - 1)
    if cfg.wy_bv > 16:
        return replace(cfg, wy_bv=cfg.wy_bv // 2)
    return replace(cfg, wy_bk=cfg.wy_bk // 2) if cfg.wy_bk > 16 else None
