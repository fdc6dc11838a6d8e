"""The server under abuse: garbage bodies, clients that vanish mid-stream, a full queue. Each must get
an error object (or cost nothing), free its slots, and leave the server answering."""

import asyncio
import contextlib
import json
import logging
import re
import threading
import time

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from engine.engine import EngineConfig
from server_harness import MODEL_NAME, ThreadServer, write_tiny_model

POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
GARBAGE = [b"", b"{", b"null", b"[]", b"123", b'"text"', b"\xff\xfe\x00garbage", b'{"prompt": {}}',
           b'{"messages": 5, "tokens": "x"}', b'{"prompt": [1.5], "tokens": [1.5]}',
           b'{"prompt": "x", "messages": [], "tokens": [-1], "n": "many"}',
           b'{"prompt": "x", "messages": [{"role": "user", "content": [{"type": "image_url"}]}], "n": -3}',
           b'{"prompt": [], "messages": [{"content": "no role"}], "max_tokens": -5}',
           b'{"prompt": [[]], "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e30, "tokens": []}',
           b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}, "stop": 5}',
           b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "top_p": 0, "logprobs": 99}',
           b'{"model": 7, "prompt": "x", "messages": [{"role": "user", "content": "x"}], "tokens": [1]}']


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ThreadServer(write_tiny_model(tmp_path_factory.mktemp("tiny")),
                       EngineConfig(max_num_seqs=8, max_num_batched_tokens=256))
    yield srv
    srv.stop()


def _error_object(reply: httpx.Response) -> dict:
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^deltaserve:{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("route", POST_ROUTES)
def test_garbage_bodies_get_a_4xx_error_object(server, route):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body in GARBAGE:
            reply = http.post(route, content=body, headers={"content-type": "application/json"})
            if reply.status_code == 200:  # a few bodies are valid for some routes
                continue
            assert 400 <= reply.status_code < 500, (route, body, reply.text)
            _error_object(reply)
        assert http.get("/health").status_code == 200


def test_unknown_routes_and_methods_get_error_objects(server):
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    _error_object(httpx.get(f"{server.url}/v1/nothing"))
    reply = httpx.get(f"{server.url}/v1/completions")
    assert reply.status_code == 405
    _error_object(reply)


def test_openapi_schema_documents_400_not_422(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "400" in responses and "503" in responses and "422" not in responses


OPENAPI_ID = "urn:deltaserve:openapi"


def _validator(openapi: dict, pointer: str) -> Draft202012Validator:
    """A validator for the schema at `pointer` in the OpenAPI document; its #/components/... refs resolve there."""
    registry = Registry().with_resource(OPENAPI_ID, Resource.from_contents(openapi, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{OPENAPI_ID}#{pointer}"}, registry=registry)


def _content_schema_pointers(schema, pointer: str) -> list[str]:
    """Where the schema says what a string holding JSON must match once parsed (its contentSchema keywords)."""
    items = schema.items() if isinstance(schema, dict) else enumerate(schema) if isinstance(schema, list) else ()
    found = []
    for key, value in items:
        inner = f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}"
        found += [inner] if key == "contentSchema" else _content_schema_pointers(value, inner)
    return found


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "abc", "max_tokens": 4, "logprobs": 2, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
                              "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}),
])
def test_every_stream_event_matches_the_event_schema_openapi_declares(server, route, body):
    openapi = httpx.get(f"{server.url}/openapi.json").json()
    pointer = f"/paths/{route.replace('/', '~1')}/post/responses/200/content/text~1event-stream/schema"
    declared = openapi["paths"][route]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    event_schema = _validator(openapi, pointer)
    payload_schemas = [_validator(openapi, p) for p in _content_schema_pointers(declared, pointer)]
    reply = httpx.post(f"{server.url}{route}", json={**body, "ignore_eos": True}, timeout=30)
    events = [{"data": line[len("data: "):]} for line in reply.text.splitlines() if line.startswith("data: ")]
    # at least a chunk, the usage chunk and [DONE]: tokens that queue up while the server is busy
    # (a loaded CI machine) go out merged, so four tokens may come as one chunk
    assert events[-1] == {"data": "[DONE]"} and len(events) >= 3
    for event in events:  # an event as an SSE parser hands it over: {"data": ...}
        event_schema.validate(event)
    assert payload_schemas, "the event schema says nothing of the JSON its data carries"
    for event in events[:-1]:
        chunk = json.loads(event["data"])
        assert any(schema.is_valid(chunk) for schema in payload_schemas), chunk


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
])
def test_logit_bias_keys_that_are_digits_but_not_numbers_are_a_400(server, route, body):
    for key in ("\u00b2", "\u0663", "1_0", " 1"):  # superscript two, Arabic-Indic three: isdigit() says yes
        reply = httpx.post(f"{server.url}{route}", json={**body, "max_tokens": 1, "logit_bias": {key: 1}})
        assert reply.status_code == 400 and _error_object(reply)["param"] == "logit_bias", (key, reply.text)


