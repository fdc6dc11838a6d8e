"""The engine's step: schedule -> one forward over the packed tokens -> sample -> detokenize ->
outputs. Synchronous and single-threaded; engine/async_engine.py runs it off the event loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.cuda_graphs import DecodeStep
from engine.errors import ContextLengthExceeded, InvalidPrompt, TooManyChoices
from engine.loader import LoadedModel
from engine.models.state import Batch
from engine.request import CompletionOutput, Request, RequestOutput, Sequence
from engine.in_flight import InFlightDecode
from engine.kernel_builds import kernel_builds
from engine.sampling import BatchSample, SamplingParams, TokenLogprob, prompt_logprobs, sample_batch
from engine.scheduler import PrefillChunk, Scheduler
from engine.slots import SlotPool, resolve_state_dtype
from engine.warmup import warm_up

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # slots: requests (times n) decoding at once
    max_num_batched_tokens: int = 2048  # tokens per step, decodes and prompt chunks together
    max_model_len: int | None = None  # prompt + max_tokens limit; default: the model's own limit
    gpu_memory_utilization: float = 0.9  # share of free GPU memory the slot pool may take
    # Decode-only steps through engine/cuda_graphs.py: None = on CUDA (captured graphs) only;
    # True on CPU runs the same padded static path eagerly (tests use it).
    decode_graphs: bool | None = None
    # Recurrent state storage, "float32" or "bfloat16" (engine/slots.py): bf16 fits twice the slots
    # and halves decode state traffic, at some accuracy.
    state_dtype: str = "float32"
    # Overlap the host's work on a decode step's tokens (detokenize, stop checks, outputs) with the
    # GPU running the next decode step, fed from the device (batches whose sampling needs nothing
    # from the host, on the decode-graph path): None = wherever decode graphs are used.
    overlap_decode: bool | None = None

    def __post_init__(self) -> None:
        resolve_state_dtype(self.state_dtype)  # ValueError for an unknown name
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class RequestLimits:
    """What a request must respect to run at all; known wherever requests are accepted (the engine
    process sends them to the server process, which checks requests before they cross over)."""

    vocab_size: int
    max_model_len: int | None
    max_num_seqs: int  # sequences decoding at once: the most choices (n) one request may ask for

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError with a user-facing message for a request that can never run."""
        if not prompt_ids:
            raise InvalidPrompt("the prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidPrompt(f"token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if self.max_model_len is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                                        f"exceeds the context limit of {self.max_model_len} tokens")
        if params.n > self.max_num_seqs:
            raise TooManyChoices(f"n={params.n} exceeds the {self.max_num_seqs} sequences the engine runs")


def plan_num_slots(loaded: LoadedModel, config: EngineConfig, max_len: int | None) -> int:
    """As many slots as asked for, or fewer when their state would not fit in the memory free after loading
    (the GPU's; on CPU the RAM the system reports available); ValueError when not even one fits."""
    model = loaded.model
    free = free_memory(model.device)
    if free is None:
        return config.max_num_seqs
    probe = SlotPool(loaded.config, 1, torch.device("meta"), model.embed.dtype, max_len,
                     resolve_state_dtype(config.state_dtype))
    per_slot = max(probe.bytes_per_slot(), 1)
    fits = int(free * config.gpu_memory_utilization) // per_slot - 1  # the pool holds one more row: scratch
    if fits < 1:
        raise ValueError(f"the slot pool does not fit: one slot holds {per_slot / 2**30:.2f} GiB of state "
                         f"(with max_model_len {max_len}) and {free * config.gpu_memory_utilization / 2**30:.2f} "
                         f"GiB may be used on {model.device.type}; lower --max-model-len")
    if fits < config.max_num_seqs:
        log.warning("slot pool: %d slots asked for, %d fit (%.1f MiB each); starting with %d",
                    config.max_num_seqs, fits, per_slot / 2**20, fits)
    return min(fits, config.max_num_seqs)


def free_memory(device: torch.device, meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes free on the device now: the GPU's free memory, or on CPU the RAM Linux reports available
    (MemAvailable), capped by what this process's cgroup (v2) may still take (a container's memory limit,
    which MemAvailable does not see); None where neither is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    known = [free for free in (_mem_available(meminfo), _cgroup_headroom(cgroup)) if free is not None]
    return min(known) if known else None


