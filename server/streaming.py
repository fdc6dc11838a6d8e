"""Server-sent events: `data: {json}` per chunk, `data: [DONE]` last.

An error after the stream began cannot change the status any more, so it goes out as one more data
event holding the error object, then [DONE]. Whatever ends the stream (the last chunk, an error, the
client leaving, which the Generation's watcher reports as ClientGone) closes the Generation, and so
frees its slots.

The response writes to the ASGI send itself, one body message per event. Starlette's StreamingResponse
costs more per response and per event than this server can spend with hundreds of streams at ~100
tokens/s each: a task group and a disconnect-listening task per response (the Generation already
watches the connection), and a type check and encode per chunk.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.errors import APIError
from server.generation import ClientGone, Generation

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"  # a stream's last event


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        # not Response.__init__: with no body it would announce content-length: 0
        self.status_code = 200
        self.background = None
        self.events = events
        self.init_headers(SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = b""
        try:
            async for data in self.events:
                if data is DONE:  # the last event goes out with the end of the body: one send (and write) less
                    last = data
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            await self.events.aclose()  # its own finally closes the Generation, even when this is cancelled
        await send({"type": "http.response.body", "body": last, "more_body": False})


def event_stream(gen: Generation, chunks: AsyncIterator[str]) -> EventStreamResponse:
    return EventStreamResponse(_events(gen, chunks))


async def _events(gen: Generation, chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk}\n\n".encode()
    except ClientGone:
        return  # nobody reads an end any more; closing marks the request 499
    except APIError as err:
        gen.status = err.status
        yield f"data: {err.body().model_dump_json()}\n\n".encode()
    except Exception as err:  # a bug: still end the stream in the protocol's shape
        log.exception("stream %s failed", gen.id)
        gen.status = 500
        yield f"data: {APIError(500, f'internal error: {type(err).__name__}').body().model_dump_json()}\n\n".encode()
    finally:
        gen.close()
    yield DONE
