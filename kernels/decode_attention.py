"""Decode attention over the slot pool's key/value buffers, read in place, with the output gate.

One query token per sequence b at position p = positions[b]; its keys and values are
keys/values[slot_ids[b], j] for j in [lo, p], lo = 0 or p - window + 1 in a window layer. The query
heads sharing a key/value head (GQA) are one program's queries, so each key is loaded once per
kv head; the loop stops at the sequence's own position (read from the device: a CUDA graph
captured once serves every length). Online softmax in fp32 (flash-attention style); the output
is optionally multiplied by sigmoid(gate) (Qwen's gated attention) before it is stored. Small
batches split each sequence's keys over several programs (flash-decoding) so the GPU is not left
with B * KVH programs, and a second launch combines the splits.

Where the torch form gathered each slot's whole [length] buffer into a copy (keys[slot_ids, :L]),
built a mask and ran SDPA, then the gate's sigmoid and product: ~8 kernels and a copy of every
key and value it reads.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.recurrent import _num_sms


@triton.jit
def _decode_attention_kernel(
    q,  # [B, H, D], contiguous
    gate,  # [B, H, D], last dim contiguous (unread without GATE)
    keys,  # [S, L, KVH, D], contiguous
    values,  # [S, L, KVH, D], contiguous
    positions,  # [B]
    slot_ids,  # [B]
    out,  # [B, H, D], contiguous
    part_acc,  # [B, H, NSPLIT, D] fp32 (unused when NSPLIT == 1)
    part_ml,  # [B, H, NSPLIT, 2] fp32: each split's running max and sum (unused when NSPLIT == 1)
    stride_g_b,
    stride_g_h,
    max_len,
    window,  # keys j with p - j < window (a large number when the layer has none)
    scale,
    H: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,  # query heads per kv head
    BG: tl.constexpr,
    BD: tl.constexpr,
    BL: tl.constexpr,
    NSPLIT: tl.constexpr,
    GATE: tl.constexpr,
    PRECISION: tl.constexpr,  # of the fp32 dots: "tf32" holds a bf16/fp16 input exactly; fp32 needs "ieee"
):
    i_b = tl.program_id(0).to(tl.int64)
    i_kv = tl.program_id(1)
    i_s = tl.program_id(2)
    slot = tl.load(slot_ids + i_b).to(tl.int64)
    pos = tl.load(positions + i_b).to(tl.int64)
    lo = tl.maximum(pos - window + 1, 0)
    # Split s of NSPLIT takes keys [start, end): whole BL blocks, the last split the remainder (or none).
    chunk = tl.cdiv(tl.cdiv(pos + 1 - lo, NSPLIT), BL) * BL
    start = lo + i_s * chunk
    end = tl.minimum(start + chunk, pos + 1)

    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, BD)
    mask_g = o_g < G
    mask_d = o_d < D
    heads = i_kv * G + o_g  # [BG] this program's query heads
    p_q = q + (i_b * H + heads)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=mask_g[:, None] & mask_d[None, :], other=0).to(tl.float32)  # [BG, BD]

    m = tl.full([BG], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BD], dtype=tl.float32)
    base = slot * max_len * (KVH * D) + i_kv * D
    for block in range(start, end, BL):
        o_l = block + tl.arange(0, BL)  # [BL] key positions
        mask_l = o_l < end
        p_kv = base + o_l[:, None] * (KVH * D) + o_d[None, :]
        m_kv = mask_l[:, None] & mask_d[None, :]
        b_k = tl.load(keys + p_kv, mask=m_kv, other=0).to(tl.float32)  # [BL, BD]
        b_v = tl.load(values + p_kv, mask=m_kv, other=0).to(tl.float32)
        s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        s = tl.where(mask_l[None, :], s * scale, float("-inf"))  # [BG, BL]
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        acc_l = acc_l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, b_v, input_precision=PRECISION)
        m = m_new
    m_o = mask_g[:, None] & mask_d[None, :]
    if NSPLIT == 1:
        _finish(acc / acc_l[:, None], gate, out, i_b, heads, o_d, m_o, stride_g_b, stride_g_h, H, D, GATE)
    else:  # an empty split leaves max -inf and sum 0: it weighs nothing in the combination
        row = (i_b * H + heads) * NSPLIT + i_s  # [BG]
        tl.store(part_acc + row[:, None] * D + o_d[None, :], acc, mask=m_o)
        tl.store(part_ml + row * 2, m, mask=mask_g)
        tl.store(part_ml + row * 2 + 1, acc_l, mask=mask_g)


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
):
    # One program per (token, head): softmax-weighted sum of its splits' partial outputs.
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_s = tl.arange(0, NSPLIT)
    o_d = tl.arange(0, BD)
    row = (i_b * H + i_h) * NSPLIT + o_s  # [NSPLIT]
    b_m = tl.load(part_ml + row * 2)
    b_l = tl.load(part_ml + row * 2 + 1)
    b_acc = tl.load(part_acc + row[:, None] * D + o_d[None, :], mask=(o_d < D)[None, :], other=0)
    w = tl.exp(b_m - tl.max(b_m, 0))  # [NSPLIT]; 0 for empty splits
    b_o = tl.sum(b_acc * w[:, None], 0) / tl.sum(b_l * w, 0)  # [BD]
    heads = i_h + tl.arange(0, 1)
    b_o = b_o[None, :]
    _finish(b_o, gate, out, i_b, heads, o_d, (o_d < D)[None, :], stride_g_b, stride_g_h, H, D, GATE)


def num_splits(B: int, KVH: int, max_len: int, device: torch.device) -> int:
    """Key splits per (sequence, kv head): enough programs to fill the GPU twice over where B * KVH
    alone would not (batch 1 of a 2-kv-head model is 2 programs), a split per 128 positions of the
    buffer at most; a power of two, at most 16. Large batches get 1: no combining launch."""
    want = 2 * _num_sms(device) // (B * KVH)
    cap = min(16, triton.cdiv(max_len, 128), want)
    splits = 1
    while splits * 2 <= cap:
        splits *= 2
    return splits


def decode_attention(q: Tensor, gate: Tensor | None, keys: Tensor, values: Tensor, positions: Tensor,
                     slot_ids: Tensor, window: int | None = None, scale: float | None = None,
                     splits: int | None = None) -> Tensor:
    """q: [B, H, D]; gate: [B, H, D] or None (token and head strides free, last dim contiguous);
    keys, values: [S, L, KVH, D] contiguous, this step's keys already written; positions, slot_ids:
    [B] int. Returns softmax(q k^T * scale) v over keys lo..positions[b] of slot slot_ids[b], times
    sigmoid(gate) when given: [B, H, D] in q's dtype. scale defaults to D ** -0.5; splits (a power
    of two) overrides num_splits(): with more than one, a second launch combines the splits."""
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
    splits = splits or num_splits(B, KVH, keys.shape[1], q.device)
    assert splits & (splits - 1) == 0, "splits must be a power of two"
    part_acc = part_ml = out  # unread with one split
    if splits > 1:
        part_acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q.device)
    stride_g = (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)
    gate_arg = gate if gate is not None else q
    _decode_attention_kernel[(B, KVH, splits)](
        q, gate_arg, keys, values, positions, slot_ids, out, part_acc, part_ml, *stride_g,
        keys.shape[1], window if window is not None else keys.shape[1] + 1, scale or D ** -0.5,
        H=H, KVH=KVH, D=D, G=G, BG=max(16, triton.next_power_of_2(G)), BD=BD, BL=32, NSPLIT=splits,
        GATE=gate is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    if splits > 1:
        _combine_splits_kernel[(B, H)](gate_arg, out, part_acc, part_ml, *stride_g, H=H, D=D, BD=BD,
                                       NSPLIT=splits, GATE=gate is not None, num_warps=4)
    return out