def _mem_available(meminfo: str) -> int | None:
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(cgroup: str) -> int | None:
    """memory.max - memory.current of the cgroup folder, or None without a limit (or a cgroup v2)."""
    try:
        with open(f"{cgroup}/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(f"{cgroup}/memory.current") as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None


@dataclass
class StepCounters:
    """What the step loop has done since start-up (exported as metrics: is the engine busy, and how)."""

    steps: int = 0  # step() calls
    step_seconds: float = 0.0  # wall time inside those calls
    overlapped_steps: int = 0  # decode steps launched on the device's tokens (EngineConfig.overlap_decode)
    kernel_builds: int = 0  # Triton kernels built inside steps: launch shapes start-up did not meet
    kernel_build_seconds: float = 0.0


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        trained = loaded.config.max_position_embeddings
        if config.max_model_len is not None and trained is not None and config.max_model_len > trained:
            # Positions past the trained limit make no sense to the model's attention layers, and each slot
            # would hold keys and values for all of them.
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {trained} "
                             f"tokens (max_position_embeddings in its config.json)")
        self.max_model_len = config.max_model_len or trained
        num_slots = plan_num_slots(loaded, config, self.max_model_len)
        self.pool = self.model.new_pool(num_slots, self.max_model_len, resolve_state_dtype(config.state_dtype))
        self.scheduler = Scheduler(self.pool, min(config.max_num_seqs, num_slots), config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._builds = kernel_builds()
        if self.model.device.type == "cuda":
            # The host's part of a CUDA step is bookkeeping on small CPU tensors (batch indices), where
            # intra-op threads only add wake-ups, and they take cores the server's processes need: on an
            # H200 host, steps prefilling 2048 tokens took 38-54 ms with 16 threads, 20-26 ms with one.
            torch.set_num_threads(1)
        self.decode_step = self._make_decode_step()
        if self.model.device.type == "cuda":
            self._warm_up(decode_only=self.decode_step is None)
        overlap = config.overlap_decode if config.overlap_decode is not None else self.decode_step is not None
        self.overlap_decode = overlap and self.decode_step is not None
        self._in_flight: InFlightDecode | None = None
        self.counters = StepCounters()
        log.info("engine: %s", self.pool.describe())

    def _warm_up(self, decode_only: bool) -> None:
        try:
            warm_up(self.model, self.pool, self.scheduler.max_num_seqs, decode_only)
        except Exception as err:  # only a start-up saving: serve without it (kernels then build on first use)
            log.warning("kernel warm-up failed, continuing without it: %s", err)
            self.pool.clear_scratch()

    def _make_decode_step(self) -> DecodeStep | None:
        on_cuda = self.model.device.type == "cuda"
        wanted = self.config.decode_graphs if self.config.decode_graphs is not None else on_cuda
        if not wanted:
            return None
        try:
            return DecodeStep(self.model, self.pool, self.scheduler.max_num_seqs, capture=on_cuda)
        except Exception as err:  # a model path that cannot be captured: decode eagerly instead
            log.warning("decode CUDA graphs disabled: %s", err)
            return None

    # ---- requests in and out ----------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.loaded.config.vocab_size, self.max_model_len, self.scheduler.max_num_seqs)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError with a user-facing message for a request that can never run."""
        self.limits.check(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        self.validate(prompt_ids, params)
        assert request_id not in self.requests, f"duplicate request id {request_id}"
        request = Request(request_id, list(prompt_ids), params)
        request.init_sequences(self.tokenizer, self.loaded.config.vocab_size)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its slots are free when this returns."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.remove(request)
        outputs = []
        for seq in request.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
                outputs.append(CompletionOutput(seq.index, "", [], None, "abort"))
        return self._request_output(request, outputs)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._in_flight)

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        builds = self._builds
        built_before, build_seconds_before = builds.count, builds.seconds
        start = time.perf_counter()
        outputs = self._step()
        counters = self.counters
        counters.steps += 1
        counters.step_seconds += time.perf_counter() - start
        if builds.count != built_before:
            built, seconds = builds.count - built_before, builds.seconds - build_seconds_before
            counters.kernel_builds += built
            counters.kernel_build_seconds += seconds
            log.warning("a step built %d Triton kernel(s) in %.2f s (%s): a launch shape that start-up "
                        "(engine/warmup.py) did not meet", built, seconds,
                        ", ".join(sorted(set(builds.names[built_before:]))))
            log.debug("built: %s", "; ".join(builds.details[built_before:]))
        return outputs

    @torch.inference_mode()
    def _step(self) -> list[RequestOutput]:
        if self._in_flight is not None:
            return self._finish_in_flight()
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        decodes = plan.decodes  # each feeds its last sampled token; its effect is in the slot after this step
        ids = [seq.pending_token for seq in decodes]
        lens = [1] * len(decodes)
        slots = [seq.slot for seq in decodes]
        starts = [seq.num_computed for seq in decodes]
        for seq in decodes:
            seq.num_computed += 1
            seq.pending_token = None
        for chunk in plan.prefills:
            ids.extend(chunk.request.prompt_ids[chunk.start:chunk.start + chunk.length])
            lens.append(chunk.length)
            slots.append(chunk.request.sequences[0].slot)
            starts.append(chunk.start)
        sampled: list[Sequence] = list(decodes)
        if self.decode_step is not None and not plan.prefills:
            logits = self.decode_step.run(ids, slots, starts)
            if self._may_overlap(decodes):
                self._in_flight = InFlightDecode.launch(decodes, logits)
                return self._finish_in_flight()
        else:
            logits = self._eager_forward(plan.prefills, ids, lens, slots, starts, sampled)
        if not sampled:
            return []
        return self._record(sampled, sample_batch(logits, [seq.sampler for seq in sampled]))

    # ---- decode steps overlapped with the host's work on the previous one ----------------------

    def _may_overlap(self, seqs: list[Sequence]) -> bool:
        """Can the next decode step run before the host has seen this one's tokens? Only where no
        sequence's sampling depends on its output so far (greedy or drawn, with seeds, top-k/p,
        min-p, logit bias; not penalties, an unmet min_tokens, or logprobs to read back), and not
        while a waiting request could be admitted (it must not wait behind a chain of steps)."""
        return self._may_chain() and all(seq.sampler.needs_no_history for seq in seqs)

    def _may_chain(self) -> bool:
        """_may_overlap for sequences already in flight: their samplers passed, and stay so."""
        return self.overlap_decode and not self.scheduler.can_admit()

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Launch the decode step after the one in flight (fed its tokens on the device), then read
        and record the in-flight step's tokens while the GPU runs the next one.

        The next step takes every sequence that can still go on: one that the in-flight token ends
        (EOS, a stop string) is found only while recording; its extra token is computed and dropped.
        Its slot, released while recording, is last written by that next step, which the stream
        runs before anything a new owner of the slot queues."""
        current, self._in_flight = self._in_flight, None
        going_on = [i for i, seq in enumerate(current.seqs) if self._may_continue(seq)]
        nxt = [current.seqs[i] for i in going_on]
        if nxt and self._may_chain():
            rows = current.tokens if len(nxt) == len(current.seqs) else current.tokens[
                torch.tensor(going_on, device=current.tokens.device)]
            logits = self.decode_step.run(rows, [seq.slot for seq in nxt], [seq.num_computed for seq in nxt])
            for seq in nxt:
                seq.num_computed += 1
            self._in_flight = InFlightDecode.launch(nxt, logits)
            self.counters.overlapped_steps += 1
        kept = [(seq, token) for seq, token in zip(current.seqs, current.token_ids()) if not seq.finished]
        outputs = self._record([seq for seq, _ in kept], BatchSample([t for _, t in kept], [None] * len(kept)))
        if self._in_flight is not None:
            for seq in self._in_flight.seqs:
                seq.pending_token = None  # already on its way through the model
        return outputs

    @staticmethod
    def _may_continue(seq: Sequence) -> bool:
        """Not finished, and the token in flight will not be its last by max_tokens."""
        return not seq.finished and len(seq.output_ids) + 1 < seq.request.params.max_tokens

    def _record(self, sampled: list[Sequence], result: BatchSample) -> list[RequestOutput]:
        """Append each sequence's token, finish the sequences that are done; one output per request."""
        touched: dict[Request, list[CompletionOutput]] = {}
        for seq, token, logprob in zip(sampled, result.token_ids, result.logprobs):
            completions = touched.get(seq.request)
            if completions is None:
                completions = touched[seq.request] = []
            completions.append(self._append_token(seq, token, logprob))
        now = time.monotonic()
        outputs, finished = [], False
        for request, completions in touched.items():
            if request.first_token_time is None:
                request.first_token_time = now
            output = self._request_output(request, completions)
            outputs.append(output)
            if output.finished:
                del self.requests[request.request_id]
                finished = True
        if finished:  # a request only finishes here or in abort(), which removes it itself
            self.scheduler.drop_finished()
        return outputs

    def _eager_forward(self, prefills: list[PrefillChunk], ids: list[int], lens: list[int], slots: list[int],
                       starts: list[int], sampled: list[Sequence]) -> torch.Tensor:
        """A step with prompt chunks (or without graphs): one forward over the packed tokens; adds the
        sequences whose prompt completes to `sampled` and returns the logits of every sampled row."""
        device = self.model.device
        batch = Batch.build(lens, slots, starts, device)
        hidden = self.model(torch.tensor(ids, device=device), batch, self.pool)
        bounds = batch.bounds
        rows = [end - 1 for _, end in bounds[:len(sampled)]]
        for chunk, (begin, end) in zip(prefills, bounds[len(sampled):]):
            self._advance_prefill(chunk, hidden[begin:end])
            if not chunk.request.prefilling:
                for seq in chunk.request.sequences:
                    rows.append(end - 1)
                    sampled.append(seq)
        return self.model.logits(hidden[rows])

    def _advance_prefill(self, chunk: PrefillChunk, hidden: torch.Tensor) -> None:
        request = chunk.request
        first = request.sequences[0]
        k = request.params.prompt_logprobs
        if k is not None:
            self._collect_prompt_logprobs(request, chunk, hidden, k)
        request.num_prefilled += chunk.length
        first.num_computed += chunk.length
        if not request.prefilling:  # prompt done: every other choice starts from a copy of its state
            for seq in request.sequences[1:]:
                self.pool.copy(first.slot, seq.slot, first.num_computed)
                seq.num_computed = first.num_computed

    def _collect_prompt_logprobs(self, request: Request, chunk: PrefillChunk, hidden: torch.Tensor, k: int) -> None:
        """Row i of the chunk predicts prompt token start + i + 1 (when that is still prompt)."""
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        targets = request.prompt_ids[chunk.start:chunk.start + chunk.length + 1]
        rows = len(targets) - 1
        if rows > 0:
            entries = prompt_logprobs(self.model.logits(hidden[:rows]), targets, k)
            request.prompt_logprobs.extend(entries[1:])

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> CompletionOutput:
        """Record a sampled token and decide whether the sequence is done; returns the deltas."""
        params = seq.request.params
        seq.sampler.append(token)
        text = ""
        if token in seq.eos_token_ids:
            seq.finish_reason = "stop"
            text = self._drain(seq, seq.detokenizer.flush())
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            text = self._drain(seq, seq.detokenizer.flush())
        else:
            text, matched = seq.detokenizer.add(token), None
            if params.stop:  # only a request with stop strings holds text back to look for them
                text, matched = seq.stop_checker.feed(text, _may_stop(seq))
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
            elif len(seq.output_ids) >= params.max_tokens:
                seq.finish_reason = "length"
                text += self._drain(seq, seq.detokenizer.flush())
            else:
                seq.pending_token = token
        if seq.finished:
            self.scheduler.release(seq)
        return CompletionOutput(seq.index, text, [token], [logprob] if logprob is not None else None,
                                seq.finish_reason, seq.stop_reason)

    @staticmethod
    def _drain(seq: Sequence, tail: str) -> str:
        """The text still held at the end; a stop string completed by the tail still cuts it."""
        if not seq.request.params.stop:
            return tail
        text, matched = seq.stop_checker.feed(tail, _may_stop(seq))
        if matched is not None:
            seq.finish_reason, seq.stop_reason = "stop", matched
            return text
        return text + seq.stop_checker.flush()

    def _request_output(self, request: Request, completions: list[CompletionOutput]) -> RequestOutput:
        prompt_lp = None
        if request.prompt_logprobs is not None and not request.prefilling and not request.prompt_logprobs_sent:
            prompt_lp = request.prompt_logprobs
            request.prompt_logprobs_sent = True
        return RequestOutput(request.request_id, completions, request.prompt_ids, prompt_lp, request.finished,
                             len(request.prompt_ids), request.num_generated)


def _may_stop(seq: Sequence) -> bool:
    """May a stop string end the sequence now? Not within its first min_tokens tokens, as EOS and stop
    token ids may not (sampling bans those; text can only be let through)."""
    return len(seq.output_ids) > seq.request.params.min_tokens
