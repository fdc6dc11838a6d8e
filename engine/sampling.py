"""Choosing the next token for every running sequence in one batched pass, with logprobs.

Per row, in this order: repetition, frequency and presence penalties; logit_bias; the min_tokens ban on EOS and
stop_token_ids. That gives the row's *processed* distribution, which is what logprobs report (one log_softmax,
before temperature and truncation; vLLM calls its nearest mode "processed_logprobs"). Then greedy rows take the
argmax; the others divide by their temperature, keep their top-k, top-p and min-p tokens, and draw with an
exponential race: argmax(probs / q), q ~ Exp(1) per token, which picks token i with probability probs[i] /
sum(probs) and needs no renormalisation. A seeded row draws q from its own generator, so a seed gives the same
tokens whatever else is in the batch. Prompt logprobs are of the raw logits (nothing to penalise yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most top logprobs per position a request may ask for (vLLM's default limit)
_GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing by it would overflow
# A temperature above this is drawn at this one: the draw is uniform over the allowed tokens either way, and
# above float32's range (3.4e38) it became inf, and the -inf of a banned token divided by it NaN.
_HOTTEST = 1e30


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 64
    min_tokens: int = 0  # no EOS, stop token id or stop string ends the output before this many tokens
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit; -1 (what OpenAI/vLLM clients send) is stored as 0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias); a dict {token_id: bias} is accepted too
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per sampled token (0 = only the sampled token's)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Lists (as JSON gives them) become tuples, so params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

        _check(self.n >= 1, "n", "must be at least 1", self.n)
        _check(self.max_tokens >= 1, "max_tokens", "must be at least 1", self.max_tokens)
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]",
               self.min_tokens)
        _check(0 <= self.temperature < float("inf"), "temperature", "must be >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.top_k >= 0, "top_k", "must be -1, 0 (no limit) or a positive count", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        _check(0 < self.repetition_penalty < float("inf"), "repetition_penalty", "must be > 0",
               self.repetition_penalty)
        for token_id, bias in self.logit_bias:
            _check(token_id >= 0, "logit_bias", "token ids must be >= 0", token_id)
            _check(-100 <= bias <= 100, "logit_bias", "values must be in [-100, 100]", bias)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0", self.stop_token_ids)
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            _check(value is None or 0 <= value <= MAX_LOGPROBS, field, f"must be in [0, {MAX_LOGPROBS}]", value)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW


def _check(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} {rule}, got {value!r}")


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    try:
        return tuple((int(token_id), float(value)) for token_id, value in pairs)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}") from None


class SequenceSampler:
    """The sampling state of one running sequence: its params, the tokens so far, its generator.

    Each of a request's n choices has its own; seed_offset (the choice's index) makes their draws differ while
    keeping each reproducible.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_token_ids: frozenset[int],
                 vocab_size: int, seed_offset: int = 0) -> None:
        bias_ids = [t for t, _ in params.logit_bias]
        for field, ids in (("logit_bias", bias_ids), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if t >= vocab_size]
            _check(not outside, field, f"token ids must be below the vocabulary size {vocab_size}", outside)
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(t for t in eos_token_ids if 0 <= t < vocab_size)
        # what min_tokens keeps out while the output is short; EOS is no stop at all under ignore_eos
        self._banned_early = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids))
        if params.min_tokens and len(self._banned_early) >= vocab_size:  # no token could come first
            raise ValueError(f"stop_token_ids{'' if params.ignore_eos else ' and EOS'} cover all {vocab_size} tokens "
                             f"of the vocabulary, which min_tokens={params.min_tokens} bans until then: leave one out")
        self._seed = None if params.seed is None else (params.seed + seed_offset) % 2**64
        self._generator: torch.Generator | None = None  # made on the logits' device at the first draw
        self.has_penalties = (params.presence_penalty != 0 or params.frequency_penalty != 0
                              or params.repetition_penalty != 1)
        self._counts: torch.Tensor | None = None  # [vocab] fp32 occurrences in the output, once penalties need it
        self._seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or the output
        self._counted = 0  # output_ids[:_counted] are in _counts and _seen
        # greedy, nothing that changes the logits and nothing read back from them: the argmax is all
        self._plain_greedy = (params.greedy and not self.has_penalties and not params.logit_bias
                              and params.logprobs is None)

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)

    @property
    def argmax_only(self) -> bool:
        """This step's token is the argmax of the raw logits (min_tokens, while it bans tokens, changes them)."""
        return self._plain_greedy and self._min_tokens_met

    @property
    def needs_no_history(self) -> bool:
        """This step's token can be drawn before the host knows the previous one: nothing it depends on
        changes with the output (no penalties, no min_tokens ban left) and nothing is read back (no
        logprobs). Stays true as the output grows, so a decode step may be launched on the device's
        tokens of the step before (engine.LLMEngine's overlapped decode)."""
        return not self.has_penalties and self.params.logprobs is None and self._min_tokens_met

    @property
    def _min_tokens_met(self) -> bool:
        return len(self.output_ids) >= self.params.min_tokens or not self._banned_early

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self._seed is not None and self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def penalty_state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(output token counts [vocab] fp32, seen in prompt or output [vocab] bool), kept up to date on device."""
        if self._counts is None:
            self._counts = torch.zeros(self.vocab_size, device=device)
            self._seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
        new = self.output_ids[self._counted:]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=device)
            self._counts.index_add_(0, ids, torch.ones(len(new), device=device))
            self._seen[ids] = True
            self._counted = len(self.output_ids)
        return self._counts, self._seen


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k (token_id, logprob), most likely first; [] when k = 0


@dataclass
class BatchSample:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where that sequence did not ask for logprobs


@torch.inference_mode()
def sample_batch(logits: torch.Tensor, samplers: list[SequenceSampler]) -> BatchSample:
    """logits: [B, vocab] (any float dtype, any device), row i for samplers[i] -> one token per row.

    Does not append the tokens: the caller does, once it has decided to keep them.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(samplers), (tuple(logits.shape), len(samplers))
    assert all(s.vocab_size == logits.shape[1] for s in samplers), "logits width is not the vocabulary size"
    if all(s.argmax_only for s in samplers):
        # The common serving case: no copy of the [B, vocab] logits; only the [B] token ids reach the host.
        return BatchSample(argmax(logits).tolist(), [None] * len(samplers))
    tokens, logits = _sample(logits, samplers)
    return BatchSample(tokens.tolist(), _logprobs(logits, tokens, samplers))


