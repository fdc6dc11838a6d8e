"""Decode attention over the slot pool's key/value buffers, read in place, with the output gate.

One query token per sequence b at position p = positions[b]; its keys and values are
keys/values[slot_ids[b], j] for j in [lo, p], lo = 0 or p - window + 1 in a window layer. The query
heads sharing a key/value head (GQA) are one program's queries, so each key is loaded once per
kv head; the loop stops at the sequence's own position (read from the device: a CUDA graph
captured once serves every length). An entry with a negative slot id (padding) reads no key and
gets zeros. Online softmax in fp32 (flash-attention style), both products on the buffers' own
dtype (bf16 keys and values go to the tensor cores as they are, the probabilities rounded to
bf16 for the second product, as flash-attention does; on the CPU, the Triton interpreter, whose bf16
dot is wrong, the operands are widened to fp32 first); the output is optionally multiplied by
sigmoid(gate) (Qwen's gated attention) before it is stored. Small batches split each sequence's
keys over several programs (flash-decoding) so the GPU is not left with B * KVH programs, and a
second launch combines the splits. Both kernels launch with PDL where kernels/pdl.py enables it.

rope_decode_attention does a decode step's kernels/rope.py store and this attention in one launch, where
the attention runs one split a sequence (its docstring says how, and how its bits and speed compare).

Where the torch form gathered each slot's whole [length] buffer into a copy (keys[slot_ids, :L]),
built a mask and ran SDPA, then the gate's sigmoid and product: ~8 kernels and a copy of every
key and value it reads.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import pdl
from kernels.pdl import gdc_launch_dependents, gdc_wait
from kernels.recurrent import _num_sms
from kernels.rope import _norm_pairs, _rotate

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_kernel(
    q,  # [B, H, D], contiguous
    gate,  # [B, H, D], last dim contiguous (unread without GATE)
    keys,  # [S, L, KVH, D], contiguous
    values,  # [S, L, KVH, D], contiguous
    positions,  # [B]
    slot_ids,  # [B]; < 0: padding
    out,  # [B, H, D], contiguous
    part_acc,  # [B, H, num_splits, D] fp32 (unused without SPLIT)
    part_ml,  # [B, H, num_splits, 2] fp32: each split's running max (log2 units) and sum (unused without SPLIT)
    stride_g_b,
    stride_g_h,
    max_len,
    window,  # keys j with p - j < window (a large number when the layer has none)
    num_splits,
    scale_log2,  # softmax scale times log2(e): the exponentials are exp2
    H: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,  # query heads per kv head
    BG: tl.constexpr,
    BD: tl.constexpr,
    BL: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: partial results for the combine kernel
    GATE: tl.constexpr,
    F32: tl.constexpr,  # dots on fp32 operands, "ieee": fp32 buffers, and any on the CPU (below)
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel may launch now; it waits for us in its own gdc_wait
        gdc_launch_dependents()
    i_b = tl.program_id(0).to(tl.int64)
    i_kv = tl.program_id(1)
    i_s = tl.program_id(2)
    if PDL:  # q and this step's keys and values come from the kernel before (rope's store)
        gdc_wait()
    slot = tl.load(slot_ids + i_b).to(tl.int64)
    pos = tl.load(positions + i_b).to(tl.int64)
    start, end = _split_keys(slot, pos, window, num_splits, i_s, BL)

    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, BD)
    mask_g = o_g < G
    mask_d = o_d < D
    heads = i_kv * G + o_g  # [BG] this program's query heads
    p_q = q + (i_b * H + heads)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=mask_g[:, None] & mask_d[None, :], other=0)  # [BG, BD]
    b_q = b_q.to(tl.float32 if F32 else keys.dtype.element_ty)

    m = tl.full([BG], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BD], dtype=tl.float32)
    base = slot * max_len * (KVH * D) + i_kv * D
    m, acc_l, acc = _attend_blocks(b_q, keys, values, base, start, end, end, o_d, m, acc_l, acc, scale_log2,
                                   KVH, D, BL, F32)
    m_o = mask_g[:, None] & mask_d[None, :]
    if SPLIT:  # an empty split leaves max -inf and sum 0: it weighs nothing in the combination
        row = (i_b * H + heads) * num_splits + i_s  # [BG]
        tl.store(part_acc + row[:, None] * D + o_d[None, :], acc, mask=m_o)
        tl.store(part_ml + row * 2, m, mask=mask_g)
        tl.store(part_ml + row * 2 + 1, acc_l, mask=mask_g)
    else:  # padding has sum 0 and acc 0: zeros out
        b_o = acc / tl.where(acc_l > 0, acc_l, 1.0)[:, None]
        _finish(b_o, gate, out, i_b, heads, o_d, m_o, stride_g_b, stride_g_h, H, D, GATE)


@triton.jit
def _finish(b_o, gate, out, i_b, heads, o_d, m_o, stride_g_b, stride_g_h, H: tl.constexpr, D: tl.constexpr,
            GATE: tl.constexpr):
    """Store the attention output rows [BG, BD] of (token i_b, heads), times sigmoid(gate) if GATE."""
    if GATE:
        p_g = gate + i_b * stride_g_b + heads[:, None] * stride_g_h + o_d[None, :]
        b_g = tl.load(p_g, mask=m_o, other=0).to(tl.float32)
        b_o = b_o / (1.0 + tl.exp(-b_g))
    tl.store(out + (i_b * H + heads)[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m_o)


@triton.jit
def _split_keys(slot, pos, window, num_splits, i_s, BL: tl.constexpr):
    """The keys [start, end) split i_s of num_splits attends to for a query at pos: whole BL blocks of
    lo..pos (lo = pos - window + 1 or 0), the last split the remainder (or none); none for padding."""
    lo = tl.maximum(pos - window + 1, 0)
    chunk = tl.cdiv(tl.cdiv(pos + 1 - lo, num_splits), BL) * BL
    start = lo + i_s * chunk
    end = tl.minimum(start + chunk, pos + 1)
    return start, tl.where(slot < 0, start, end)


@triton.jit
def _attend_blocks(b_q, keys, values, base, start, stop, end, o_d, m, acc_l, acc, scale_log2, KVH: tl.constexpr,
                   D: tl.constexpr, BL: tl.constexpr, F32: tl.constexpr):
    """_attend_block over the BL-key blocks from start up to stop, keys before end (buffer offset base: the
    slot's first key of this kv head), read from keys/values (to fp32 with F32): (m, acc_l, acc)."""
    mask_d = o_d < D
    for block in range(start, stop, BL):
        o_l = block + tl.arange(0, BL)  # [BL] key positions
        mask_l = o_l < end
        p_kv = base + o_l[:, None] * (KVH * D) + o_d[None, :]
        m_kv = mask_l[:, None] & mask_d[None, :]
        b_k = tl.load(keys + p_kv, mask=m_kv, other=0)  # [BL, BD]
        b_v = tl.load(values + p_kv, mask=m_kv, other=0)
        if F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        m, acc_l, acc = _attend_block(b_q, b_k, b_v, mask_l, m, acc_l, acc, scale_log2, F32)
    return m, acc_l, acc


@triton.jit
def _attend_block(b_q, b_k, b_v, mask_l, m, acc_l, acc, scale_log2, F32: tl.constexpr):
    """One online-softmax step over a block of keys b_k, values b_v [BL, BD] (mask_l [BL]: real
    keys) for queries b_q [BG, BD]: the running max m, sum acc_l [BG] and output acc [BG, BD]."""
    s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee" if F32 else "tf32") * scale_log2
    s = tl.where(mask_l[None, :], s, float("-inf"))  # [BG, BL]
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc_l = acc_l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision="ieee" if F32 else "tf32")
    return m_new, acc_l, acc


