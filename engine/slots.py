"""SlotPool: every running request's model state, one slot per request, preallocated.

Per Gated DeltaNet layer a slot is a fixed-size pair (conv taps, recurrent state); kernels read and
write them in place through a tensor of slot indices, so a step copies no state. Attention layers
keep each slot's keys and values as growing tensors for now (paged blocks are the engine's next
step). Allocation and release are O(1) on a free list; a slot is zeroed when handed out, so a
request never sees what the previous owner left.
"""

from __future__ import annotations

import torch

from engine.config import LINEAR_ATTENTION, ModelConfig


class SlotPool:
    def __init__(self, config: ModelConfig, num_slots: int, device: torch.device, dtype: torch.dtype):
        if num_slots < 1:
            raise ValueError("a slot pool needs at least one slot")
        gdn = config.gdn
        self.capacity = num_slots
        self.conv: list[torch.Tensor | None] = []  # per layer: [slots, conv_dim, conv_kernel - 1]
        self.recurrent: list[torch.Tensor | None] = []  # per layer: [slots, HV, K, V] fp32
        self.keys: list[list[torch.Tensor] | None] = []  # per layer, per slot: [P, kv_heads, head_dim]
        self.values: list[list[torch.Tensor] | None] = []
        for kind in config.layer_types:
            if kind == LINEAR_ATTENTION:
                self.conv.append(torch.zeros(num_slots, gdn.conv_dim, gdn.conv_kernel - 1, device=device,
                                             dtype=dtype))
                self.recurrent.append(torch.zeros(num_slots, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim,
                                                  device=device, dtype=torch.float32))
                self.keys.append(None)
                self.values.append(None)
            else:
                attn = config.attention
                empty = torch.zeros(0, attn.num_kv_heads, attn.head_dim, device=device, dtype=dtype)
                self.conv.append(None)
                self.recurrent.append(None)
                self.keys.append([empty] * num_slots)
                self.values.append([empty] * num_slots)
        self._empty_kv = {i: kv[0] for i, kv in enumerate(self.keys) if kv is not None}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free slot")  # the scheduler admits only when one is free
        slot = self._free.pop()
        self._in_use.add(slot)
        self._clear(slot)
        return slot

    def release(self, slot: int) -> None:
        assert slot in self._in_use, f"slot {slot} is not in use"
        self._in_use.remove(slot)
        self._free.append(slot)
        for layer, empty in self._empty_kv.items():  # drop the memory now, not at reuse
            self.keys[layer][slot] = self.values[layer][slot] = empty

    def copy(self, src: int, dst: int) -> None:
        """Make dst's state a copy of src's: forking a sequence (n > 1) after its prompt."""
        assert src in self._in_use and dst in self._in_use
        for conv, rec in zip(self.conv, self.recurrent):
            if conv is not None:
                conv[dst].copy_(conv[src])
                rec[dst].copy_(rec[src])
        for layer in self._empty_kv:  # attention tensors are never written in place: sharing is a copy
            self.keys[layer][dst] = self.keys[layer][src]
            self.values[layer][dst] = self.values[layer][src]

    def bytes_per_slot(self) -> int:
        """Fixed-size state of one slot (attention keys/values, which grow, not counted)."""
        return sum(t[0].numel() * t.element_size() for t in self.conv + self.recurrent if t is not None)

    def _clear(self, slot: int) -> None:
        for conv, rec in zip(self.conv, self.recurrent):
            if conv is not None:
                conv[slot].zero_()
                rec[slot].zero_()
        for layer, empty in self._empty_kv.items():
            self.keys[layer][slot] = self.values[layer][slot] = empty