@torch.inference_mode()
def sample_on_device(logits: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """The tokens sample_batch would pick, as a [B] tensor on the logits' device, with nothing read back
    to the host; for samplers that all need_no_history (no logprobs to return)."""
    assert all(s.needs_no_history for s in samplers), "a sampler needs the host (penalties, min_tokens, logprobs)"
    if all(s.argmax_only for s in samplers):
        return argmax(logits)
    return _sample(logits, samplers)[0]


def _sample(logits: torch.Tensor, samplers: list[SequenceSampler]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] on the device, the processed fp32 logits [B, vocab] they were drawn from)."""
    if any(s.has_penalties or s.params.logit_bias or len(s.output_ids) < s.params.min_tokens for s in samplers):
        logits = logits.to(torch.float32, copy=True)  # [B, vocab], changed in place below
        _apply_penalties(logits, samplers)
        _apply_logit_bias(logits, samplers)
        _apply_min_tokens(logits, samplers)
    else:
        logits = logits.float()  # read only from here on: no copy when it is fp32 already

    drawn = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if len(drawn) < len(samplers):
        tokens = argmax(logits)  # [B]; the drawn rows are overwritten below
    else:
        tokens = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    if drawn:
        rows = _index(drawn, logits.device)
        tokens[rows] = _draw(logits[rows] if len(drawn) < len(samplers) else logits, [samplers[i] for i in drawn])
    return tokens, logits


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), the same tokens; on CUDA through kernels/argmax.py (faster than torch's
    reduction over a 150K vocabulary: see there)."""
    if logits.is_cuda:
        from kernels.argmax import argmax_rows
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _apply_penalties(logits: torch.Tensor, samplers: list[SequenceSampler]) -> None:
    penalised = [i for i, s in enumerate(samplers) if s.has_penalties]
    if not penalised:
        return
    device = logits.device
    states = [samplers[i].penalty_state(device) for i in penalised]
    counts = torch.stack([c for c, _ in states])  # [R, vocab]
    seen = torch.stack([s for _, s in states])  # [R, vocab]

    def column(field: str) -> torch.Tensor:  # [R, 1]
        return torch.tensor([[getattr(samplers[i].params, field)] for i in penalised], device=device)

    rows = _index(penalised, device)
    x = logits[rows]
    # Kept within [1e-30, 1e30] for the same reason as _HOTTEST: in float32, 1e39 is inf (0 * inf is NaN) and
    # 1e-39 is 0 (x / 0 is inf); at either bound a seen token's logit already goes to 0 or far above the rest.
    repetition = column("repetition_penalty").clamp(1 / _HOTTEST, _HOTTEST)
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    x -= column("frequency_penalty") * counts + column("presence_penalty") * (counts > 0)
    logits[rows] = x


