"""A small typed client for a deltaserve server (or any OpenAI-compatible one), over httpx.

    with Client("http://127.0.0.1:8000") as client:
        print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)
        for delta in client.stream_chat("Write a haiku", max_tokens=40, top_k=20):
            print(delta, end="", flush=True)

`AsyncClient` has the same methods as coroutines; its streams are async iterators. Sampling options
are keyword arguments (`Sampling` lists them, the OpenAI ones and deltaserve's extensions); anything
else the server accepts goes in `extra_body`. Every error answer is raised as DeltaserveError.
"""

from __future__ import annotations

from typing import Any, TypedDict

import httpx
from typing_extensions import Unpack

from clients.streams import AsyncTextStream, TextStream, connection_error
from clients.types import Completion, DeltaserveError, Model, TokenizerInfo, Tokens

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0

Messages = list[dict[str, Any]]


class Sampling(TypedDict, total=False):
    """Sampling options both generation routes take: OpenAI's, then deltaserve's extensions."""

    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[str, float]
    seed: int
    stop: str | list[str]
    top_k: int  # sample among the k most likely tokens; 0 = all
    min_p: float  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float  # > 1 discourages tokens already in the prompt or the output
    min_tokens: int  # no end-of-sequence or stop token before this many tokens
    stop_token_ids: list[int]
    ignore_eos: bool  # keep going past end-of-sequence (exact output lengths for benchmarks)
    skip_special_tokens: bool


SAMPLING_KEYS = frozenset(Sampling.__annotations__)


