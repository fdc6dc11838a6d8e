"""The OpenAI wire format as pydantic models: what clients send and what the server answers.

Requests ignore fields they do not know (clients send `user`, `store`, vendor extras ...), so that
unmodified clients work; fields that are known but unsupported are refused in server/params.py.
Response models exist for the OpenAPI schema and for building answers with named fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo,
                      model_serializer, model_validator)
from pydantic_core import PydanticUseDefault

_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str only as a lone one: JSON pairs decode to one code point
TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


def _null_is_default(value: Any) -> Any:
    if value is None:
        raise PydanticUseDefault()
    return value


def _default_if_null(kind: type) -> Any:
    return Annotated[kind, BeforeValidator(_null_is_default, json_schema_input_type=kind | None)]


# Fields that OpenAI's API declares nullable and that have a default here: null is the default, as there.
# Clients send null for "not given" (the openai client does for any argument passed as None).
IntOrNull = _default_if_null(int)
FloatOrNull = _default_if_null(float)
BoolOrNull = _default_if_null(bool)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Validation context of a body that pydantic parsed from JSON bytes: its parser refuses lone surrogates itself.
PARSED_FROM_JSON = {"parsed_from_json": True}


class _Body(_Request):
    """A whole request body. JSON may spell a lone surrogate ("\\udc00"): valid JSON, but no text, so no
    tokenizer takes it and no UTF-8 answer can echo it; refused here, wherever in the body it is."""

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context is PARSED_FROM_JSON:  # nothing to look for, and the walk costs ~35 us a 128-id prompt
            return data
        where = _lone_surrogate(data, "")
        if where is not None:
            raise ValueError(f"{where or 'the body'} holds a lone surrogate (\\ud800-\\udfff), which is not text")
        return data


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) in a parsed JSON value that is not valid Unicode text."""
    if isinstance(value, str):
        return None if value.isascii() or not _SURROGATE.search(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return f"a key in {path or 'the body'}"
        found = _lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found is not None:
            return found
    return None


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Body):
    """Sampling fields shared by both generation routes (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: IntOrNull = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: FloatOrNull = 0.0
    frequency_penalty: FloatOrNull = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: BoolOrNull = False
    stream_options: StreamOptions | None = None
    best_of: int | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    echo: BoolOrNull = False
    logprobs: int | None = None
    suffix: str | None = None


class ContentPart(_Request):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id ... reach the template
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: BoolOrNull = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: TokenIds


# ---- responses --------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _skip_unset(self, handler: Any) -> dict[str, Any]:
        # a delta names only what it carries: {"role": ...} first, then {"content": ...}, then {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    vocab_size: int
    eos_token: str | None
    eos_token_ids: list[int]
    bos_token: str | None
    bos_token_id: int | None
    max_model_len: int | None
    chat_template: str | None


class VersionResponse(BaseModel):
    version: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
