"""server/request_body.py: a route that reads its body with read_body answers every body exactly as the same
route with a FastAPI body parameter does (status, error object, the value it validated), and documents the
same request body in OpenAPI."""

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient

from server import errors
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.request_body import openapi_body, read_body

OK = {"prompt": "a", "messages": [{"role": "user", "content": "b"}], "max_tokens": 1}


def _body(**fields) -> bytes:
    return json.dumps({**OK, **fields}).encode()


def _nested(depth: int) -> bytes:
    return _body()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


BODIES = [
    b"", b"{", b"null", b"[]", b"123", b'"text"', b"\xff\xfe\x00garbage", b'{"max_tokens": 1,', _body(),
    _body(prompt=[1, 2, 3]), _body(prompt=[[1], [2, 3]]), _body(prompt=[1.5]), _body(prompt=[True]),
    _body(prompt=["a", 1]), _body(prompt={}), _body(max_tokens="many"), _body(max_tokens="3"), _body(max_tokens=1.0),
    _body(max_tokens=1.5), _body(max_tokens=10**30), _body(n=-3, top_p=0), _body(stream="yes"), _body(stream=2),
    _body(stop_token_ids=[1.0]), _body(logit_bias={"5": "x"}), _body(stream_options={"include_usage": "1"}),
    _body(messages=[]), _body(messages=[{"content": "no role"}]), _body(messages=[{"role": "user", "content": 5}]),
    _body(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "more": [1]}]}], tools=[1]),
    _body(model=7), _body(temperature=float("nan")), _body(temperature=float("inf")), _body(unknown={"x": [1]}),
    # lone surrogates, spelled as escapes or as (invalid) UTF-8 bytes: only Python's JSON parser reads them
    _body(prompt="\udc00"), _body(extra={"k\ud800": 1}), b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}',
    _body(prompt="\U0001F600"),
    # JSON that only Python's parser takes (a BOM, UTF-16, deep nesting), or that neither takes
    b"\xef\xbb\xbf" + _body(), json.dumps(OK).encode("utf-16"), _nested(400), _nested(5000), _body() + b" x",
    b'{"prompt": "a\nb"}',
    b'{"prompt": "a", "prompt": [5], "max_tokens": 1, "max_tokens": 2}', b'{"prompt": [1], "temperature": NaN}',
]
CONTENT_TYPES = ["application/json", None, "text/plain", "application/json; charset=utf-8", "APPLICATION/JSON",
                 "application/vnd.api+json", "application/json-patch", "multipart/form-data; boundary=x", ""]


def _apps(model) -> tuple[TestClient, TestClient]:
    """The same route twice: with FastAPI's body parameter, and reading its body with read_body."""
    fastapi_way, ours = FastAPI(), FastAPI()
    for app in (fastapi_way, ours):
        errors.install(app)

    @fastapi_way.post("/")
    async def with_parameter(body: model):
        return PlainTextResponse(repr(body))  # every value as it was validated, NaN included

    @ours.post("/", openapi_extra=openapi_body(model))
    async def with_read_body(raw: Request):
        return PlainTextResponse(repr(await read_body(raw, model)))

    return TestClient(fastapi_way), TestClient(ours)


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_read_body_answers_every_body_as_a_fastapi_body_parameter_does(model):
    fastapi_way, ours = _apps(model)
    answered = set()
    for body in BODIES:
        for content_type in CONTENT_TYPES:
            headers = {} if content_type is None else {"content-type": content_type}
            expected = fastapi_way.post("/", content=body, headers=headers)
            got = ours.post("/", content=body, headers=headers)
            assert (got.status_code, got.text) == (expected.status_code, expected.text), (body[:80], content_type)
            answered.add(got.status_code)
    assert answered == {200, 400}


def test_read_body_routes_declare_the_request_body_fastapi_would():
    fastapi_way, ours = _apps(CompletionRequest)
    expected, got = fastapi_way.get("/openapi.json").json(), ours.get("/openapi.json").json()
    assert got["paths"]["/"]["post"]["requestBody"] == expected["paths"]["/"]["post"]["requestBody"]


@pytest.mark.parametrize("route, model", [("/v1/completions", CompletionRequest),
                                          ("/v1/chat/completions", ChatCompletionRequest)])
def test_the_generation_routes_document_their_bodies_as_a_body_parameter_would(server, route, model):
    openapi = httpx.get(f"{server.url}/openapi.json").json()
    reference = _apps(model)[0].get("/openapi.json").json()
    assert openapi["paths"][route]["post"]["requestBody"] == reference["paths"]["/"]["post"]["requestBody"]
    for name, schema in reference["components"]["schemas"].items():
        if name not in ("HTTPValidationError", "ValidationError"):  # this server answers 400s with its own object
            assert openapi["components"]["schemas"][name] == schema, name


def _answer_to_a_client_that_leaves_mid_body(app: FastAPI) -> tuple[int, bytes]:
    """Call the app as uvicorn does for a client that sends part of its body, then closes the connection."""
    messages = [{"type": "http.request", "body": b'{"prompt": "a", ', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/", "raw_path": b"/", "root_path": "", "query_string": b"", "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
    asyncio.run(app(scope, receive, send))  # an exception escaping here is uvicorn's "Exception in ASGI application"
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_a_client_that_leaves_while_sending_its_body_is_answered_as_fastapi_answers_it(model):
    fastapi_way, ours = _apps(model)
    assert _answer_to_a_client_that_leaves_mid_body(ours.app) == _answer_to_a_client_that_leaves_mid_body(
        fastapi_way.app)
