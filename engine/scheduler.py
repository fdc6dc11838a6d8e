"""Which tokens run in the next step.

Continuous batching: every running sequence feeds its last sampled token (a decode), and the rest
of the step's token budget goes to prompt chunks of admitted requests, oldest first, so a long
prompt is prefilled over several steps while others keep decoding. A request is admitted (FIFO)
when the pool has a slot for each of its n sequences; all n are reserved at admission so forking
after the prompt never waits. Aborting frees the slots at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.request import Request, Sequence
from engine.slots import SlotPool


@dataclass
class PrefillChunk:
    request: Request
    start: int  # prompt positions [start, start + length)
    length: int


@dataclass
class StepPlan:
    decodes: list[Sequence]
    prefills: list[PrefillChunk]

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, pool: SlotPool, max_num_seqs: int, max_num_batched_tokens: int):
        assert max_num_batched_tokens >= max_num_seqs, "every running sequence must fit one decode token"
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order

    @property
    def num_running_sequences(self) -> int:
        return sum(1 for r in self.running for s in r.sequences if not s.finished)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> StepPlan:
        decodes = [seq for req in self.running if not req.prefilling
                   for seq in req.sequences if seq.pending_token is not None and not seq.finished]
        self._admit()
        budget = self.max_num_batched_tokens - len(decodes)
        prefills = []
        for req in self.running:
            if budget == 0:
                break
            if req.prefilling:
                length = min(len(req.prompt_ids) - req.num_prefilled, budget)
                prefills.append(PrefillChunk(req, req.num_prefilled, length))
                budget -= length
        return StepPlan(decodes, prefills)

    def can_admit(self) -> bool:
        """Would the request at the head of the queue get its slots now?"""
        if not self.waiting:
            return False
        n = self.waiting[0].params.n
        return self.pool.num_free >= n and self.num_running_sequences + n <= self.max_num_seqs

    def _admit(self) -> None:
        if not self.waiting:
            return
        running = self.num_running_sequences  # counted once: admitting B requests is O(B), not O(B^2)
        free = self.pool.num_free
        admitted = []
        while self.waiting:
            n = self.waiting[0].params.n
            if free < n or running + n > self.max_num_seqs:
                break  # FIFO: nobody overtakes the head of the queue
            request = self.waiting.popleft()
            admitted.extend(request.sequences)
            self.running.append(request)
            running += n
            free -= n
        # all their slots in one go: clearing them is one launch per state tensor
        for seq, slot in zip(admitted, self.pool.allocate_many(len(admitted))):
            seq.slot = slot

    def release(self, seq: Sequence) -> None:
        """Give a finished or aborted sequence's slot back."""
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None

    def remove(self, request: Request) -> None:
        """Drop a request wherever it is, releasing every slot it holds."""
        for seq in request.sequences:
            self.release(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def drop_finished(self) -> None:
        self.running = [r for r in self.running if not r.finished]