def test_a_logit_bias_key_with_more_digits_than_int_reads_is_a_400(server):
    # int() refuses more than 4300 digits: that was a ValueError, a 500
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1,
                                                             "logit_bias": {"1" * 5000: 1}})
    assert reply.status_code == 400 and _error_object(reply)["param"] == "logit_bias", reply.text


def test_chat_template_kwargs_naming_the_requests_own_fields_is_a_400(server):
    for key in ("add_generation_prompt", "messages"):
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "chat_template_kwargs": {key: False}})
        assert reply.status_code == 400 and _error_object(reply)["param"] == "chat_template_kwargs", reply.text
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "chat_template_kwargs": {"flag": True}})
    assert reply.status_code == 200


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "a\udc00", "max_tokens": 1}),
    ("/v1/completions", {"prompt": ["ok", "\ud800"], "max_tokens": 1, "echo": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "\udc00"}]}),
    ("/tokenize", {"prompt": "\udc00"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "\udc00"}]}),
])
def test_a_lone_surrogate_anywhere_in_the_body_is_a_400(server, route, body):
    raw = json.dumps(body)  # ASCII, the surrogate spelled "\udc00": valid JSON, but not text
    reply = httpx.post(f"{server.url}{route}", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "lone surrogate" in _error_object(reply)["message"], reply.text


def test_a_surrogate_pair_is_text(server):
    raw = json.dumps({"prompt": "\U0001F600", "max_tokens": 1, "echo": True})  # spelled "\ud83d\ude00"
    reply = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"].startswith("\U0001F600")


@contextlib.contextmanager
def _request_log_lines():
    """The server's per-request JSON log lines, as dicts, while the block runs."""
    lines: list[dict] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(json.loads(record.getMessage()))
    logger = logging.getLogger("deltaserve.requests")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_refused_request_logs_no_choices_so_a_huge_n_costs_nothing(server):
    with _request_log_lines() as lines:
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 9})
    assert reply.status_code == 400 and "n=9" in _error_object(reply)["message"]
    assert lines[-1]["status"] == 400 and lines[-1]["finish_reasons"] == []
    # the log line once held n entries, so this one took all memory
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 10**30}, timeout=10)
    assert reply.status_code == 400 and f"n={10**30}" in _error_object(reply)["message"]


