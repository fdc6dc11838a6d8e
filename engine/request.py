"""A request as the engine tracks it: its prompt, its n generated sequences, and what it has
produced; and the incremental output the engine hands back after each step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.sampling import SamplingParams, SequenceSampler, TokenLogprob
from engine.stopping import StopChecker
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    """What one of a request's n choices produced in one step (deltas, not totals)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]  # the choices that advanced this step
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None  # set once, on the first output, when asked for
    finished: bool  # every choice is done
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # so far, over all choices


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two successive outputs of one request as one: each choice's deltas joined in order. A
    consumer that fell behind the engine takes what queued up in one piece (one streamed event
    instead of one per token)."""
    assert earlier.request_id == later.request_id and not earlier.finished, "merging unrelated outputs"
    merged: dict[int, CompletionOutput] = {}
    for delta in earlier.outputs + later.outputs:
        seen = merged.get(delta.index)
        if seen is None:
            merged[delta.index] = CompletionOutput(delta.index, delta.text, list(delta.token_ids), delta.logprobs,
                                                   delta.finish_reason, delta.stop_reason)
            continue
        seen.text += delta.text
        seen.token_ids += delta.token_ids
        if delta.logprobs is not None:
            seen.logprobs = (seen.logprobs or []) + delta.logprobs
        seen.finish_reason, seen.stop_reason = delta.finish_reason, delta.stop_reason
    return RequestOutput(later.request_id, list(merged.values()), later.prompt_token_ids,
                         earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
                         later.finished, later.num_prompt_tokens, later.num_generated_tokens)


class Sequence:
    """One generated choice. Sequence 0 prefills the prompt; the others start from a copy of its
    state (fork) once the prompt is done, so a prompt is prefilled once for any n."""

    def __init__(self, request: "Request", index: int, tokenizer: Tokenizer, vocab_size: int):
        self.request = request
        self.index = index
        params = request.params
        self.sampler = SequenceSampler(params, request.prompt_ids, tokenizer.eos_token_ids, vocab_size,
                                       seed_offset=index)
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stop_checker = StopChecker(params.stop)
        self.eos_token_ids = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
        self.slot: int | None = None
        self.num_computed = 0  # tokens whose effect is in the slot's state
        self.pending_token: int | None = None  # sampled, not yet fed through the model
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.sampler.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    num_prefilled: int = 0  # prompt tokens already in sequence 0's slot
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    first_token_time: float | None = None

    def init_sequences(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.sequences = [Sequence(self, i, tokenizer, vocab_size) for i in range(self.params.n)]

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    @property
    def num_generated(self) -> int:
        return sum(len(seq.output_ids) for seq in self.sequences)
