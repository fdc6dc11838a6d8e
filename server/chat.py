"""/v1/chat/completions answers, whole or as stream chunks, from a running Generation.

A stream opens each choice with a delta carrying only the role, then content deltas; a choice's last
chunk carries its finish_reason.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from server.chunk_json import ChunkTemplate
from server.generation import Generation
from server.logprobs import chat_logprobs
from server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, ChatDelta, ChatResponseMessage, Usage)


class ChatWriter:
    def __init__(self, gen: Generation, request: ChatCompletionRequest):
        self.gen = gen
        self.request = request
        self.texts = gen.state.texts
        self.created = int(time.time())
        self.template = ChunkTemplate("chat.completion.chunk", gen.id, self.created, gen.state.model_name)

    def usage(self) -> Usage:
        prompt, completion = self.gen.prompt_tokens, self.gen.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def response(self) -> ChatCompletionResponse:
        choices = []
        for choice in await self.gen.collect():
            logprobs = chat_logprobs(choice.logprobs, self.texts) if choice.logprobs is not None else None
            choices.append(ChatChoice(index=choice.index, message=ChatResponseMessage(content=choice.text),
                                      logprobs=logprobs, finish_reason=choice.finish_reason,
                                      stop_reason=choice.stop_reason))
        return ChatCompletionResponse(id=self.gen.id, created=self.created, model=self.gen.state.model_name,
                                      choices=choices, usage=self.usage())

    async def chunks(self) -> AsyncIterator[str]:
        for index in range(self.gen.params.n):
            role = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            yield self._chunk([role]).model_dump_json()
        async for _prompt_index, output in self.gen.outputs():
            for delta in output.outputs:
                if delta.logprobs is None:
                    if delta.text or delta.finish_reason is not None:
                        yield self.template.chat(delta.index, delta.text or None, delta.finish_reason,
                                                 delta.stop_reason)
                    continue
                logprobs = chat_logprobs(delta.logprobs, self.texts)
                choice = ChatChunkChoice(index=delta.index, delta=ChatDelta(content=delta.text or None),
                                         logprobs=logprobs, finish_reason=delta.finish_reason,
                                         stop_reason=delta.stop_reason)
                yield self._chunk([choice]).model_dump_json()
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            yield self.template.usage(self.gen.prompt_tokens, self.gen.completion_tokens)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.gen.id, created=self.created, model=self.gen.state.model_name,
                                   choices=choices, usage=usage)
