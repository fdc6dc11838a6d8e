"""Decode steps replayed as CUDA graphs.

A decode-only step launches a few thousand small kernels; on the host that costs ~20 ms for a
24-layer model, far more than the GPU work (bench/profile_step.py). Captured once per batch size
and attention length, a step is one graph launch. Sizes are padded up to the next captured size:
padded entries read and write the pool's scratch row. Attention reads each slot's buffer up to a
fixed length (masked by position), the next of a few length buckets above the batch's longest
sequence (powers of two, then the pool's max_len), so short sequences in a long-context pool do
not read the whole buffer; on the triton backend, whose attention kernel stops at each sequence's
position, one length (one graph per size) serves all. Mixed steps (with prompt chunks) run eagerly.

`DecodeStep.run` is the same function captured or not: on CPU (and in tests) it runs eagerly with
the same padding, which is how the padding logic is checked without a GPU.
"""

from __future__ import annotations

import logging

import torch

from engine.models.hybrid import HybridLM
from engine.models.state import Batch
from engine.slots import SlotPool

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def attention_lengths(max_len: int | None, smallest: int = 256) -> list[int]:
    """Key lengths a decode step's attention reads: powers of two from `smallest`, then max_len."""
    if max_len is None:  # no attention layers
        return [0]
    lengths = []
    length = smallest
    while length < max_len:
        lengths.append(length)
        length *= 2
    return lengths + [max_len]


class DecodeStep:
    """Static buffers for decode steps of up to `max_batch` sequences, and (on CUDA) one captured
    graph per (size, length) in capture_sizes(max_batch) x attention_lengths(pool.max_len)."""

    def __init__(self, model: HybridLM, pool: SlotPool, max_batch: int, capture: bool):
        self.model, self.pool = model, pool
        device = model.device
        self.sizes = capture_sizes(max_batch)
        has_attention = any(keys is not None for keys in pool.keys)
        # The triton backend's decode attention stops at each sequence's own position (read on the device),
        # so one graph per size serves every length; the torch form reads a fixed length per graph.
        bucketed = has_attention and model.backend != "triton"
        self.lengths = attention_lengths(pool.max_len) if bucketed else [pool.max_len]
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), pool.scratch, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        # Every graph writes its logits here (the model's dtype: no fp32 copy of [B, vocab] a step), so the
        # graphs of all sizes and lengths share one output buffer.
        self.logits = torch.zeros(max_batch, model.config.vocab_size, device=device, dtype=model.embed.dtype)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture_all()

    def _batch(self, size: int, length: int) -> Batch:
        return Batch((1,) * size, (0,) * size, self.cu_seqlens[:size + 1], self.slots[:size],
                     self.positions[:size], self.slots[:size], attn_len=length)

    def _forward(self, size: int, length: int) -> None:
        hidden = self.model(self.ids[:size], self._batch(size, length), self.pool)
        self.model.logits(hidden, out=self.logits[:size])

    def _capture_all(self) -> None:
        pool_handle = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and the allocator settles
            for size in self.sizes:
                self._forward(size, self.lengths[-1])
            for length in self.lengths:
                self._forward(self.sizes[-1], length)
        torch.cuda.current_stream().wait_stream(stream)
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            for length in reversed(self.lengths):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool_handle):
                    self._forward(size, length)
                self.graphs[(size, length)] = graph
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s x attention lengths %s", self.sizes, self.lengths)

    def run(self, ids: list[int] | torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [B, vocab] (the model's dtype) of one decode step for B = len(ids) sequences at
        `positions`; ids may be a device tensor (the previous step's tokens, never read on the host).
        The result is a view of a shared buffer: valid until the next run."""
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        longest = max(positions) + 1
        length = next((k for k in self.lengths if k is not None and k >= longest), self.lengths[-1])
        pad = size - n
        device = self.ids.device
        ids_on_device = isinstance(ids, torch.Tensor)
        rows = [slots + [self.pool.scratch] * pad, positions + [0] * pad]
        if not ids_on_device:
            rows.append(ids + [0] * pad)
        packed = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)  # one host-to-device copy
        self.slots[:size].copy_(packed[0])
        self.positions[:size].copy_(packed[1])
        if ids_on_device:
            self.ids[:n].copy_(ids)  # padding rows keep stale ids: valid tokens whose results are dropped
        else:
            self.ids[:size].copy_(packed[2])
        if (size, length) in self.graphs:
            self.graphs[(size, length)].replay()
        else:
            self._forward(size, length)
        return self.logits[:n]
