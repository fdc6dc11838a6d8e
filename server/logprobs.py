"""Engine logprobs (TokenLogprob: token id, logprob, top-k pairs) -> the two OpenAI shapes.

Completions use the legacy parallel lists (tokens, token_logprobs, top_logprobs dicts, text_offset); a
position without a logprob (the first prompt token) is null in both lists, which lm-eval relies on.
Chat uses a list of {token, logprob, bytes, top_logprobs}. -inf (a banned token) becomes -9999.0, as
JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from engine.sampling import TokenLogprob
from engine.tokenizer import Tokenizer
from server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

_FLOOR = -9999.0


class TokenTexts:
    """Token id -> its text on its own (special tokens included), cached."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=1 << 16)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def _clamp(logprob: float) -> float:
    return max(logprob, _FLOOR)


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], texts: TokenTexts,
                        offset: int, into: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Append one position per token to `into` (or a new object); offsets count characters from `offset`."""
    out = into or CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = texts.text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {texts.text(i): _clamp(lp) for i, lp in entry.top}
        top.setdefault(token, _clamp(entry.logprob))  # the chosen token is always listed, as in vLLM
        out.token_logprobs.append(_clamp(entry.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        token = texts.text(token_id)
        return TopLogprob(token=token, logprob=_clamp(logprob), bytes=list(token.encode("utf-8")))

    content = []
    for entry in entries:
        chosen = top(entry.token_id, entry.logprob)
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[top(i, lp) for i, lp in entry.top]))
    return ChatLogprobs(content=content)
