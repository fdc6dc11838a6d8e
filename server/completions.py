"""/v1/completions answers, whole or as stream chunks, from a running Generation.

Choice i*n + j is choice j of prompt i. With echo, a choice's text starts with its prompt (as sent, or
decoded when sent as token ids) and, with logprobs, its logprob lists start with the prompt's tokens,
the first of them null. text_offset counts characters of the choice's returned text.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from server.chunk_json import ChunkTemplate
from server.generation import Generation
from server.logprobs import completion_logprobs
from server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                             CompletionResponse, Usage)


class CompletionWriter:
    def __init__(self, gen: Generation, request: CompletionRequest):
        self.gen = gen
        self.request = request
        self.texts = gen.state.texts
        self.want_logprobs = request.logprobs is not None
        self.created = int(time.time())
        self.template = ChunkTemplate("text_completion", gen.id, self.created, gen.state.model_name)
        self.echo_texts: list[str] | None = None
        if request.echo:
            prompt = request.prompt
            if isinstance(prompt, str):
                self.echo_texts = [prompt]
            elif prompt and isinstance(prompt[0], str):
                self.echo_texts = list(prompt)
            else:
                decode = gen.state.tokenizer.decode
                self.echo_texts = [decode(ids, skip_special_tokens=False) for ids in gen.prompts]

    def usage(self) -> Usage:
        prompt, completion = self.gen.prompt_tokens, self.gen.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def response(self) -> CompletionResponse:
        choices = []
        for choice in await self.gen.collect():
            text, logprobs = self._echo(choice.prompt_index)
            if self.want_logprobs:
                logprobs = completion_logprobs(choice.token_ids, choice.logprobs or [], self.texts, len(text),
                                               into=logprobs)
            choices.append(CompletionChoice(index=choice.index, text=text + choice.text, logprobs=logprobs,
                                            finish_reason=choice.finish_reason, stop_reason=choice.stop_reason))
        return CompletionResponse(id=self.gen.id, created=self.created, model=self.gen.state.model_name,
                                  choices=choices, usage=self.usage())

    async def chunks(self) -> AsyncIterator[str]:
        """One JSON chunk per choice that advanced, then the usage chunk when asked for."""
        n = self.gen.params.n
        sent: dict[int, int] = {}  # choice index -> characters sent so far
        async for prompt_index, output in self.gen.outputs():
            for delta in output.outputs:
                index = prompt_index * n + delta.index
                text, logprobs = ("", None) if index in sent else self._echo(prompt_index)
                offset = sent.get(index, 0) + len(text)
                if self.want_logprobs:
                    logprobs = completion_logprobs(delta.token_ids, delta.logprobs or [], self.texts, offset,
                                                   into=logprobs)
                text += delta.text
                sent[index] = sent.get(index, 0) + len(text)
                if logprobs is None:
                    if text or delta.finish_reason is not None:
                        yield self.template.completion(index, text, delta.finish_reason, delta.stop_reason)
                    continue
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
                yield self._chunk([choice]).model_dump_json()
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            yield self.template.usage(self.gen.prompt_tokens, self.gen.completion_tokens)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.gen.id, created=self.created, model=self.gen.state.model_name,
                               choices=choices, usage=usage)

    def _echo(self, prompt_index: int) -> tuple[str, CompletionLogprobs | None]:
        """The prompt part of a choice: its text, and its logprobs when both echo and logprobs are on."""
        if self.echo_texts is None:
            return "", None
        text = self.echo_texts[prompt_index]
        if not self.want_logprobs:
            return text, None
        ids = self.gen.prompts[prompt_index]
        entries = self.gen.tracks[prompt_index].prompt_logprobs or [None] * len(ids)
        return text, completion_logprobs(ids, entries, self.texts, 0)
