"""Decode attention over the slot pool's key/value buffers, read in place, with the output gate.

One query token per sequence b at position p = positions[b]; its keys and values are
keys/values[slot_ids[b], j] for j in [lo, p], lo = 0 or p - window + 1 in a window layer. The query
heads sharing a key/value head (GQA) are one program's queries, so each key is loaded once per
kv head; the loop stops at the sequence's own position (read from the device: a CUDA graph
captured once serves every length). Online softmax in fp32 (flash-attention style); the output
is optionally multiplied by sigmoid(gate) (Qwen's gated attention) before it is stored.

Where the torch form gathered each slot's whole [length] buffer into a copy (keys[slot_ids, :L]),
built a mask and ran SDPA, then the gate's sigmoid and product: ~8 kernels and a copy of every
key and value it reads.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _decode_attention_kernel(
    q,  # [B, H, D], contiguous
    gate,  # [B, H, D], last dim contiguous (unread without GATE)
    keys,  # [S, L, KVH, D], contiguous
    values,  # [S, L, KVH, D], contiguous
    positions,  # [B]
    slot_ids,  # [B]
    out,  # [B, H, D], contiguous
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
    GATE: tl.constexpr,
    PRECISION: tl.constexpr,  # of the fp32 dots: "tf32" holds a bf16/fp16 input exactly; fp32 needs "ieee"
):
    i_b = tl.program_id(0).to(tl.int64)
    i_kv = tl.program_id(1)
    slot = tl.load(slot_ids + i_b).to(tl.int64)
    pos = tl.load(positions + i_b).to(tl.int64)
    lo = tl.maximum(pos - window + 1, 0)

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
    for start in range(lo, pos + 1, BL):
        o_l = start + tl.arange(0, BL)  # [BL] key positions
        mask_l = o_l <= pos
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
    b_o = acc / acc_l[:, None]
    m_o = mask_g[:, None] & mask_d[None, :]
    if GATE:
        p_g = gate + i_b * stride_g_b + heads[:, None] * stride_g_h + o_d[None, :]
        b_g = tl.load(p_g, mask=m_o, other=0).to(tl.float32)
        b_o = b_o / (1.0 + tl.exp(-b_g))
    tl.store(out + (i_b * H + heads)[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m_o)


def decode_attention(q: Tensor, gate: Tensor | None, keys: Tensor, values: Tensor, positions: Tensor,
                     slot_ids: Tensor, window: int | None = None, scale: float | None = None) -> Tensor:
    """q: [B, H, D]; gate: [B, H, D] or None (token and head strides free, last dim contiguous);
    keys, values: [S, L, KVH, D] contiguous, this step's keys already written; positions, slot_ids:
    [B] int. Returns softmax(q k^T * scale) v over keys lo..positions[b] of slot slot_ids[b], times
    sigmoid(gate) when given: [B, H, D] in q's dtype. scale defaults to D ** -0.5."""
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
    BL = 32  # a [BL, BD] key tile and its value tile per iteration
    _decode_attention_kernel[(B, KVH)](
        q, gate if gate is not None else q, keys, values, positions, slot_ids, out,
        gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
        keys.shape[1], window if window is not None else keys.shape[1] + 1, scale or D ** -0.5,
        H=H, KVH=KVH, D=D, G=G, BG=max(16, triton.next_power_of_2(G)), BD=BD, BL=BL,
        GATE=gate is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return out
