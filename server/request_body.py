"""A POST route's JSON body -> its protocol model, with the same answers as a FastAPI body parameter, faster.

FastAPI reads the body, parses its content type, json.loads it into dicts and lists, and validates those,
which runs our lone-surrogate check over all of it: ~70 us for a 128-token-id prompt, paid on the event
loop by every request before its handler starts (a burst of 256 requests queues for tens of milliseconds).
pydantic's own JSON parser validates the bytes in one pass in ~16 us, and refuses lone surrogates itself,
so the check has nothing to find there. A body it accepts is taken as it comes; any other body goes
FastAPI's way (read_slowly), so that what is wrong with it is told in the same words, with the same status,
as before; that includes JSON only Python's parser accepts (a lone surrogate, a UTF-8 BOM, deep nesting).
Routes that parse their body here declare it in OpenAPI with openapi_body(). A body over the server's
limit (--max-request-bytes) is refused with a 413 before more of it is read.
"""

from __future__ import annotations

import email.message
import functools
import json
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from server.errors import APIError
from server.protocol import PARSED_FROM_JSON

Model = TypeVar("Model", bound=BaseModel)
COMPONENTS = "#/components/schemas/{model}"
# The default limit on a request body (--max-request-bytes): what one request may make the server hold before
# anything about it is checked; a prompt far beyond any model's context fits in it.
MAX_REQUEST_BYTES = 64 * 2**20


async def read_body(request: Request, model: type[Model], max_bytes: int = MAX_REQUEST_BYTES) -> Model:
    """The validated body; APIError(413) when it is over max_bytes, else RequestValidationError or
    HTTPException(400) as FastAPI raises them."""
    try:
        body = await _read_at_most(request, max_bytes)
    except ClientDisconnect as err:  # it left while sending the body: FastAPI's 400 (nobody reads it), not a 500
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from err
    content_type = request.headers.get("content-type")
    is_json = content_type is not None and _is_json(content_type)
    if is_json:
        try:
            return model.model_validate_json(body, context=PARSED_FROM_JSON)
        except ValidationError:
            pass  # read_slowly says what is wrong, or takes what only Python's JSON parser accepts
    return read_slowly(body, is_json, model)


async def _read_at_most(request: Request, max_bytes: int) -> bytes:
    """The whole body, or APIError(413) as soon as it is known to be over max_bytes: from its Content-Length
    before any of it is read, else by counting what arrives (a chunked body has no length to check, and the
    count holds whatever the header said)."""
    declared = _content_length(request)
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _content_length(request: Request) -> int | None:
    """None when there is none, or none int() reads (uvicorn refuses malformed ones; the count still holds)."""
    header = request.headers.get("content-length")
    try:
        return None if header is None else int(header)
    except ValueError:
        return None


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {max_bytes} bytes (--max-request-bytes)")


def read_slowly(body: bytes, is_json: bool, model: type[Model]) -> Model:
    """What FastAPI 0.165 does with a body parameter: the body parsed as JSON when its content type says so
    (else validated as bytes, which fails), an empty body is a missing one."""
    value = body
    if body and is_json:
        try:
            value = json.loads(body)
        except json.JSONDecodeError as err:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": err.msg}}], body=err.doc) from err
        except Exception as err:  # not UTF-8, too deeply nested
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from err
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return model.model_validate(value, from_attributes=True)
    except ValidationError as err:
        raise RequestValidationError([{**item, "loc": ("body", *item["loc"])}
                                      for item in err.errors(include_url=False)], body=value) from None


@functools.lru_cache(maxsize=64)
def _is_json(content_type: str) -> bool:
    """FastAPI's test: application/json or application/*+json, parameters and case as email parses them."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def openapi_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that reads its body with read_body: the request body FastAPI would have
    declared for a `body: model` parameter (the model's schema is added to components by the app)."""
    schema = {"$ref": COMPONENTS.format(model=model.__name__)}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}
