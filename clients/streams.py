"""Streamed answers: server-sent events -> text deltas, as a sync or an async iterator.

A stream reads one choice (the client never asks for n > 1 when streaming). An error event inside the
stream is raised as DeltaserveError with status None: the HTTP status was 200 when the stream began.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx

from clients.types import DeltaserveConnectionError, DeltaserveError, Usage


def connection_error(err: httpx.TransportError, url: str) -> DeltaserveConnectionError:
    if isinstance(err, httpx.TimeoutException):
        return DeltaserveConnectionError(f"no answer from the server at {url} in time ({type(err).__name__})")
    return DeltaserveConnectionError(f"cannot reach the server at {url} ({err or type(err).__name__})")


class StreamReader:
    """Server-sent events of one choice -> text deltas, collecting id, finish reason and usage on the way."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.usage: Usage | None = None
        self.parts: list[str] = []
        self.done = False

    def feed(self, line: str) -> str | None:
        """One line of the event stream -> the text it adds, if any."""
        if not line.startswith("data:"):
            return None
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:  # the stream had begun, so the status is no longer meaningful
            raise DeltaserveError.from_body(event, None)
        self.id, self.model = event.get("id", self.id), event.get("model", self.model)
        if event.get("usage"):
            self.usage = Usage.from_json(event["usage"])
        text = ""
        for choice in event.get("choices", []):
            delta = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            text += delta or ""
            if choice.get("finish_reason") is not None:
                self.finish_reason, self.stop_reason = choice["finish_reason"], choice.get("stop_reason")
        if text:
            self.parts.append(text)
        return text or None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class TextStream(StreamReader):
    """Iterate for text deltas as they arrive; afterwards .text, .finish_reason and .usage hold the totals.

    Closing it early (`with`, `break` then .close()) closes the connection, which aborts the request."""

    def __init__(self, response: httpx.Response, url: str):
        super().__init__()
        self._response = response
        self._url = url

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                delta = self.feed(line)
                if delta is not None:
                    yield delta
                if self.done:
                    break
        except httpx.TransportError as err:
            raise connection_error(err, self._url) from None
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextStream(StreamReader):
    """The async twin of TextStream: `async for delta in stream`."""

    def __init__(self, response: httpx.Response, url: str):
        super().__init__()
        self._response = response
        self._url = url

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                delta = self.feed(line)
                if delta is not None:
                    yield delta
                if self.done:
                    break
        except httpx.TransportError as err:
            raise connection_error(err, self._url) from None
        finally:
            await self.close()

    async def close(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
