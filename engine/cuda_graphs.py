"""Decode steps replayed as CUDA graphs.

A decode-only step launches a few thousand small kernels; on the host that costs ~20 ms for a
24-layer model, far more than the GPU work (bench/profile_step.py). Captured once per batch size,
a step is one graph launch. Sizes are padded up to the next captured size: padded entries read and
write the pool's scratch row, attention reads each slot's buffer up to the pool's max_len (masked by
position), so one graph serves every sequence length. Mixed steps (with prompt chunks) run eagerly.

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


class DecodeStep:
    """Static buffers for decode steps of up to `max_batch` sequences, and (on CUDA) one captured
    graph per size in capture_sizes(max_batch)."""

    def __init__(self, model: HybridLM, pool: SlotPool, max_batch: int, capture: bool):
        self.model, self.pool = model, pool
        device = model.device
        self.sizes = capture_sizes(max_batch)
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), pool.scratch, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def _batch(self, size: int) -> Batch:
        return Batch((1,) * size, (0,) * size, self.cu_seqlens[:size + 1], self.slots[:size],
                     self.positions[:size], self.slots[:size], attn_len=self.pool.max_len)

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.ids[:size], self._batch(size), self.pool)
        return self.model.logits(hidden)

    def _capture_all(self) -> None:
        pool_handle = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and the allocator settles
            for size in self.sizes:
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool_handle):
                logits = self._forward(size)
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", self.sizes)

    def run(self, ids: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [B, vocab] fp32 of one decode step for B = len(ids) sequences."""
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        device = self.ids.device
        packed = torch.tensor([ids + [0] * pad, slots + [self.pool.scratch] * pad, positions + [0] * pad],
                              dtype=torch.int64).to(device, non_blocking=True)
        self.ids[:size].copy_(packed[0])
        self.slots[:size].copy_(packed[1])
        self.positions[:size].copy_(packed[2])
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self._forward(size)
        return logits[:n]
