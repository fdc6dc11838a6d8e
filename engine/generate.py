"""One request, start to finish: prefill the prompt, then decode token by token carrying the
model's state. The batched engine replaces this for serving; it stays as the simplest correct path
(and the `deltaserve generate` command)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.loader import LoadedModel
from engine.sampling import SamplingParams, SequenceSampler, sample_batch
from engine.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class GenerationStep:
    token_id: int
    text: str  # newly completed text (may be empty while a multi-byte character is incomplete)
    finish_reason: str | None  # "stop" (EOS or a stop token id), "length" (max_tokens), or None while going on


def prompt_ids(loaded: LoadedModel, prompt: str | list[int]) -> list[int]:
    ids = loaded.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    vocab = loaded.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")
    return ids


@torch.inference_mode()
def generate(loaded: LoadedModel, prompt: str | list[int], params: SamplingParams) -> Iterator[GenerationStep]:
    """Yields one step per generated token; the last one carries the finish reason."""
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = prompt_ids(loaded, prompt)
    limit = loaded.config.max_position_embeddings
    if limit is not None and len(ids) + params.max_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                         f"model's context of {limit} tokens")
    device = model.embed.device
    sampler = SequenceSampler(params, ids, tokenizer.eos_token_ids, loaded.config.vocab_size)
    detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
    state = model.new_state()
    hidden = model.run(torch.tensor(ids, device=device), state)[-1:]
    for produced in range(1, params.max_tokens + 1):
        token = sample_batch(model.logits(hidden), [sampler]).token_ids[0]
        sampler.append(token)
        finish = None
        if (token in tokenizer.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            finish = "stop"
        elif produced == params.max_tokens:
            finish = "length"
        text = detok.add(token) if finish != "stop" else ""
        if finish is not None:
            text += detok.flush()
            yield GenerationStep(token, text, finish)
            return
        yield GenerationStep(token, text, None)
        hidden = model.run(torch.tensor([token], device=device), state)
