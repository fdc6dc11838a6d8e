"""Softmax attention of a batch's new tokens over their slots' key/value buffers, all sequences at once.

The new tokens of a step arrive packed ([T, heads, d], see models/state.Batch); their keys and values
are already written into the pool at their positions, so each query attends to its own slot's
positions 0..its own (causal), or the last `window` of them. Two shapes of call:

- decode (`attend_decode`): one query per sequence against each slot's buffer up to a given length
  (a CUDA graph fixes it to one of a few lengths), or in a window layer just the last `window`
  positions; the query heads that share a key/value head go in as its queries, so no key is copied
  per head. This is what a CUDA graph captures.
- varlen (`attend_groups`): a step with prompt chunks. Its sequences are split into at most two
  `QueryGroup`s: those with one new token (decodes mixed into the step), which go through
  `attend_decode`, and those with several, padded to the longest ([N, Tmax] queries, [N, Lmax]
  keys gathered from the slots) and run as ONE scaled_dot_product_attention with a boolean
  causal/window mask.

Why padded SDPA and not a varlen flash kernel: it is a few lines of index arithmetic over torch ops
that run on every device, it reuses the fused SDPA kernels torch already has, and a step's prompt
chunks are usually alike in length (the scheduler cuts them from one token budget), so padding
wastes little. Decodes mixed into the step go in their own group, so they are not padded to a
prompt chunk's length. What it does not do: skip keys a sequence never sees inside the padded
[Lmax] (a varlen kernel would), so one long chunked prompt beside short ones costs N x its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every SDPA backend but cuDNN's: cuDNN builds an execution plan the first time it meets a shape,
# and a server meets new (sequences, chunk length, key length) shapes all the time. On an H200 the
# first full pass of bench/engine.py at batch 128 took 3.8 s with it and 0.87 s without (steady
# state 0.87-0.91 s either way): plan building, not attention, was the cost.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass(frozen=True)
class QueryGroup:
    """Sequences of a batch whose new tokens attend in one call, padded to the longest of them."""

    slots: torch.Tensor  # int64 [N] on device: each sequence's slot
    query_index: torch.Tensor  # int64 [N, Tmax] on device: packed token index of each query; padding
    #                           repeats the sequence's last token, so no row of the mask is empty
    out_rows: torch.Tensor  # int64 [Tq] on device: the real queries' rows in the flattened [N * Tmax]
    out_tokens: torch.Tensor  # int64 [Tq] on device: their packed token indices
    key_len: int  # positions 0..key_len - 1 hold every key any query of the group sees
    min_start: int  # earliest first new position: a window layer needs no key before min_start - window + 1


def query_groups(lens: tuple[int, ...], starts: tuple[int, ...], slot_ids: torch.Tensor) -> list[QueryGroup]:
    """Split a batch (host lens/starts, device slot_ids [N]) into its one-token and multi-token groups."""
    groups = []
    lens_t = torch.tensor(lens)
    first = torch.zeros(len(lens), dtype=torch.int64)  # packed index of each sequence's first token
    first[1:] = lens_t.cumsum(0)[:-1]
    for members in ([i for i, n in enumerate(lens) if n == 1], [i for i, n in enumerate(lens) if n > 1]):
        if not members:
            continue
        idx = torch.tensor(members)
        n = lens_t[idx]  # [N]
        t_max = int(n.max())
        offsets = torch.arange(t_max)
        query_index = first[idx, None] + torch.minimum(offsets[None, :], n[:, None] - 1)  # [N, Tmax]
        real = (offsets[None, :] < n[:, None]).flatten()  # [N * Tmax]
        out_rows = real.nonzero()[:, 0]
        out_tokens = query_index.flatten()[out_rows]
        packed = torch.cat([idx, query_index.flatten(), out_rows, out_tokens]).to(slot_ids.device)
        idx_d, qi_d, rows_d, tokens_d = packed.split([len(members), query_index.numel(), len(out_rows),
                                                      len(out_tokens)])
        groups.append(QueryGroup(
            slots=slot_ids[idx_d], query_index=qi_d.view(len(members), t_max), out_rows=rows_d, out_tokens=tokens_d,
            key_len=max(starts[i] + lens[i] for i in members), min_start=min(starts[i] for i in members)))
    return groups


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """query_pos [...], key_pos [L] -> bool [..., L]: the keys each query may see (causal, within the window)."""
    seen = key_pos <= query_pos[..., None]
    if window is not None:
        seen &= query_pos[..., None] - key_pos < window
    return seen


def attend_groups(q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  groups: list[QueryGroup], window: int | None) -> torch.Tensor:
    """q: [T, heads, d] packed queries at positions [T]; keys/values: the pool's [slots, max_len, kv_heads, d]
    buffers with this step's keys already written -> [T, heads, d]."""
    out = torch.empty_like(q)
    for group in groups:  # at most two: one-token and multi-token sequences
        n, t_max = group.query_index.shape
        if t_max == 1:
            tokens = group.query_index[:, 0]
            out[tokens] = attend_decode(q[tokens], positions[tokens], keys, values, group.slots, group.key_len, window)
            continue
        lo = 0 if window is None else max(0, group.min_start - window + 1)
        k = keys[group.slots, lo:group.key_len]  # [N, L, kv_heads, d]
        v = values[group.slots, lo:group.key_len]
        key_pos = torch.arange(lo, group.key_len, device=q.device)
        mask = visible(positions[group.query_index], key_pos, window)[:, None]  # [N, 1, Tmax, L]
        # SDPA's fused kernels take a mask but not enable_gqa together with one (on CUDA that pair falls
        # back to the math path and its [N, heads, Tmax, L] fp32 scores); the keys are a gathered copy
        # already, so give each query head its own.
        heads, d = q.shape[1:]
        group_size = heads // k.shape[2]
        k, v = k.repeat_interleave(group_size, dim=2), v.repeat_interleave(group_size, dim=2)
        o = _sdpa(q[group.query_index].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                  mask)  # [N, heads, Tmax, d]
        out[group.out_tokens] = o.transpose(1, 2).reshape(n * t_max, heads, d)[group.out_rows]
    return out


def attend_decode(q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  slot_ids: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """One query per sequence, all at once. q: [B, heads, d] at positions [B]; keys/values: the pool's
    buffers, read for each sequence's slot (slot_ids [B]) up to `length` positions, or, in a window
    layer with window < length, at just its last `window` positions -> [B, heads, d]."""
    B, heads, d = q.shape
    if window is None or window >= length:
        k = keys[slot_ids, :length]  # [B, L, kv_heads, d]
        v = values[slot_ids, :length]
        mask = visible(positions, torch.arange(length, device=q.device), window)  # [B, L]
    else:
        key_pos = positions[:, None] - (window - 1) + torch.arange(window, device=q.device)  # [B, window]
        k = keys[slot_ids[:, None], key_pos.clamp(min=0)]  # [B, window, kv_heads, d]
        v = values[slot_ids[:, None], key_pos.clamp(min=0)]
        mask = key_pos >= 0  # positions before the sequence's start are not there
    # The query heads sharing a key/value head go in as that head's queries ([B, kv_heads, group, d]): they
    # share the position and so the mask. enable_gqa would copy every key and value group times instead
    # (SDPA's math path, the one a boolean mask with GQA takes on CUDA, repeats them).
    grouped = q.reshape(B, k.shape[2], heads // k.shape[2], d)
    out = _sdpa(grouped, k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :])  # [B, kv_heads, group, d]
    return out.reshape(B, heads, d)
