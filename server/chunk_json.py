"""The JSON of the stream chunks sent once per token: a choice's text delta, without logprobs.

The same object that pydantic's model_dump_json writes for CompletionChunk / ChatCompletionChunk (same
keys, same order, same null fields, non-ASCII text as UTF-8), from a template made once per response:
only the text is escaped per chunk. With hundreds of streams this is the hottest code in the server,
and building and dumping a pydantic model per token costs several times more. The usage chunk, once
per stream, is written here too; chunks with logprobs and the role chunk still go through pydantic.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # a JSON string literal, non-ASCII kept as is (C-accelerated)


def _value(value: str | int | None) -> str:
    """finish_reason or stop_reason: null, a string, or a stop token id."""
    if value is None:
        return "null"
    return encode_basestring(value) if isinstance(value, str) else json.dumps(value)


class ChunkTemplate:
    def __init__(self, object_name: str, chunk_id: str, created: int, model: str):
        self._choices = (f'{{"id":{encode_basestring(chunk_id)},"object":{encode_basestring(object_name)},'
                         f'"created":{int(created)},"model":{encode_basestring(model)},"choices":[')
        self._head = f'{self._choices}{{"index":'

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The stream's last chunk when include_usage is asked for: no choices, the usage."""
        return (f'{self._choices}],"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},'
                f'"total_tokens":{prompt_tokens + completion_tokens}}}}}')

    def completion(self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """A CompletionChunk with one CompletionChoice (logprobs null) and no usage."""
        return (f'{self._head}{index},"text":{encode_basestring(text)},"logprobs":null,'
                f'"finish_reason":{_value(finish_reason)},"stop_reason":{_value(stop_reason)}}}],"usage":null}}')

    def chat(self, index: int, content: str | None, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """A ChatCompletionChunk with one ChatChunkChoice whose delta holds only content (or nothing)."""
        delta = f'{{"content":{encode_basestring(content)}}}' if content is not None else "{}"
        return (f'{self._head}{index},"delta":{delta},"logprobs":null,'
                f'"finish_reason":{_value(finish_reason)},"stop_reason":{_value(stop_reason)}}}],"usage":null}}')
