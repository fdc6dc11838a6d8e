"""What the client hands back: typed results built from the server's JSON, and the one error type.

Every result keeps the JSON it was built from in `.raw`, so fields this module does not name (logprobs,
echo text ...) are still reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DeltaserveError(Exception):
    """The server's error object `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

    status is None when there was no HTTP status to report: the server could not be reached
    (type "connection_error"), or it sent the error inside a stream that had already begun.
    """

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status is not None else self.message

    @classmethod
    def from_body(cls, body: Any, status: int | None) -> DeltaserveError:
        """An error answer -> the exception; a body that is not the error object still gives a message."""
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            # one line, however the body was laid out (an HTML error page from a proxy, say)
            text = " ".join(str(body).split())[:200] if body else "no details"
            return cls(f"the server answered {status}: {text}", status=status)
        return cls(str(error.get("message", "no message")), status=status, type=error.get("type"),
                   param=error.get("param"), code=error.get("code"))


class DeltaserveConnectionError(DeltaserveError):
    """The server could not be reached, or did not answer in time."""

    def __init__(self, message: str):
        super().__init__(message, status=None, type="connection_error")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Usage | None:
        if data is None:
            return None
        return cls(data["prompt_tokens"], data["completion_tokens"], data["total_tokens"])


@dataclass(frozen=True)
class Choice:
    index: int
    text: str  # a completion's text, or a chat answer's message content
    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if one did


@dataclass(frozen=True)
class Completion:
    """A whole answer of /v1/completions or /v1/chat/completions."""

    id: str
    model: str
    choices: list[Choice]
    usage: Usage | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        choices = []
        for c in data["choices"]:
            text = c["message"]["content"] if "message" in c else c["text"]
            choices.append(Choice(c["index"], text or "", c.get("finish_reason"), c.get("stop_reason")))
        choices.sort(key=lambda c: c.index)
        return cls(data["id"], data["model"], choices, Usage.from_json(data.get("usage")), data)


@dataclass(frozen=True)
class Model:
    id: str
    created: int
    owned_by: str
    max_model_len: int | None


@dataclass(frozen=True)
class Tokens:
    """What /tokenize answers: the token ids and the server's context limit (None: no limit)."""

    tokens: list[int]
    max_model_len: int | None

    @property
    def count(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    max_model_len: int | None
