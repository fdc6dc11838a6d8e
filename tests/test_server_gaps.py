"""Gaps an audit found between this server and the OpenAI API, or in its limits and metrics: each test
states the behaviour a client now gets."""

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import EngineOverloaded, EngineStats
from engine.sampling import SamplingParams
from server import errors
from server.errors import APIError
from server.generation import Generation
from server.metrics import Metrics
from server.protocol import TokenizeRequest
from server.request_body import read_body
from server_harness import MODEL_NAME, TINY, TINY_SERVER_LIMITS, ThreadServer, write_tiny_model


def _error(reply: httpx.Response) -> dict:
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_retrieving_the_served_model_answers_its_entry_in_the_model_list(server):
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    reply = httpx.get(f"{server.url}/v1/models/{MODEL_NAME}")
    assert reply.status_code == 200 and reply.json() == listed[0]


def test_a_served_name_with_a_slash_can_be_retrieved(server, monkeypatch):
    monkeypatch.setattr(server.state, "served_names", [MODEL_NAME, "org/tiny"])
    reply = httpx.get(f"{server.url}/v1/models/org/tiny")
    assert reply.status_code == 200 and reply.json()["id"] == "org/tiny"


def test_retrieving_a_model_not_served_is_a_404_model_not_found(server):
    for name in ("other", "org/other"):
        reply = httpx.get(f"{server.url}/v1/models/{name}")
        assert reply.status_code == 404, name
        error = _error(reply)
        assert error["code"] == "model_not_found" and repr(name) in error["message"]


LIMIT = 1000  # bytes of request body the `limited` server takes


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    srv = ThreadServer(write_tiny_model(tmp_path_factory.mktemp("tiny")), TINY_SERVER_LIMITS, max_request_bytes=LIMIT)
    yield srv
    srv.stop()


def _over_the_limit(reply: httpx.Response) -> None:
    assert reply.status_code == 413, reply.text
    error = _error(reply)
    assert error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"] and "--max-request-bytes" in error["message"]


def _body_of(size: int, route: str) -> bytes:
    """A valid JSON body for route of exactly `size` bytes (its prompt padded with spaces)."""
    field = {"/detokenize": b'"tokens": [1]'}.get(route, b'"prompt": "x"')
    head = b'{"max_tokens": 1, ' + field
    return head + b" " * (size - len(head) - 1) + b"}"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_a_body_over_max_request_bytes_is_a_413_that_names_the_limit_and_the_flag(limited, route):
    reply = httpx.post(f"{limited.url}{route}", content=_body_of(LIMIT + 1, route),
                       headers={"content-type": "application/json"})
    assert reply.request.headers["content-length"] == str(LIMIT + 1)
    _over_the_limit(reply)


def test_a_body_of_exactly_max_request_bytes_is_taken(limited):
    reply = httpx.post(f"{limited.url}/tokenize", content=_body_of(LIMIT, "/tokenize"),
                       headers={"content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["tokens"], reply.text


def test_a_chunked_body_without_content_length_is_counted_as_it_arrives(limited):
    pieces = [_body_of(LIMIT + 500, "/v1/completions")[i:i + 100] for i in range(0, LIMIT + 500, 100)]
    reply = httpx.post(f"{limited.url}/v1/completions", content=iter(pieces),
                       headers={"content-type": "application/json"})
    assert "content-length" not in reply.request.headers
    assert reply.request.headers["transfer-encoding"] == "chunked"
    _over_the_limit(reply)


def _answer(headers: list[tuple[bytes, bytes]], messages: list[dict]) -> tuple[int, dict]:
    """Call a route that reads its body with read_body (limit: LIMIT) as an ASGI server would, handing it
    `messages` as the body; its status and JSON answer."""
    app = FastAPI()
    errors.install(app)

    @app.post("/")
    async def prompt_size(raw: Request):
        return {"size": len((await read_body(raw, TokenizeRequest, LIMIT)).prompt)}

    sent = []

    async def receive():
        assert messages, "the body was read beyond what was sent"
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/", "raw_path": b"/", "root_path": "", "query_string": b"", "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), *headers]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read():
    status, answer = _answer([(b"content-length", str(LIMIT + 1).encode())], [])  # receive() must not be called
    assert status == 413 and "--max-request-bytes" in answer["error"]["message"]


def test_a_content_length_under_the_limit_does_not_let_a_longer_body_through():
    # uvicorn reads no more than the header says, but the count does not rely on it
    body = _body_of(LIMIT + 1, "/tokenize")
    status, answer = _answer([(b"content-length", b"10")], [
        {"type": "http.request", "body": body[:600], "more_body": True},
        {"type": "http.request", "body": body[600:], "more_body": False}])
    assert status == 413 and "--max-request-bytes" in answer["error"]["message"]


