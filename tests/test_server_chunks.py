"""The per-token stream chunks written from a template are the objects pydantic writes for the same chunk."""

import json

import pytest

from server.chunk_json import ChunkTemplate
from server.protocol import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionChunk, Usage

TEXTS = ["a", "", " quick", 'say "hi"', "back\\slash", "line\nbreak\ttab\r", "\x00\x1f\x7f", "é中🙂", "\u2028"]
ENDS = [(None, None), ("stop", None), ("stop", "###"), ("stop", 2), ("length", None), ("abort", None)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish_reason, stop_reason", ENDS)
def test_completion_chunk_matches_pydantic(text, finish_reason, stop_reason):
    template = ChunkTemplate("text_completion", "cmpl-1f2e", 1764201600, 'model "é"')
    expected = CompletionChunk(id="cmpl-1f2e", created=1764201600, model='model "é"', usage=None, choices=[
        CompletionChoice(index=3, text=text, finish_reason=finish_reason, stop_reason=stop_reason)])
    written = template.completion(3, text, finish_reason, stop_reason)
    assert json.loads(written) == json.loads(expected.model_dump_json())
    assert list(json.loads(written)) == list(json.loads(expected.model_dump_json()))  # same key order


@pytest.mark.parametrize("text", [*TEXTS, None])
@pytest.mark.parametrize("finish_reason, stop_reason", ENDS)
def test_chat_chunk_matches_pydantic(text, finish_reason, stop_reason):
    template = ChunkTemplate("chat.completion.chunk", "chatcmpl-9", 1764201600, "tiny")
    expected = ChatCompletionChunk(id="chatcmpl-9", created=1764201600, model="tiny", choices=[
        ChatChunkChoice(index=1, delta=ChatDelta(content=text), finish_reason=finish_reason, stop_reason=stop_reason)])
    assert json.loads(template.chat(1, text, finish_reason, stop_reason)) == json.loads(expected.model_dump_json())


@pytest.mark.parametrize("object_name, chunk_type", [("text_completion", CompletionChunk),
                                                      ("chat.completion.chunk", ChatCompletionChunk)])
@pytest.mark.parametrize("model", ["tiny", 'model "é"\\\n\x01\x7f中🙂\u2028'])
def test_usage_chunk_is_the_bytes_pydantic_writes(object_name, chunk_type, model):
    template = ChunkTemplate(object_name, "cmpl-1f2e", 1764201600, model)
    expected = chunk_type(id="cmpl-1f2e", created=1764201600, model=model, choices=[],
                          usage=Usage(prompt_tokens=128, completion_tokens=7, total_tokens=135))
    assert template.usage(128, 7) == expected.model_dump_json()
