"""SlotPool: every running request's model state, one slot per request, preallocated.

Per Gated DeltaNet layer a slot is a fixed-size pair (conv taps, recurrent state); kernels read and
write them in place through a tensor of slot indices, so a step copies no state. Attention layers
give each slot a contiguous key/value buffer of `max_len` positions, written in place at each
token's position (paged blocks, which would let short requests use less, are a later step; a
sliding-window layer uses the same buffer and masks). Allocation and release are O(1) on a free
list; a slot's recurrent state is zeroed when handed out, and attention never reads a position
its sequence has not written, so a request never sees what the previous owner left. One extra
row, `scratch`, is never handed out: padded entries of a fixed-size (CUDA graph) batch point at it.

The recurrent state is stored in fp32 by default or in bf16 (`state_dtype`): bf16 halves its bytes,
so twice the slots fit and a decode step moves half the state traffic, at an accuracy cost (GDN.md).
Kernels always compute in fp32 and round only what they store back.
"""

from __future__ import annotations

import torch

from engine.config import LINEAR_ATTENTION, ModelConfig

# What --state-dtype accepts: the names torch uses and their short forms.
STATE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_state_dtype(name: str) -> torch.dtype:
    """The recurrent state's storage dtype from its name; ValueError for anything else."""
    if name not in STATE_DTYPES:
        raise ValueError(f"state dtype {name!r} is not one of {', '.join(STATE_DTYPES)}")
    return STATE_DTYPES[name]


class SlotPool:
    def __init__(self, config: ModelConfig, num_slots: int, device: torch.device, dtype: torch.dtype,
                 max_len: int | None = None, state_dtype: torch.dtype = torch.float32):
        """dtype: conv taps and attention keys/values (the model's); state_dtype: recurrent states."""
        if num_slots < 1:
            raise ValueError("a slot pool needs at least one slot")
        assert state_dtype in (torch.float32, torch.bfloat16), f"no kernel stores a {state_dtype} state"
        gdn = config.gdn
        self.capacity = num_slots
        self.scratch = num_slots  # the extra row every per-slot tensor has
        self.max_len = max_len
        self.state_dtype = state_dtype
        self.device = device
        rows = num_slots + 1
        # Per layer [slots, conv_dim, conv_kernel]: a ring of the last conv_kernel inputs, x_p at p % conv_kernel
        # (kernels/conv.py), read and written by each token's position: a fork copies it whole and goes on from there.
        self.conv: list[torch.Tensor | None] = []
        self.recurrent: list[torch.Tensor | None] = []  # per layer: [slots, HV, K, V] state_dtype
        self.keys: list[torch.Tensor | None] = []  # per layer: [slots, max_len, kv_heads, head_dim]
        self.values: list[torch.Tensor | None] = []
        for kind in config.layer_types:
            if kind == LINEAR_ATTENTION:
                self.conv.append(torch.zeros(rows, gdn.conv_dim, gdn.conv_kernel, device=device,
                                             dtype=dtype))
                self.recurrent.append(torch.zeros(rows, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim,
                                                  device=device, dtype=state_dtype))
                self.keys.append(None)
                self.values.append(None)
            else:
                if max_len is None:
                    raise ValueError("a model with attention layers needs a slot pool max_len")
                attn = config.attention
                shape = (rows, max_len, attn.num_kv_heads, attn.head_dim)
                self.conv.append(None)
                self.recurrent.append(None)
                self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
                self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self.allocate_many(1)[0]

    def allocate_many(self, count: int) -> list[int]:
        """`count` slots, their states zeroed together: one launch per state tensor, not one per slot
        (a burst of 256 admissions cleared slot by slot cost ~75 ms of kernel launches on an H200 host)."""
        if count > len(self._free):
            raise RuntimeError("no free slot")  # the scheduler admits only when enough are free
        slots = [self._free.pop() for _ in range(count)]
        self._in_use.update(slots)
        self._clear(slots)
        return slots

    def release(self, slot: int) -> None:
        assert slot in self._in_use, f"slot {slot} is not in use"
        self._in_use.remove(slot)
        self._free.append(slot)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Make dst's state a copy of src's first `length` tokens: forking a sequence (n > 1)."""
        assert src in self._in_use and dst in self._in_use
        for conv, rec in zip(self.conv, self.recurrent):
            if conv is not None:
                conv[dst].copy_(conv[src])
                rec[dst].copy_(rec[src])
        for keys, values in zip(self.keys, self.values):
            if keys is not None:
                keys[dst, :length].copy_(keys[src, :length])
                values[dst, :length].copy_(values[src, :length])

    def bytes_per_slot(self) -> int:
        """Device memory one slot holds, over all layers."""
        tensors = self.conv + self.recurrent + self.keys + self.values
        return sum(t[0].numel() * t.element_size() for t in tensors if t is not None)

    def recurrent_bytes_per_slot(self) -> int:
        """The part of bytes_per_slot() that is recurrent state: what state_dtype scales."""
        return sum(t[0].numel() * t.element_size() for t in self.recurrent if t is not None)

    def describe(self) -> str:
        """Capacity for the start-up log: slots, and what one holds."""
        dtype = str(self.state_dtype).removeprefix("torch.")
        return (f"{self.capacity} slots, {self.bytes_per_slot() / 2**20:.1f} MiB of state each "
                f"(recurrent state {self.recurrent_bytes_per_slot() / 2**20:.1f} MiB in {dtype})")

    def clear_scratch(self) -> None:
        """Zero the scratch row's states (after start-up forwards ran on it: engine/warmup.py)."""
        self._clear([self.scratch])

    def _clear(self, slots: list[int]) -> None:
        if not slots:
            return
        rows = torch.tensor(slots, device=self.device)
        for conv, rec in zip(self.conv, self.recurrent):
            if conv is not None:
                conv.index_fill_(0, rows, 0)
                rec.index_fill_(0, rows, 0)