@pytest.mark.parametrize("prompt, says", [("", "the prompt is empty"), ([[]], "the prompt is empty"),
                                          ([5, 999], "outside the vocabulary"),
                                          ([[5], [260]], "outside the vocabulary")])
def test_a_prompt_the_engine_cannot_run_names_prompt_as_the_param(server, prompt, says):
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert error["param"] == "prompt" and says in error["message"] and error["type"] == "invalid_request_error"


def test_a_chat_prompt_the_engine_cannot_run_names_messages_as_the_param(server, monkeypatch):
    from engine.tokenizer import Tokenizer
    # a chat template that renders to no tokens
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, add_special_tokens=True: [])
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                  "max_tokens": 1})
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert error["param"] == "messages" and "the prompt is empty" in error["message"]


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": "x"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})])
def test_more_choices_than_the_engine_runs_names_n_as_the_param(server, route, body):
    n = TINY_SERVER_LIMITS.max_num_seqs + 1
    reply = httpx.post(f"{server.url}{route}", json={**body, "max_tokens": 1, "n": n})
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert error["param"] == "n" and f"n={n}" in error["message"]


@pytest.mark.parametrize("address, url", [(("::1", 8123, 0, 0), "http://[::1]:8123"),
                                          (("127.0.0.1", 8123), "http://127.0.0.1:8123")])
def test_the_startup_line_gives_a_url_a_browser_takes_for_ipv6_hosts_too(address, url, monkeypatch, capsys):
    import uvicorn

    from server.serve import DrainingServer

    async def listened(self, sockets=None):  # stands in for uvicorn binding the socket (IPv6 may be off here)
        self.started = True
        self.servers = [SimpleNamespace(sockets=[SimpleNamespace(getsockname=lambda: address)])]

    monkeypatch.setattr(uvicorn.Server, "startup", listened)
    state = SimpleNamespace(model_name="m", engine=SimpleNamespace(stats=lambda: EngineStats(0, 0, 0, 4)))
    server = DrainingServer(uvicorn.Config(FastAPI(), host=address[0], port=8123), state, drain_timeout_s=1)
    asyncio.run(server.startup())
    assert f"serving 'm' on {url} (4 slots)" in capsys.readouterr().err


class _QueueFullAfter:
    """An engine client whose queue takes `room` more requests, then is full; it records what it opened
    and closed."""

    max_queued_requests = 16

    def __init__(self, room: int):
        self.room = room
        self.opened: list[str] = []
        self.closed: list[str] = []

    def validate(self, prompt_ids, params):
        pass

    def open(self, request_id, prompt_ids, params, inbox, tag=None):
        if len(self.opened) == self.room:
            raise EngineOverloaded(f"{self.room} requests are already waiting")
        self.opened.append(request_id)

    def close(self, request_id, finished):
        self.closed.append(request_id)


def test_a_queue_that_fills_partway_through_a_request_counts_only_its_submitted_choices_as_aborted():
    engine = _QueueFullAfter(room=1)
    metrics = Metrics("m")
    state = SimpleNamespace(engine=engine, metrics=metrics, active=set(), check_accepting=lambda: None)
    gen = Generation(state, "cmpl-x", "completions", [[1], [2], [3]], SamplingParams(n=2, max_tokens=1))

    class _StaysConnected:
        async def receive(self):
            await asyncio.Event().wait()

    async def start():
        with pytest.raises(APIError) as refused:
            await gen.start(_StaysConnected())
        return refused.value

    assert asyncio.run(start()).status == 503
    assert engine.closed == engine.opened == ["cmpl-x-0"]  # the one prompt that got in is aborted
    scraped = {(s.name, s.labels.get("finished_reason") or s.labels.get("reason")): s.value
               for family in text_string_to_metric_families(metrics.render(EngineStats(0, 0, 0, 1)).decode())
               for s in family.samples}
    assert scraped[("deltaserve:request_success_total", "abort")] == 2  # its n=2 choices, not all 3 prompts' 6
    assert scraped[("deltaserve:request_rejected_total", "queue_full")] == 1


def test_min_tokens_with_every_token_a_stop_token_is_a_400_not_token_0(server):
    reply = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": "x", "max_tokens": 3, "min_tokens": 1, "ignore_eos": True,
        "stop_token_ids": list(range(TINY["vocab_size"]))})
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert "cover all" in error["message"] and error["param"] == "stop_token_ids"
