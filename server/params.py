"""Request bodies -> what the engine takes: token-id prompts and SamplingParams.

Every user mistake found here is an APIError(400) naming the field, before anything reaches the engine.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import fields

from engine.errors import ContextLengthExceeded, InvalidPrompt, TooManyChoices
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from server.errors import APIError, bad_request
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

# max_tokens when a chat request names none and the model has no context limit (pure Gated DeltaNet)
UNBOUNDED_DEFAULT_MAX_TOKENS = 4096
_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}
# apply_chat_template's named arguments (self, messages, ...): chat_template_kwargs naming one is a TypeError there
_TEMPLATE_ARGUMENTS = {name for name, p in inspect.signature(Tokenizer.apply_chat_template).parameters.items()
                       if p.kind is not p.VAR_KEYWORD}


def completion_prompts(request: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """The four prompt shapes (str, [str], [ids], [[ids]]) -> a list of token-id prompts."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [tokenizer.encode(text) for text in prompt]
    return [list(ids) for ids in prompt]


def chat_prompt(messages: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                extra: dict | None = None) -> list[int]:
    """Render the messages with the chat template; the template writes any special tokens itself."""
    if not messages:
        raise bad_request("messages is empty", "messages")
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.type == "text" and part.text is None:  # else the template's check says "only text parts"
                raise bad_request(f"messages[{i}].content[{j}]: a text part needs its text", "messages")
    try:
        text = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in messages],
                                             add_generation_prompt=add_generation_prompt, **(extra or {}))
    except ValueError as err:
        raise bad_request(str(err), "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def chat_request_prompt(request: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    extra = dict(request.chat_template_kwargs or {})
    taken = sorted(_TEMPLATE_ARGUMENTS & extra.keys())
    if taken:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(taken)}: the request's own fields do",
                          "chat_template_kwargs")
    if request.tools is not None:
        extra["tools"] = request.tools
    return chat_prompt(request.messages, tokenizer, request.add_generation_prompt, extra)


def completion_params(request: CompletionRequest, prompt_len: int, max_model_len: int | None) -> SamplingParams:
    if request.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if request.echo and request.max_tokens == 0:
        raise bad_request("max_tokens=0 with echo is not supported yet; use max_tokens=1", "max_tokens")
    logprobs = request.logprobs
    return _sampling(request, _max_tokens(request.max_tokens, prompt_len, max_model_len), logprobs,
                     prompt_logprobs=logprobs if request.echo and logprobs is not None else None)


def chat_params(request: ChatCompletionRequest, prompt_len: int, max_model_len: int | None) -> SamplingParams:
    fmt = (request.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format {fmt!r} is not supported; only 'text'", "response_format")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _sampling(request, _max_tokens(asked, prompt_len, max_model_len), logprobs)


def _max_tokens(asked: int | None, prompt_len: int, max_model_len: int | None) -> int:
    if asked is not None:
        return asked
    if max_model_len is None:
        return UNBOUNDED_DEFAULT_MAX_TOKENS
    return max(max_model_len - prompt_len, 1)  # if nothing is left, the engine's length check says so


def _sampling(request: SamplingFields, max_tokens: int, logprobs: int | None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        # not isdigit(): "²" is a digit that int() refuses, as it refuses more than 4300 digits
        if not re.fullmatch(r"-?[0-9]{1,100}", key):
            raise bad_request(f"logit_bias keys must be token ids, got {key[:100]!r}", "logit_bias")
        bias[int(key)] = value
    try:
        return SamplingParams(
            n=request.n, max_tokens=max_tokens, min_tokens=request.min_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0, min_p=request.min_p or 0.0,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            logit_bias=tuple(bias.items()), seed=request.seed, stop=tuple(stop),
            stop_token_ids=tuple(request.stop_token_ids or ()), ignore_eos=request.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=request.skip_special_tokens,
        )
    except ValueError as err:
        raise engine_error(err) from None


def engine_error(err: ValueError, prompt_param: str = "prompt") -> APIError:
    """The engine's ValueErrors (their messages are the engine's own) with the param at fault: the prompt's
    field (prompt_param) for a prompt it cannot run, and for a request beyond the context, which is OpenAI's
    context_length_exceeded; n for too many choices; else the SamplingParams field the message starts with."""
    message = str(err)
    if isinstance(err, ContextLengthExceeded):
        return APIError(400, message, prompt_param, code="context_length_exceeded")
    if isinstance(err, InvalidPrompt):
        return bad_request(message, prompt_param)
    if isinstance(err, TooManyChoices):
        return bad_request(message, "n")
    first = message.split(" ", 1)[0]
    return bad_request(message, first if first in _PARAM_FIELDS else None)