def test_disconnect_storm_frees_every_slot_and_the_server_still_answers(server):
    body = {"model": MODEL_NAME, "prompt": "storm", "max_tokens": 100000, "stream": True, "ignore_eos": True}

    async def reader(http, i):
        if i % 4 == 3:  # leave before the first token: the request may still be queued
            try:
                await asyncio.wait_for(http.post("/v1/completions", json=body), timeout=0.05)
            except asyncio.TimeoutError:
                pass
            return
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            seen = 0
            async for line in reply.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream

    async def storm():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(reader(http, i) for i in range(40)))

    asyncio.run(storm())
    deadline = time.monotonic() + 15
    while (_metric(server.url, "num_requests_running") or _metric(server.url, "num_requests_waiting")
           or server.state.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.url, "num_requests_running") == 0 and _metric(server.url, "num_requests_waiting") == 0
    assert not server.state.active
    pool = server.state.engine.engine.pool
    assert pool.num_free == pool.capacity
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "still there?", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_client_that_leaves_aborts_its_request(server):
    body = {"prompt": "long", "max_tokens": 100000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while _metric(server.url, "num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.url, "num_requests_running") == 0
    assert 'finished_reason="abort"' in httpx.get(f"{server.url}/metrics").text


def test_full_queue_is_503_with_retry_after(tmp_path):
    srv = ThreadServer(write_tiny_model(tmp_path / "m"), EngineConfig(max_num_seqs=1, max_num_batched_tokens=64),
                       max_queued_requests=1)
    try:
        long = {"prompt": "hog", "max_tokens": 100000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=30) as http, http.stream("POST", "/v1/completions",
                                                                              json=long) as hog:
            hog_lines = hog.iter_lines()  # kept: dropping the iterator would close the stream
            next(hog_lines)  # it holds the only slot
            queued = threading.Thread(target=lambda: httpx.post(f"{srv.url}/v1/completions", timeout=30,
                                                                json={"prompt": "q", "max_tokens": 2}))
            queued.start()
            deadline = time.monotonic() + 10
            while _metric(srv.url, "num_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            reply = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert reply.status_code == 503 and reply.headers["retry-after"]
            assert _error_object(reply)["type"] == "service_unavailable_error"
        queued.join(timeout=30)  # the hog left, so the queued one ran
        assert not queued.is_alive()
        assert _metric(srv.url, "request_rejected_total") == 1
    finally:
        srv.stop()


class _StandInGeneration:
    """What the SSE writer uses of a Generation: an id, a status, close()."""
    id, status, closed = "x", 200, False

    def close(self):
        self.closed = True


def test_error_after_the_stream_began_is_a_data_event_then_done():
    from server.errors import APIError
    from server.streaming import _events

    async def chunks():
        yield "{}"
        raise APIError(500, "boom")

    async def run():
        gen = _StandInGeneration()
        events = [e.decode() async for e in _events(gen, chunks())]
        return gen, events

    gen, events = asyncio.run(run())
    assert events[0] == "data: {}\n\n" and events[-1] == "data: [DONE]\n\n"
    assert json.loads(events[1][len("data: "):])["error"]["message"] == "boom" and gen.closed


def test_a_stream_sends_its_last_event_with_the_end_of_the_body():
    from server.streaming import event_stream

    async def chunks():
        yield "{}"
        yield "{}"

    async def run():
        sent = []

        async def send(message):
            sent.append(message)

        gen = _StandInGeneration()
        await event_stream(gen, chunks())({"type": "http"}, None, send)
        return gen, sent

    gen, sent = asyncio.run(run())
    assert [m.get("body") for m in sent[1:]] == [b"data: {}\n\n", b"data: {}\n\n", b"data: [DONE]\n\n"]
    assert [m.get("more_body") for m in sent[1:]] == [True, True, False] and gen.closed


@pytest.mark.parametrize("route, body, nulls", [
    ("/v1/completions", {"prompt": "x"}, ["n", "stream", "echo", "presence_penalty", "frequency_penalty"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
     ["n", "stream", "logprobs", "presence_penalty", "frequency_penalty"]),
])
def test_null_for_a_field_openai_declares_nullable_is_its_default(server, route, body, nulls):
    # what the openai client sends for an argument passed as None, e.g. completions.create(..., n=None)
    reply = httpx.post(f"{server.url}{route}", json={**body, "max_tokens": 1, **dict.fromkeys(nulls)})
    assert reply.status_code == 200, reply.text
    answer = reply.json()  # not a stream, one choice, no logprobs
    assert len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_a_text_part_without_its_text_is_a_400_that_says_so(server, route):
    parts = [{"type": "text", "text": "fine"}, {"type": "text"}]
    reply = httpx.post(f"{server.url}{route}", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    assert reply.status_code == 400
    error = _error_object(reply)
    # it once said "only text parts are supported, got 'text'"
    assert error["param"] == "messages" and error["message"] == "messages[0].content[1]: a text part needs its text"


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_503_to_retry(tmp_path):
    srv = ThreadServer(write_tiny_model(tmp_path / "m"), EngineConfig(max_num_seqs=2, max_num_batched_tokens=64),
                       max_queued_requests=2)
    try:
        # the server is idle: a 503 with Retry-After would send clients back with a request that never fits
        reply = httpx.post(f"{srv.url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
        assert reply.status_code == 400 and _error_object(reply)["param"] == "prompt", reply.text
        reply = httpx.post(f"{srv.url}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
        assert reply.status_code == 200 and len(reply.json()["choices"]) == 2
    finally:
        srv.stop()


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_is_a_400_that_names_the_content_type_to_use(server, content_type):
    # `curl -d '{...}'` without -H 'Content-Type: application/json' sends a form
    headers = {} if content_type is None else {"content-type": content_type}
    reply = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers=headers)
    assert reply.status_code == 400 and "Content-Type: application/json" in _error_object(reply)["message"]
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=b"", headers=headers)
    assert reply.status_code == 400 and "no body" in _error_object(reply)["message"]


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}),
    ("/tokenize", {"prompt": "hello"}),
])
def test_a_prompt_still_tokenizing_does_not_hold_up_other_requests(server, route, body, monkeypatch):
    # A long prompt takes seconds to tokenize: stand-in, an encode that waits until released. On the event
    # loop it would hold /health (and every stream) until then.
    from engine.tokenizer import Tokenizer
    entered, release = threading.Event(), threading.Event()
    encode = Tokenizer.encode

    def slow_encode(self, *args, **kwargs):
        entered.set()
        release.wait(timeout=20)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", slow_encode)
    replies = []
    client = threading.Thread(target=lambda: replies.append(httpx.post(f"{server.url}{route}", json=body, timeout=30)))
    client.start()
    try:
        assert entered.wait(timeout=10), "the request never reached the tokenizer"
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert not release.is_set() and client.is_alive()  # answered while the prompt was still tokenizing
    finally:
        release.set()
        client.join(timeout=30)
    assert replies and replies[0].status_code == 200, replies
