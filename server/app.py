"""The FastAPI app: routes, each declaring the error statuses it can answer with."""

from __future__ import annotations

import asyncio
import uuid
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.models import Schema
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server import errors
from server.chat import ChatWriter
from server.completions import CompletionWriter
from server.errors import APIError, bad_request
from server.generation import ClientGone, Generation
from server.params import chat_params, chat_prompt, chat_request_prompt, completion_params, completion_prompts
from server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionChunk,
                             CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                             ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse, TokenizerInfo,
                             VersionResponse)
from server.request_body import COMPONENTS, openapi_body, read_body
from server.state import ServerState
from server.streaming import event_stream

_ERR = {"model": ErrorResponse}
TOKENIZER_RESPONSES = {400: _ERR, 404: _ERR, 413: _ERR, 500: _ERR}
CLIENT_CLOSED = 499  # nginx's status for "the client went away": the response is never seen
# in no route's signature, so added to the schema here: the stream chunks, and the bodies routes read themselves
_STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)
_READ_BODIES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def _sse(chunk: type[BaseModel]) -> dict:
    """A stream's 200: every event's data is a chunk, or an error object after a late failure, and the last
    event's is [DONE]. OpenAPI 3.1 has no itemSchema, so `schema` describes one event, as schemathesis reads it."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [{"$ref": COMPONENTS.format(model=chunk.__name__)},
                                             {"$ref": COMPONENTS.format(model=ErrorResponse.__name__)}]}}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}
    return {"content": {"text/event-stream": {"schema": event}}}


def _generate_responses(chunk: type[BaseModel]) -> dict:
    return {200: _sse(chunk), 400: _ERR, 404: _ERR, 413: _ERR, 499: _ERR, 500: _ERR, 503: _ERR}


def version() -> str:
    try:
        return metadata.version("deltaserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="deltaserve", version=version(),
                  description="OpenAI-compatible server for Gated DeltaNet models.")
    app.state.server = state
    errors.install(app)
    _finish_openapi(app)

    @_direct_post(app, "/v1/completions", response_model=CompletionResponse,
                  responses=_generate_responses(CompletionChunk), openapi_extra=openapi_body(CompletionRequest))
    async def completions(raw: Request) -> Response:
        body = await read_body(raw, CompletionRequest, state.max_request_bytes)
        state.check_model(body.model)
        # Tokenizing (and rendering a chat template) happens in a worker thread: on the event loop a long
        # prompt would stall every stream and /health until it was done (the tokenizer lets go of the GIL).
        prompts = await asyncio.to_thread(completion_prompts, body, state.tokenizer)
        params = completion_params(body, max(len(p) for p in prompts), state.max_model_len)
        gen = Generation(state, f"cmpl-{uuid.uuid4().hex}", "completions", prompts, params)
        writer = CompletionWriter(gen, body)
        return await _answer(gen, raw, body.stream, writer.chunks, writer.response)

    @_direct_post(app, "/v1/chat/completions", response_model=ChatCompletionResponse,
                  responses=_generate_responses(ChatCompletionChunk), openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(raw: Request) -> Response:
        body = await read_body(raw, ChatCompletionRequest, state.max_request_bytes)
        state.check_model(body.model)
        prompt = await asyncio.to_thread(chat_request_prompt, body, state.tokenizer)
        params = chat_params(body, len(prompt), state.max_model_len)
        gen = Generation(state, f"chatcmpl-{uuid.uuid4().hex}", "chat", [prompt], params)
        writer = ChatWriter(gen, body)
        return await _answer(gen, raw, body.stream, writer.chunks, writer.response)

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, created=state.created, root=str(state.model_path), max_model_len=state.max_model_len)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[model_card(name) for name in state.served_names])

    # `path`: served names may hold slashes ("org/name"), which the default converter stops at (a bare 404)
    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: _ERR})
    async def retrieve_model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return model_card(model_id)

    @app.get("/health", responses={200: {"content": {"application/json": {}}}, 503: _ERR})
    async def health() -> JSONResponse:
        state.check_serving()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        body = state.metrics.render(state.engine.stats())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # read with read_body (not a body parameter) for its size limit, as every route that takes a body
    @app.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_RESPONSES,
              openapi_extra=openapi_body(TokenizeRequest))
    async def tokenize(raw: Request) -> TokenizeResponse:
        body = await read_body(raw, TokenizeRequest, state.max_request_bytes)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            ids = await asyncio.to_thread(state.tokenizer.encode, body.prompt, body.add_special_tokens)
        else:
            ids = await asyncio.to_thread(chat_prompt, body.messages, state.tokenizer, body.add_generation_prompt)
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_RESPONSES,
              openapi_extra=openapi_body(DetokenizeRequest))
    async def detokenize(raw: Request) -> DetokenizeResponse:
        body = await read_body(raw, DetokenizeRequest, state.max_request_bytes)
        state.check_model(body.model)
        outside = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if outside:
            raise bad_request(f"token id(s) {outside[:5]} are outside the vocabulary [0, {state.vocab_size})",
                              "tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info() -> TokenizerInfo:
        tok = state.tokenizer
        eos_ids = sorted(tok.eos_token_ids)
        return TokenizerInfo(
            vocab_size=tok.vocab_size, eos_token=state.texts.text(eos_ids[0]) if eos_ids else None,
            eos_token_ids=eos_ids, bos_token_id=tok.bos_token_id,
            bos_token=state.texts.text(tok.bos_token_id) if tok.bos_token_id is not None else None,
            max_model_len=state.max_model_len, chat_template=tok.chat_template)

    @app.get("/version", response_model=VersionResponse)
    async def get_version() -> VersionResponse:
        return VersionResponse(version=version())

    return app


class DirectRoute(APIRoute):
    """A route whose endpoint takes the Request and returns a Response itself, called as it is: none of
    FastAPI's work per request (dependencies, body, serializing the return value), ~20 us of a 2-core CPU
    machine's server per request. Errors it raises reach the app's handlers as from any route, and its
    response_model, responses and openapi_extra still document it."""

    def get_route_handler(self):
        return self.endpoint


def _direct_post(app: FastAPI, path: str, **options):
    """app.post(path, **options) for a DirectRoute."""
    def register(endpoint):
        app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=DirectRoute, **options)
        return endpoint
    return register


async def _answer(gen: Generation, raw: Request, stream: bool, chunks, response) -> Response:
    """Start the generation (errors are still plain HTTP errors here), then stream or answer whole (as FastAPI
    writes a route's response_model: the model's JSON)."""
    try:
        await gen.start(raw)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    if stream:
        return event_stream(gen, chunks())
    try:
        return Response((await response()).model_dump_json(), media_type="application/json")
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except APIError as err:
        gen.status = err.status
        raise
    finally:
        gen.close()


def _finish_openapi(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; this server answers 400 instead. And it
    knows nothing of the stream chunks that the SSE responses refer to, nor of the bodies that routes read
    with read_body."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _, chunks = models_json_schema([(model, "serialization") for model in _STREAM_CHUNKS],
                                           ref_template=COMPONENTS)
            for name, definition in chunks["$defs"].items():
                components.setdefault(name, definition)
            _, bodies = models_json_schema([(model, "validation") for model in _READ_BODIES], ref_template=COMPONENTS)
            for name, definition in bodies["$defs"].items():  # as FastAPI writes its own: no "default": null
                components.setdefault(name, jsonable_encoder(Schema(**definition), by_alias=True, exclude_none=True))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