def _apply_logit_bias(logits: torch.Tensor, samplers: list[SequenceSampler]) -> None:
    rows, cols, values = [], [], []
    for i, s in enumerate(samplers):
        for token_id, bias in s.params.logit_bias:
            rows.append(i)
            cols.append(token_id)
            values.append(bias)
    if rows:
        device = logits.device
        logits.index_put_((_index(rows, device), _index(cols, device)), torch.tensor(values, device=device),
                          accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, samplers: list[SequenceSampler]) -> None:
    rows, cols = [], []
    for i, s in enumerate(samplers):
        if len(s.output_ids) < s.params.min_tokens:
            rows += [i] * len(s._banned_early)
            cols += s._banned_early
    if rows:
        logits[_index(rows, logits.device), _index(cols, logits.device)] = float("-inf")


def _draw(logits: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """logits: [R, vocab] processed logits of rows that sample -> [R] token ids."""
    device, vocab = logits.device, logits.shape[1]
    params = [s.params for s in samplers]
    logits = logits / torch.tensor([[min(p.temperature, _HOTTEST)] for p in params], device=device)

    truncated = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if truncated:
        rows = _index(truncated, device)
        top_k = torch.tensor([min(params[j].top_k or vocab, vocab) for j in truncated], device=device)
        top_p = torch.tensor([params[j].top_p for j in truncated], device=device)
        logits[rows] = _top_k_top_p(logits[rows], top_k, top_p)

    probs = logits.softmax(dim=-1)  # [R, vocab]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([[p.min_p] for p in params], device=device)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0)

    q = torch.empty_like(probs)  # [R, vocab] Exp(1) noise
    unseeded = []
    for j, s in enumerate(samplers):
        generator = s.generator(device)
        if generator is None:
            unseeded.append(j)
        else:
            q[j].exponential_(generator=generator)
    if unseeded:
        q[_index(unseeded, device)] = torch.empty(len(unseeded), vocab, device=device).exponential_()
    # Exp(1) can round to 0, and 0 / 0 is NaN, which argmax would pick.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [R, vocab]; top_k: [R] in [1, vocab]; top_p: [R] in (0, 1] -> logits with the rest at -inf."""
    ranked, order = logits.sort(dim=-1, descending=True)  # [R, vocab]
    rank = torch.arange(logits.shape[1], device=logits.device)
    ranked = ranked.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = ranked.softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p: a token is out once the mass before it does (the most
    # likely token always stays)
    ranked = ranked.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ranked)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, samplers: list[SequenceSampler]) -> list[TokenLogprob | None]:
    wanted = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(samplers)
    if not wanted:
        return result
    rows = _index(wanted, logits.device)
    k = min(max(samplers[i].params.logprobs for i in wanted), logits.shape[1])
    entries = _gather_logprobs(torch.log_softmax(logits[rows], dim=-1), tokens[rows], k)
    for i, (token_id, logprob, top) in zip(wanted, entries):
        result[i] = TokenLogprob(token_id, logprob, top[:samplers[i].params.logprobs])
    return result


def _gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[tuple[int, float, list]]:
    """logprobs: [R, vocab]; tokens: [R] -> per row (token, its logprob, top-k [(token, logprob)])."""
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)  # [R, k], most likely first
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return list(zip(tokens.tolist(), chosen, top))


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """logits: [T, vocab] at the positions of prompt_ids (T = len(prompt_ids); T - 1 also works, the last row
    predicts a token that is not in the prompt) -> one entry per prompt token: None for the first (nothing
    predicts it), then the raw-logit logprob of prompt_ids[i] given prompt_ids[:i], with its top-k.

    For a prompt prefilled in chunks, call it per chunk with the chunk's logits [s:e] and prompt_ids[s:e + 1]
    and drop the leading None of every chunk but the first.
    """
    assert logits.dim() == 2 and logits.shape[0] in (len(prompt_ids), len(prompt_ids) - 1), \
        (tuple(logits.shape), len(prompt_ids))
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)  # [T - 1]
    logprobs = torch.log_softmax(logits[:len(prompt_ids) - 1].float(), dim=-1)  # [T - 1, vocab]
    entries = _gather_logprobs(logprobs, targets, min(k, logits.shape[1]))
    return [None] + [TokenLogprob(token_id, logprob, top) for token_id, logprob, top in entries]