def _root(base_url: str) -> str:
    """The server root; an OpenAI-style base URL ending in /v1 is accepted too."""
    url = base_url.rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _generation_body(model: str | None, fixed: dict[str, Any], sampling: dict[str, Any],
                     extra_body: dict[str, Any] | None, stream: bool) -> dict[str, Any]:
    unknown = sorted(set(sampling) - SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; pass other fields in extra_body")
    body = {"model": model, **fixed, **sampling}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    body = {k: v for k, v in body.items() if v is not None}
    return body | (extra_body or {})


def _chat_messages(messages: str | Messages) -> Messages:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _error_from(response: httpx.Response) -> DeltaserveError:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return DeltaserveError.from_body(body, response.status_code)


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_from(response)
    return response.json()


class Client:
    """Blocking client. base_url is the server root (a trailing /v1 is fine); model=None lets the server
    pick its own; timeout is seconds per connect/read (or an httpx.Timeout)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, model: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = _root(base_url)
        self.model = model
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=_headers(api_key),
                                  transport=transport)

    def complete(self, prompt: str | list[int] | list[str] | list[list[int]], *, model: str | None = None,
                 max_tokens: int | None = 16, n: int | None = None, extra_body: dict[str, Any] | None = None,
                 **sampling: Unpack[Sampling]) -> Completion:
        body = _generation_body(model or self.model, {"prompt": prompt, "max_tokens": max_tokens, "n": n},
                                dict(sampling), extra_body, stream=False)
        return Completion.from_json(self._post("/v1/completions", body))

    def stream_complete(self, prompt: str | list[int], *, model: str | None = None, max_tokens: int | None = 16,
                        extra_body: dict[str, Any] | None = None, **sampling: Unpack[Sampling]) -> TextStream:
        body = _generation_body(model or self.model, {"prompt": prompt, "max_tokens": max_tokens},
                                dict(sampling), extra_body, stream=True)
        return TextStream(self._open_stream("/v1/completions", body), self.base_url)

    def chat(self, messages: str | Messages, *, model: str | None = None, max_tokens: int | None = None,
             n: int | None = None, extra_body: dict[str, Any] | None = None,
             **sampling: Unpack[Sampling]) -> Completion:
        body = _generation_body(model or self.model, {"messages": _chat_messages(messages),
                                                      "max_tokens": max_tokens, "n": n},
                                dict(sampling), extra_body, stream=False)
        return Completion.from_json(self._post("/v1/chat/completions", body))

    def stream_chat(self, messages: str | Messages, *, model: str | None = None, max_tokens: int | None = None,
                    extra_body: dict[str, Any] | None = None, **sampling: Unpack[Sampling]) -> TextStream:
        body = _generation_body(model or self.model, {"messages": _chat_messages(messages), "max_tokens": max_tokens},
                                dict(sampling), extra_body, stream=True)
        return TextStream(self._open_stream("/v1/chat/completions", body), self.base_url)

    def tokenize(self, prompt: str | None = None, *, messages: Messages | None = None,
                 add_special_tokens: bool = True) -> Tokens:
        body = {"model": self.model, "prompt": prompt, "messages": messages, "add_special_tokens": add_special_tokens}
        data = self._post("/tokenize", {k: v for k, v in body.items() if v is not None})
        return Tokens(data["tokens"], data.get("max_model_len"))

    def detokenize(self, tokens: list[int]) -> str:
        body = {"model": self.model, "tokens": tokens}
        return self._post("/detokenize", {k: v for k, v in body.items() if v is not None})["prompt"]

    def models(self) -> list[Model]:
        return [Model(m["id"], m.get("created", 0), m.get("owned_by", ""), m.get("max_model_len"))
                for m in self._get("/v1/models")["data"]]

    def tokenizer_info(self) -> TokenizerInfo:
        d = self._get("/tokenizer_info")
        return TokenizerInfo(d["vocab_size"], d.get("eos_token_ids", []), d.get("bos_token_id"), d.get("max_model_len"))

    def health(self) -> bool:
        """True when the server answers /health with 200; False when it is draining or cannot be reached."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str) -> Any:
        try:
            return _json(self._http.get(path))
        except httpx.TransportError as err:
            raise connection_error(err, self.base_url) from None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return _json(self._http.post(path, json=body))
        except httpx.TransportError as err:
            raise connection_error(err, self.base_url) from None

    def _open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Send the request and check its status; errors before the first event are plain HTTP errors."""
        try:
            response = self._http.send(self._http.build_request("POST", path, json=body), stream=True)
            if response.status_code >= 400:
                response.read()
                response.close()
                raise _error_from(response)
        except httpx.TransportError as err:
            raise connection_error(err, self.base_url) from None
        return response


class AsyncClient:
    """The asyncio twin of Client: the same methods, awaited; `await stream_*()` gives an AsyncTextStream."""

    def __init__(self, base_url: str = DEFAULT_URL, *, model: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S, api_key: str | None = None,
                 max_connections: int = 100, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = _root(base_url)
        self.model = model
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=_headers(api_key),
                                       limits=limits, transport=transport)

    async def complete(self, prompt: str | list[int] | list[str] | list[list[int]], *, model: str | None = None,
                       max_tokens: int | None = 16, n: int | None = None, extra_body: dict[str, Any] | None = None,
                       **sampling: Unpack[Sampling]) -> Completion:
        body = _generation_body(model or self.model, {"prompt": prompt, "max_tokens": max_tokens, "n": n},
                                dict(sampling), extra_body, stream=False)
        return Completion.from_json(await self._post("/v1/completions", body))

    async def stream_complete(self, prompt: str | list[int], *, model: str | None = None,
                              max_tokens: int | None = 16, extra_body: dict[str, Any] | None = None,
                              **sampling: Unpack[Sampling]) -> AsyncTextStream:
        body = _generation_body(model or self.model, {"prompt": prompt, "max_tokens": max_tokens},
                                dict(sampling), extra_body, stream=True)
        return AsyncTextStream(await self._open_stream("/v1/completions", body), self.base_url)

    async def chat(self, messages: str | Messages, *, model: str | None = None, max_tokens: int | None = None,
                   n: int | None = None, extra_body: dict[str, Any] | None = None,
                   **sampling: Unpack[Sampling]) -> Completion:
        body = _generation_body(model or self.model, {"messages": _chat_messages(messages),
                                                      "max_tokens": max_tokens, "n": n},
                                dict(sampling), extra_body, stream=False)
        return Completion.from_json(await self._post("/v1/chat/completions", body))

    async def stream_chat(self, messages: str | Messages, *, model: str | None = None,
                          max_tokens: int | None = None, extra_body: dict[str, Any] | None = None,
                          **sampling: Unpack[Sampling]) -> AsyncTextStream:
        body = _generation_body(model or self.model, {"messages": _chat_messages(messages), "max_tokens": max_tokens},
                                dict(sampling), extra_body, stream=True)
        return AsyncTextStream(await self._open_stream("/v1/chat/completions", body), self.base_url)

    async def tokenize(self, prompt: str | None = None, *, messages: Messages | None = None,
                       add_special_tokens: bool = True) -> Tokens:
        body = {"model": self.model, "prompt": prompt, "messages": messages, "add_special_tokens": add_special_tokens}
        data = await self._post("/tokenize", {k: v for k, v in body.items() if v is not None})
        return Tokens(data["tokens"], data.get("max_model_len"))

    async def detokenize(self, tokens: list[int]) -> str:
        body = {"model": self.model, "tokens": tokens}
        return (await self._post("/detokenize", {k: v for k, v in body.items() if v is not None}))["prompt"]

    async def models(self) -> list[Model]:
        return [Model(m["id"], m.get("created", 0), m.get("owned_by", ""), m.get("max_model_len"))
                for m in (await self._get("/v1/models"))["data"]]

    async def tokenizer_info(self) -> TokenizerInfo:
        d = await self._get("/tokenizer_info")
        return TokenizerInfo(d["vocab_size"], d.get("eos_token_ids", []), d.get("bos_token_id"), d.get("max_model_len"))

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _get(self, path: str) -> Any:
        try:
            return _json(await self._http.get(path))
        except httpx.TransportError as err:
            raise connection_error(err, self.base_url) from None

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return _json(await self._http.post(path, json=body))
        except httpx.TransportError as err:
            raise connection_error(err, self.base_url) from None

    async def _open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await self._http.send(self._http.build_request("POST", path, json=body), stream=True)
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise _error_from(response)
        except httpx.TransportError as err:
            raise connection_error(err, self.base_url) from None
        return response
