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
    lo = tl.maximum(pos - window + 1, 0)
    # Split s of num_splits takes keys [start, end): whole BL blocks, the last split the remainder (or none).
    chunk = tl.cdiv(tl.cdiv(pos + 1 - lo, num_splits), BL) * BL
    start = lo + i_s * chunk
    end = tl.minimum(start + chunk, pos + 1)
    end = tl.where(slot < 0, start, end)

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
    for block in range(start, end, BL):
        o_l = block + tl.arange(0, BL)  # [BL] key positions
        mask_l = o_l < end
        p_kv = base + o_l[:, None] * (KVH * D) + o_d[None, :]
        m_kv = mask_l[:, None] & mask_d[None, :]
        b_k = tl.load(keys + p_kv, mask=m_kv, other=0)  # [BL, BD]
        b_v = tl.load(values + p_kv, mask=m_kv, other=0)
        if F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee" if F32 else "tf32") * scale_log2
        s = tl.where(mask_l[None, :], s, float("-inf"))  # [BG, BL]
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        acc_l = acc_l * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision="ieee" if F32 else "tf32")
        m = m_new
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
