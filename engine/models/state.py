"""What a forward call is told about the sequences it advances, and the one-sequence convenience.

A forward call consumes the new tokens of N sequences packed as one [T] stream; `Batch` says where
each sequence's tokens are, which slot of the SlotPool holds its state, and at what position its
new tokens start. `SequenceState` is one sequence with a private one-slot pool: the form the
single-request generate path and the model tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.slots import SlotPool


@dataclass(frozen=True)
class Batch:
    cu_seqlens: torch.Tensor  # int64 [N + 1] on the model's device: sequence i is tokens cu[i]:cu[i+1]
    slot_ids: torch.Tensor  # int64 [N] on the model's device
    starts: tuple[int, ...]  # position of each sequence's first new token (tokens already consumed)

    @classmethod
    def build(cls, seq_lens: list[int], slots: list[int], starts: list[int], device: torch.device) -> "Batch":
        assert len(seq_lens) == len(slots) == len(starts) and min(seq_lens) >= 1
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(seq_lens).cumsum(0)
        return cls(cu.to(device), torch.tensor(slots, dtype=torch.int64, device=device), tuple(starts))

    @property
    def bounds(self) -> list[tuple[int, int]]:
        cu = self.cu_seqlens.tolist()
        return list(zip(cu[:-1], cu[1:]))


class SequenceState:
    """One sequence's state: a one-slot pool and the number of tokens consumed so far."""

    def __init__(self, pool: SlotPool):
        self.pool = pool
        self.slot = pool.allocate()
        self.num_tokens = 0
