"""Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

APIError is what route code raises; the handlers here also turn FastAPI's request-validation errors
(its 422 shape), Starlette's 404/405 and any unexpected exception into the same object.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.protocol import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

# status -> the OpenAI error type clients expect for it
_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 503: "service_unavailable_error"}

RETRY_AFTER_S = 1  # what a 503 tells clients to wait; the queue moves in steps of milliseconds


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        error_type = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_server_error")
        return ErrorResponse(error=ErrorBody(message=self.message, type=error_type, param=self.param,
                                             code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def from_validation(err: RequestValidationError) -> APIError:
    """pydantic's list of problems -> one 400 naming the first offending field."""
    problems, first_param = [], None
    for item in err.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        if item.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})")
            continue
        where = ".".join(loc)
        first_param = first_param or where or None
        problems.append(f"{where}: {item.get('msg')}" if where else _whole_body(item))
    # a union (like `prompt`) reports each alternative; the first few say enough
    message = "; ".join(dict.fromkeys(problems[:4])) or "invalid request"
    return bad_request(message, first_param)


def _whole_body(item: dict) -> str:
    """What is wrong with the body as a whole, in words that say what to do (pydantic's say "Field required" and
    "Input should be a valid dictionary or object to extract fields from"): `curl -d` without a JSON content type
    sends its JSON as a form, read as bytes."""
    kind = item.get("type")
    if kind == "missing":
        return "the request has no body: send a JSON object with Content-Type: application/json"
    if kind not in ("model_type", "model_attributes_type"):  # the body's own checks (a lone surrogate ...)
        return str(item.get("msg"))
    if isinstance(item.get("input"), (bytes, bytearray)):
        return "the body was not read as JSON: send it with Content-Type: application/json"
    return "the body must be a JSON object"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, err: RequestValidationError) -> JSONResponse:
        return from_validation(err).response()

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, err: HTTPException) -> JSONResponse:
        message = {404: "no such route", 405: "method not allowed on this route"}.get(err.status_code, str(err.detail))
        return APIError(err.status_code, message, headers=err.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(err).__name__}").response()