@triton.jit
def _combine_splits_kernel(
    gate,  # [B, H, D], last dim contiguous (unread without GATE)
    out,  # [B, H, D], contiguous
    part_acc,  # [B, H, NSPLIT, D] fp32
    part_ml,  # [B, H, NSPLIT, 2] fp32
    stride_g_b,
    stride_g_h,
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    NSPLIT: tl.constexpr,
    GATE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    # One program per (token, head): softmax-weighted sum of its splits' partial outputs.
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_s = tl.arange(0, NSPLIT)
    o_d = tl.arange(0, BD)
    row = (i_b * H + i_h) * NSPLIT + o_s  # [NSPLIT]
    if PDL:  # the partials are the attention kernel's, just before
        gdc_wait()
    b_m = tl.load(part_ml + row * 2)
    b_l = tl.load(part_ml + row * 2 + 1)
    b_acc = tl.load(part_acc + row[:, None] * D + o_d[None, :], mask=(o_d < D)[None, :], other=0)
    m_max = tl.max(b_m, 0)
    w = tl.exp2(b_m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [NSPLIT]; 0 for empty splits
    total = tl.sum(b_l * w, 0)  # 0 only for padding, whose acc is 0 too
    b_o = tl.sum(b_acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [BD]
    heads = i_h + tl.arange(0, 1)
    b_o = b_o[None, :]
    _finish(b_o, gate, out, i_b, heads, o_d, (o_d < D)[None, :], stride_g_b, stride_g_h, H, D, GATE)


@triton.jit
def _sum_squares(x, stride, n: tl.constexpr, NR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
    """Each of n rows' sum of squares in fp32, [BN] (0 past n); row r at x + r * stride, D channels.
    The rows go NR at a time as [NR, BD] tiles: launched with NR times the warps of kernels/rope.py's
    one-row programs, such a tile's default layout gives each row the same elements per thread, lanes and
    warps as there, so each row adds in rope.py's order (bits on the GPU, not just in the interpreter)."""
    o_n = tl.arange(0, NR)
    o_r = tl.arange(0, BN)
    o_d = tl.arange(0, BD)[None, :]
    ss = tl.zeros([BN], dtype=tl.float32)
    for c in tl.static_range(0, n, NR):
        b_x = tl.load(x + (c + o_n)[:, None] * stride + o_d, mask=((c + o_n) < n)[:, None] & (o_d < D), other=0)
        b_x = b_x.to(tl.float32)
        ss_c = tl.sum(b_x * b_x, 1)  # [NR]
        for r in tl.static_range(NR):
            if c + r < n:  # one of NR sums plus zeros: exact
                ss = tl.where(o_r == c + r, tl.sum(tl.where(o_n == r, ss_c, 0.0), 0), ss)
    return ss


@triton.jit
def _norm_rope(x, o_d, mask_x, ss, weight, inv_freq, pos, eps, D: tl.constexpr, R: tl.constexpr, NORM: tl.constexpr,
               dtype: tl.constexpr):
    """Rows [N, BD] (pointers x [N, 1] to their first channel, o_d [1, BD], mask_x [N, 1]: real rows,
    ss [N, 1] their sums of squares) loaded, RMSNormed times weight (NORM) and rotated as kernels/rope.py
    does it (its _norm_pairs and _rotate), so the caller's rounding to where rope.py stores gives its bits."""
    half: tl.constexpr = R // 2
    partner = tl.where(o_d < half, o_d + half, o_d - half)
    b_x = tl.load(x + o_d, mask=mask_x & (o_d < D), other=0).to(tl.float32)
    b_p = tl.load(x + partner, mask=mask_x & (o_d < R), other=0).to(tl.float32)
    if NORM:
        b_x, b_p = _norm_pairs(b_x, b_p, 1.0 / tl.sqrt(ss / D + eps), weight, o_d, D, R, dtype)
    return _rotate(b_x, b_p, pos, inv_freq, o_d, R)


@triton.jit
def _rope_decode_attention_kernel(
    q,  # [B, H, D], last dim contiguous
    k,  # [B, KVH, D], last dim contiguous
    v,  # [B, KVH, D], last dim contiguous
    q_weight,  # [D] (unread without NORM)
    k_weight,  # [D] (unread without NORM)
    inv_freq,  # [R / 2] fp32
    gate,  # [B, H, D], last dim contiguous (unread without GATE)
    keys,  # [S, L, KVH, D], contiguous
    values,  # [S, L, KVH, D], contiguous
    positions,  # [B]
    slot_ids,  # [B]; < 0: padding
    out,  # [B, H, D], contiguous
    stride_q_b,
    stride_q_h,
    stride_k_b,
    stride_k_h,
    stride_v_b,
    stride_v_h,
    stride_g_b,
    stride_g_h,
    max_len,
    window,
    eps,
    scale_log2,
    H: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    BL: tl.constexpr,
    NORM: tl.constexpr,
    NR: tl.constexpr,  # rows a sum-of-squares tile (_sum_squares)
    GATE: tl.constexpr,
    F32: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next kernel may launch now; it waits for us in its own gdc_wait
        gdc_launch_dependents()
    i_b = tl.program_id(0).to(tl.int64)
    i_kv = tl.program_id(1)
    slot = tl.load(slot_ids + i_b).to(tl.int64)  # copied in before the step: readable before gdc_wait
    pos = tl.load(positions + i_b).to(tl.int64)
    start, end = _split_keys(slot, pos, window, 1, 0, BL)  # one split: keys lo..pos, none for padding

    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, BD)
    mask_g = o_g < G
    mask_d = o_d < D
    heads = i_kv * G + o_g  # [BG] this program's query heads
    row0 = tl.arange(0, 1)[:, None]  # [1, 1]: the new key's one row
    if PDL:  # q, k, v come from the projection before
        gdc_wait()
    # This token's queries, keys and values as kernels/rope.py stores them (rounded to q's, keys' dtype)
    # and decode_attention then loads them (to fp32 with F32, else to the buffers' dtype).
    p_q = q + i_b * stride_q_b + i_kv * G * stride_q_h  # this program's first query head
    p_k = k + i_b * stride_k_b + i_kv * stride_k_h
    ss_q = tl.zeros([BG], dtype=tl.float32)
    ss_k = tl.zeros([1], dtype=tl.float32)
    if NORM:
        ss_q = _sum_squares(p_q, stride_q_h, G, NR, BG, BD, D)
        ss_k = _sum_squares(p_k, 0, 1, NR, 1, BD, D)
    b_q = _norm_rope(p_q + o_g[:, None] * stride_q_h, o_d[None, :], mask_g[:, None], ss_q[:, None], q_weight, inv_freq,
                     pos, eps, D, R, NORM, q.dtype.element_ty)  # [BG, BD]
    b_q = b_q.to(q.dtype.element_ty).to(tl.float32 if F32 else keys.dtype.element_ty)
    k_new = _norm_rope(p_k + row0, o_d[None, :], row0 == 0, ss_k[:, None], k_weight, inv_freq, pos, eps, D, R, NORM,
                       q.dtype.element_ty).to(keys.dtype.element_ty)  # [1, BD]
    v_new = tl.load(v + i_b * stride_v_b + i_kv * stride_v_h + o_d[None, :], mask=mask_d[None, :], other=0)
    v_new = v_new.to(values.dtype.element_ty)

    m = tl.full([BG], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BD], dtype=tl.float32)
    base = slot * max_len * (KVH * D) + i_kv * D
    last = start + tl.maximum(end - start - 1, 0) // BL * BL  # the block holding key pos
    # decode_attention's loop up to that block
    m, acc_l, acc = _attend_blocks(b_q, keys, values, base, start, last, end, o_d, m, acc_l, acc, scale_log2,
                                   KVH, D, BL, F32)
    if start < end:  # the last block: key pos from registers, never from the buffer
        o_l = last + tl.arange(0, BL)
        mask_l = o_l < end
        new = ((o_l == pos) & mask_l)[:, None]
        p_kv = base + o_l[:, None] * (KVH * D) + o_d[None, :]
        m_kv = mask_l[:, None] & mask_d[None, :] & ~new
        b_k = tl.where(new, k_new, tl.load(keys + p_kv, mask=m_kv, other=0))
        b_v = tl.where(new, v_new, tl.load(values + p_kv, mask=m_kv, other=0))
        if F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        m, acc_l, acc = _attend_block(b_q, b_k, b_v, mask_l, m, acc_l, acc, scale_log2, F32)
    # No program of this launch reads the cell (slot, pos) (see rope_decode_attention), so the store may come last.
    p_new = base + pos * (KVH * D) + o_d[None, :]
    m_new = (o_d < tl.where(slot >= 0, D, 0))[None, :]
    tl.store(keys + p_new, k_new, mask=m_new)
    tl.store(values + p_new, v_new, mask=m_new)

    # padding has sum 0 and acc 0: zeros out
    b_o = acc / tl.where(acc_l > 0, acc_l, 1.0)[:, None]
    _finish(b_o, gate, out, i_b, heads, o_d, mask_g[:, None] & mask_d[None, :], stride_g_b, stride_g_h, H, D, GATE)


class LaunchConfig(NamedTuple):
    """How decode_attention launches: key splits per (sequence, kv head), keys per loop step (BL),
    warps and software-pipeline stages of the attention kernel."""

    splits: int
    block: int = 32
    warps: int = 4
    stages: int = 3


def launch_config(B: int, KVH: int, max_len: int, device: torch.device, elem_bytes: int = 2) -> LaunchConfig:
    """The launch for B sequences over buffers of max_len positions of elem_bytes each (the actual
    lengths are read on the device, so this depends on the buffer, not on them).

    Measured on an H200 (docs/performance.md, "Session 6: decode attention"): the kernel streams
    keys at copy speed once every multiprocessor holds enough bytes in flight, and below that time
    goes with how deep each program's pipeline is. So: split each sequence's keys (a power of two,
    at most 64) while B * KVH * splits still fits one program per multiprocessor, narrowing the
    key block (64, 32, 16) rather than split finer than a block of max_len; such programs run alone
    on their multiprocessor, deep (64 keys and 8 warps, 3 stages: ~140 KB of keys in flight).
    Batches of more than one program per multiprocessor take no split (no combining launch) and
    blocks of 32 keys with 4 warps, 3 stages while three programs a multiprocessor hold them all
    (one wave), else 2 stages (more programs resident, ~4 a multiprocessor)."""
    sms = _num_sms(device)
    rows = B * KVH
    splits, block = 1, 64
    while rows * splits * 2 <= sms and splits < 64:
        while splits * 2 * block > max_len and block > 16:
            block //= 2
        if splits * 2 * block > max_len:
            break
        splits *= 2
    if rows * splits <= sms:
        config = LaunchConfig(splits, block, 8 if block == 64 else 4, 3)
    else:
        config = LaunchConfig(1, 32, 4, 3 if rows <= 3 * sms else 2)
    if elem_bytes > 2:  # the same bytes in flight (fp32 buffers: half the keys a block)
        config = config._replace(block=max(16, config.block * 2 // elem_bytes))
    return config


def decode_attention(q: Tensor, gate: Tensor | None, keys: Tensor, values: Tensor, positions: Tensor,
                     slot_ids: Tensor, window: int | None = None, scale: float | None = None,
                     config: LaunchConfig | None = None) -> Tensor:
    """q: [B, H, D]; gate: [B, H, D] or None (token and head strides free, last dim contiguous);
    keys, values: [S, L, KVH, D] contiguous, this step's keys already written; positions, slot_ids:
    [B] int (slot id < 0: padding, zeros out). Returns softmax(q k^T * scale) v over keys
    lo..positions[b] of slot slot_ids[b], times sigmoid(gate) when given: [B, H, D] in q's dtype.
    scale defaults to D ** -0.5; config overrides launch_config() (splits a power of two: with
    more than one, a second launch combines the splits)."""
    B, H, D = q.shape
    KVH = keys.shape[2]
    assert H % KVH == 0 and keys.shape[3] == D and keys.shape == values.shape, f"q {q.shape}, keys {keys.shape}"
    assert keys.is_contiguous() and values.is_contiguous(), "key/value buffers must be contiguous"
    assert gate is None or gate.shape == q.shape, "gate: q's shape"
    q = q.contiguous()
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    out = torch.empty_like(q)
    if B == 0:
        return out
    G = H // KVH
    BD = triton.next_power_of_2(D)
    config = config or launch_config(B, KVH, keys.shape[1], q.device, keys.element_size())
    splits = config.splits
    assert splits & (splits - 1) == 0, "splits must be a power of two"
    part_acc = part_ml = out  # unread with one split
    if splits > 1:
        part_acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q.device)
    stride_g = (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)
    gate_arg = gate if gate is not None else q
    use_pdl, pdl_kwargs = pdl.enabled(q.device), pdl.launch_kwargs(q.device)
    _decode_attention_kernel[(B, KVH, splits)](
        q, gate_arg, keys, values, positions, slot_ids, out, part_acc, part_ml, *stride_g,
        keys.shape[1], window if window is not None else keys.shape[1] + 1, splits, (scale or D ** -0.5) * _LOG2E,
        H=H, KVH=KVH, D=D, G=G, BG=max(16, triton.next_power_of_2(G)), BD=BD, BL=config.block,
        SPLIT=splits > 1, GATE=gate is not None, F32=keys.dtype == torch.float32 or keys.device.type == "cpu",
        PDL=use_pdl, num_warps=config.warps, num_stages=config.stages, **pdl_kwargs,
    )
    if splits > 1:
        _combine_splits_kernel[(B, H)](gate_arg, out, part_acc, part_ml, *stride_g, H=H, D=D, BD=BD,
                                       NSPLIT=splits, GATE=gate is not None, PDL=use_pdl, num_warps=4, **pdl_kwargs)
    return out


# Whether a decode step's attention takes rope_decode_attention where it launches one split per (sequence,
# kv head) (fuses_rope); read at every forward, so a benchmark can time both (graphs keep the path taken).
FUSE_ROPE = True


def fuses_rope(B: int, KVH: int, max_len: int, device: torch.device, elem_bytes: int = 2) -> bool:
    """Whether B sequences' decode attention runs as rope_decode_attention: where launch_config gives one
    split and there are more (sequence, kv head) programs than multiprocessors, which is where it was measured
    faster than rope's and attention's launches (its docstring). At one program a multiprocessor or fewer
    (64-key blocks over 8 warps) the three launches were a little faster: engine step on an H200, B = 48
    1.665 against 1.676-1.678 ms, B = 64 1.781 against 1.787-1.790 (docs/performance.md, "Session 11")."""
    return (FUSE_ROPE and B * KVH > _num_sms(device)
            and launch_config(B, KVH, max_len, device, elem_bytes).splits == 1)


def rope_decode_attention(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                          eps: float, inv_freq: Tensor, positions: Tensor, slot_ids: Tensor, gate: Tensor | None,
                          keys: Tensor, values: Tensor, window: int | None = None, scale: float | None = None,
                          config: LaunchConfig | None = None) -> Tensor:
    """A decode step's attention in one launch: kernels/rope.qk_norm_rope_store(q, k, v, q_weight, k_weight,
    eps, inv_freq, positions, slot_ids, keys, values) then decode_attention(its q, gate, keys, values,
    positions, slot_ids, window, scale, config) without rope's launch before it. Under the Triton
    interpreter: the same bits, output and buffers (tests/test_kernels_decode_attention_fused.py).

    q, gate: [B, H, D]; k, v: [B, KVH, D] (token and head strides free, last dim contiguous); one token a
    sequence, so a token's slot is its sequence's: slot_ids [B] (< 0: padding, which stores nothing and
    gets zeros). config: one split a sequence (default launch_config's, which must have one: fuses_rope
    says where). Returns [B, H, D] in q's dtype.

    Every program (sequence, kv head) norms and rotates its G query heads and the kv head's new key itself,
    attends to the earlier keys in the buffers and to the new key and value from registers, and stores
    those last. So no program reads a cell another writes, provided no two sequences of the batch share a
    slot (padding may: entries on a scratch slot at one position each write there, and read only their own
    key).

    Seen on an H200 (Triton 3.6; 8 query heads, 2 kv heads, D 256, R 64, bf16 buffers of 640 positions),
    against the launches it replaces: keys and values the same bits in every call; the output too but for
    one element in 5 of 60 calls (1 bf16 ulp: a sum added in another order). Per layer in a CUDA graph of
    20, B = 128: 45.7 against 53.1 us. A form with splits, the last split to arrive at a counter combining
    them, was slower wherever the three launches split (B = 1 10.9 against 7.4 us, 4 21.2 against 10.0, 32
    18.4 against 16.3: that one program reads every split's partials) and was removed (d757fdf has it)."""
    B, H, D = q.shape
    KVH = k.shape[1]
    R = 2 * inv_freq.shape[0]
    assert k.shape == v.shape == (B, KVH, D) and H % KVH == 0, f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert (q_weight is None) == (k_weight is None), "norm both q and k or neither"
    assert inv_freq.dim() == 1 and 0 < R <= D and inv_freq.dtype == torch.float32, f"inv_freq {inv_freq.shape}, D {D}"
    assert keys.is_contiguous() and values.is_contiguous(), "key/value buffers must be contiguous"
    assert keys.shape == values.shape and keys.shape[2:] == (KVH, D), f"keys {keys.shape}, k {k.shape}"
    assert gate is None or gate.shape == q.shape, "gate: q's shape"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    config = config or launch_config(B, KVH, keys.shape[1], q.device, keys.element_size())
    assert config.splits == 1, f"one split a sequence, not {config.splits} (fuses_rope)"
    norm = q_weight is not None
    stride_g = (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)
    _rope_decode_attention_kernel[(B, KVH)](
        q, k, v, q_weight if norm else q, k_weight if norm else k, inv_freq.contiguous(),
        gate if gate is not None else q, keys, values, positions, slot_ids, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *stride_g,
        keys.shape[1], window if window is not None else keys.shape[1] + 1, eps, (scale or D ** -0.5) * _LOG2E,
        H=H, KVH=KVH, D=D, R=R, G=H // KVH, BG=max(16, triton.next_power_of_2(H // KVH)),
        BD=triton.next_power_of_2(D), BL=config.block, NORM=norm,
        NR=max(1, config.warps // (1 if D <= 128 else 2)),  # kernels/rope.py launches 1 warp, or 2 past D 128
        GATE=gate is not None,
        F32=keys.dtype == torch.float32 or keys.device.type == "cpu", PDL=pdl.enabled(q.device),
        num_warps=config.warps, num_stages=config.stages, **pdl.launch_kwargs(q.device),
    )
    return out
