"""Server-sent events: `data: {json}` per chunk, `data: [DONE]` last.

An error after the stream began cannot change the status any more, so it goes out as one more data
event holding the error object, then [DONE]. Whatever ends the stream (the last chunk, an error, the
client leaving, which Starlette turns into a cancellation here) closes the Generation, and so frees
its slots.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.errors import APIError
from server.generation import Generation

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream(gen: Generation, chunks: AsyncIterator[str]) -> StreamingResponse:
    gen.stop_watching()  # from here Starlette listens for the disconnect and cancels this body
    return StreamingResponse(_events(gen, chunks), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(gen: Generation, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk}\n\n"
    except APIError as err:
        gen.status = err.status
        yield f"data: {err.body().model_dump_json()}\n\n"
    except Exception as err:  # a bug: still end the stream in the protocol's shape
        log.exception("stream %s failed", gen.id)
        gen.status = 500
        yield f"data: {APIError(500, f'internal error: {type(err).__name__}').body().model_dump_json()}\n\n"
    finally:
        gen.close()
    yield "data: [DONE]\n\n"
