"""The Python client (clients.Client / AsyncClient) against a live server on 127.0.0.1."""

import asyncio
import time

import httpx
import pytest

from clients import AsyncClient, Client, DeltaserveConnectionError, DeltaserveError
from server_harness import MAX_MODEL_LEN, MODEL_NAME, free_port


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, timeout=30) as c:
        yield c


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_completion_has_text_usage_and_finish_reason(client):
    out = client.complete("The cat", max_tokens=12, **GREEDY)
    assert out.model == MODEL_NAME and out.finish_reason == "length" and out.text
    assert out.usage.prompt_tokens == len(b"The cat") and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_streamed_deltas_concatenate_to_the_whole_completion(client):
    whole = client.complete("The cat", max_tokens=24, **GREEDY)
    with client.stream_complete("The cat", max_tokens=24, **GREEDY) as stream:
        deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == whole.text == stream.text
    assert stream.finish_reason == "length" and stream.usage == whole.usage


def test_streamed_chat_equals_the_whole_answer(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat(messages, max_tokens=10, **GREEDY)
    assert whole.finish_reason == "length" and whole.usage.completion_tokens == 10
    stream = client.stream_chat(messages, max_tokens=10, **GREEDY)
    assert "".join(stream) == whole.text and stream.finish_reason == "length"


def test_async_client_gives_the_same_answers_as_the_sync_one(server, client):
    expected = client.complete("Once", max_tokens=16, **GREEDY).text
    expected_chat = client.chat("Hello", max_tokens=8, **GREEDY).text

    async def ask():
        async with AsyncClient(f"{server.url}/v1", timeout=30) as ac:
            whole, chat, stream = await asyncio.gather(
                ac.complete("Once", max_tokens=16, **GREEDY), ac.chat("Hello", max_tokens=8, **GREEDY),
                ac.stream_complete("Once", max_tokens=16, **GREEDY))
            async with stream:
                deltas = [d async for d in stream]
            chat_stream = await ac.stream_chat("Hello", max_tokens=8, **GREEDY)
            chat_deltas = [d async for d in chat_stream]
            return whole, chat, deltas, stream, chat_deltas, await ac.tokenize("Once"), await ac.health()

    whole, chat, deltas, stream, chat_deltas, tokens, healthy = asyncio.run(ask())
    assert whole.text == "".join(deltas) == expected and stream.usage.completion_tokens == 16
    assert chat.text == "".join(chat_deltas) == expected_chat
    assert tokens.count == 4 and healthy


def test_n_choices_come_back_in_index_order(client):
    out = client.complete(["a", "b"], max_tokens=3, n=2, temperature=1.0, seed=5, ignore_eos=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12


def test_tokenize_and_detokenize_round_trip(client):
    tokens = client.tokenize("héllo, wörld")
    assert tokens.count == len("héllo, wörld".encode()) and tokens.max_model_len == MAX_MODEL_LEN
    assert client.detokenize(tokens.tokens) == "héllo, wörld"
    chat = client.tokenize(messages=[{"role": "user", "content": "x"}])
    assert chat.count > 1


def test_models_tokenizer_info_and_health(client):
    assert [(m.id, m.max_model_len) for m in client.models()] == [(MODEL_NAME, MAX_MODEL_LEN)]
    info = client.tokenizer_info()
    assert info.vocab_size > 256 and info.eos_token_ids
    assert client.health()


def test_deltaserve_extensions_reach_the_sampler(client):
    first = client.tokenize(client.complete("The cat", max_tokens=1, **GREEDY).text).tokens[0]
    out = client.complete("The cat", max_tokens=8, temperature=0.0, stop_token_ids=[first])
    assert out.finish_reason == "stop" and out.choices[0].stop_reason == first and out.text == ""
    late = client.complete("The cat", max_tokens=8, temperature=0.0, stop_token_ids=[first], min_tokens=3)
    assert late.usage.completion_tokens >= 3
    picked = client.complete("The cat", max_tokens=8, temperature=5.0, top_k=1, min_p=0.0,
                             repetition_penalty=1.0, ignore_eos=True, seed=1)
    assert picked.text == client.complete("The cat", max_tokens=8, **GREEDY).text  # top_k=1 is greedy
    with pytest.raises(TypeError, match="extra_body"):
        client.complete("x", top_q=3)


def test_unknown_model_raises_the_servers_404(client):
    with pytest.raises(DeltaserveError) as err:
        client.complete("x", model="gpt-nope", max_tokens=1)
    e = err.value
    assert e.status == 404 and e.type == "not_found_error" and e.code == "model_not_found" and e.param == "model"
    assert "gpt-nope" in e.message
    with pytest.raises(DeltaserveError) as err:  # a stream's error comes when it is opened
        client.stream_chat("x", model="gpt-nope")
    assert err.value.status == 404


def test_bad_parameters_raise_400_naming_the_field(client):
    with pytest.raises(DeltaserveError) as err:
        client.complete("x", temperature=-1.0)
    assert err.value.status == 400 and err.value.param == "temperature" and "temperature" in err.value.message
    with pytest.raises(DeltaserveError) as err:
        client.complete("x", max_tokens=MAX_MODEL_LEN)
    assert err.value.status == 400 and "context limit" in err.value.message
    with pytest.raises(DeltaserveError) as err:
        client.detokenize([10**6])
    assert err.value.status == 400 and err.value.param == "tokens"


def test_unreachable_server_raises_a_connection_error():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as c:
        assert not c.health()
        with pytest.raises(DeltaserveConnectionError, match="cannot reach the server"):
            c.complete("x")


def test_an_error_event_inside_a_stream_is_raised_without_status():
    events = ('data: {"id": "c1", "model": "m", "choices": [{"index": 0, "text": "ab", "finish_reason": null}]}\n\n'
              'data: {"error": {"message": "boom", "type": "internal_server_error", "param": null, "code": null}}\n\n'
              "data: [DONE]\n\n")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=events,
                                                                   headers={"content-type": "text/event-stream"}))
    seen = []
    with Client("http://test", transport=transport) as c, pytest.raises(DeltaserveError) as err:
        for delta in c.stream_complete("x"):
            seen.append(delta)
    assert seen == ["ab"] and err.value.status is None and err.value.message == "boom"
    assert err.value.type == "internal_server_error"


def _aborted_choices(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines
               if line.startswith("deltaserve:request_success_total{") and 'finished_reason="abort"' in line)


def test_closing_a_stream_early_aborts_the_request_on_the_server(server, client):
    before = _aborted_choices(server.url)
    with client.stream_complete("forever", max_tokens=200, ignore_eos=True) as stream:
        assert next(iter(stream))
    deadline = time.monotonic() + 10
    while _aborted_choices(server.url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted_choices(server.url) == before + 1
    stats = server.state.engine.stats()
    assert stats.num_running == 0 and stats.slots_used == 0
