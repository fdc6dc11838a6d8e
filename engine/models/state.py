"""What a forward call is told about the sequences it advances, and the one-sequence convenience.

A forward call consumes the new tokens of N sequences packed as one [T] stream; `Batch` says where
each sequence's tokens are, which slot of the SlotPool holds its state, and at what position its
new tokens start. `SequenceState` is one sequence with a private one-slot pool: the form the
single-request generate path and the model tests use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from engine.models.attention import QueryGroup, query_groups
from engine.models.rope import rope_tables
from engine.slots import SlotPool


@dataclass(frozen=True)
class Batch:
    lens: tuple[int, ...]  # new tokens of each sequence (host copy: no device sync to read it)
    starts: tuple[int, ...]  # position of each sequence's first new token (tokens already consumed)
    cu_seqlens: torch.Tensor  # int64 [N + 1] on the model's device: sequence i is tokens cu[i]:cu[i+1]
    slot_ids: torch.Tensor  # int64 [N] on the model's device
    positions: torch.Tensor  # int64 [T]: each token's position in its sequence
    token_slots: torch.Tensor  # int64 [T]: each token's slot
    # Positions decode attention reads per sequence; None: up to the longest sequence in the batch.
    # A CUDA graph fixes it to one of a few lengths (engine/cuda_graphs.py), so a captured step serves
    # every batch whose sequences are no longer than that.
    attn_len: int | None = None

    @classmethod
    def build(cls, seq_lens: list[int], slots: list[int], starts: list[int], device: torch.device) -> "Batch":
        assert len(seq_lens) == len(slots) == len(starts) and min(seq_lens) >= 1
        lens = torch.tensor(seq_lens)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
        cu[1:] = lens.cumsum(0)
        first = torch.tensor(starts).repeat_interleave(lens)
        positions = first + torch.arange(int(cu[-1])) - cu[:-1].repeat_interleave(lens)
        token_slots = torch.tensor(slots).repeat_interleave(lens)
        # One host-to-device copy for all the index tensors, each starting 16 bytes aligned (an even
        # number of int64s in): Triton builds a kernel variant per pointer alignment, and steps of every
        # size would otherwise meet both, building kernels mid-serving (a second each).
        parts = [cu, torch.tensor(slots, dtype=torch.int64), positions, token_slots]
        packed = torch.cat([F.pad(part, (0, part.numel() % 2)) for part in parts]).to(device)
        views, offset = [], 0
        for part in parts:
            views.append(packed[offset:offset + part.numel()])
            offset += part.numel() + part.numel() % 2
        return cls(tuple(seq_lens), tuple(starts), *views)

    @property
    def decode_only(self) -> bool:
        """One new token for every sequence: the shapes a CUDA graph can capture."""
        return len(self.lens) == int(self.positions.shape[0])

    @cached_property
    def has_past(self) -> torch.Tensor:
        """bool [N] on the device: the sequence continues a state (it does not start at position 0)."""
        return torch.tensor([start > 0 for start in self.starts], device=self.slot_ids.device)

    @cached_property
    def chunk_plan(self):
        """Where the batch's 64-token chunks are (kernels/chunk.py plan_chunks), built once per forward
        for all its Gated DeltaNet layers on the triton backend."""
        from kernels.chunk import plan_chunks
        return plan_chunks(self.cu_seqlens, int(self.positions.shape[0]))

    @cached_property
    def num_single(self) -> int:
        """How many sequences at the front have one new token: a mixed step's decodes (the engine packs
        them first). Their slots were cleared at admission, so a one-token prompt among them reads zeros."""
        return next((i for i, n in enumerate(self.lens) if n != 1), len(self.lens))

    @cached_property
    def after_single(self) -> "Batch":
        """The sequences after the leading one-token ones, as a batch of their own (tokens from 0)."""
        d = self.num_single
        if d == 0:
            return self
        cu = self.cu_seqlens[d:] - d
        slot_ids, positions = self.slot_ids[d:], self.positions[d:]
        if slot_ids.data_ptr() % 16:  # an odd d: copies, 16 bytes aligned as every Batch.build tensor (see there)
            slot_ids, positions = slot_ids.clone(), positions.clone()
        return Batch(self.lens[d:], self.starts[d:], cu, slot_ids, positions, self.token_slots[d:], self.attn_len)

    @cached_property
    def attention_groups(self) -> list[QueryGroup]:
        """The batch's sequences as attention groups (models/attention.py), built once per forward."""
        return query_groups(self.lens, self.starts, self.slot_ids)

    @cached_property
    def _rope(self) -> dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]]:
        return {}

    def rope_tables(self, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim] fp32 at the batch's positions (models/rope.py), built once per forward
        for all its attention layers."""
        key = (rotary_dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_tables(self.positions, rotary_dim, theta)
        return self._rope[key]

    @property
    def bounds(self) -> list[tuple[int, int]]:
        ends = list(itertools.accumulate(self.lens))
        return list(zip([0] + ends[:-1], ends))


class SequenceState:
    """One sequence's state: a one-slot pool and the number of tokens consumed so far."""

    def __init__(self, pool: SlotPool):
        self.pool = pool
        self.slot = pool.allocate()
        self.num_tokens = 0
