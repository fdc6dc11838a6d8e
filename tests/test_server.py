"""The HTTP API as the official `openai` client sees it, against a live server on 127.0.0.1."""

import httpx
import openai
import pytest

from server_harness import MAX_MODEL_LEN, MODEL_NAME


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def _complete(client, **kw):
    return client.completions.create(model=MODEL_NAME, **{"prompt": "The cat", "max_tokens": 12,
                                                           "temperature": 0, **kw})


def test_completion_returns_text_usage_and_finish_reason(client):
    out = _complete(client, extra_body={"ignore_eos": True})
    assert out.model == MODEL_NAME and out.object == "text_completion"
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(b"The cat") and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_streamed_text_equals_the_whole_answer_at_temperature_0(client):
    whole = _complete(client, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(_complete(client, max_tokens=24, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_include_usage_adds_a_final_chunk_with_only_usage(client):
    chunks = list(_complete(client, stream=True, stream_options={"include_usage": True},
                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.choices for c in chunks[:-1])


def test_many_prompts_and_n_number_choices_prompt_major(client):
    out = _complete(client, prompt=["a", "bb", "ccc"], n=2, temperature=1.0, seed=4, max_tokens=4,
                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(6))
    assert out.usage.prompt_tokens == 1 + 2 + 3 and out.usage.completion_tokens == 6 * 4


def test_n_with_seed_repeats_and_its_choices_differ(client):
    def texts():
        out = _complete(client, n=3, temperature=1.0, seed=11, max_tokens=16, extra_body={"ignore_eos": True})
        return [c.text for c in out.choices]

    first = texts()
    assert texts() == first
    assert len(set(first)) > 1


def test_logprobs_list_each_token_with_its_top_alternatives(client):
    out = _complete(client, logprobs=3, max_tokens=5, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == logprob
        assert max(top.values()) == logprob  # greedy picks the most likely token


def test_lm_eval_loglikelihood_request_gets_prompt_logprobs_with_a_null_first(server):
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts, echo, logprobs=1."""
    texts = ["Hello", "World!\n"]
    prompts = [httpx.post(f"{server.url}/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    body = {"model": MODEL_NAME, "prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 1,
            "echo": True, "seed": 1234}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200
    choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
    for choice, prompt, text in zip(choices, prompts, texts):
        lp = choice["logprobs"]
        assert choice["text"].startswith(text)
        assert len(lp["token_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ctx = 1
        continuation = lp["token_logprobs"][ctx:-1]  # exactly lm-eval's slicing
        assert all(isinstance(x, float) and x <= 0 for x in continuation)
        assert all(lp["tokens"][i] in lp["top_logprobs"][i] for i in range(1, len(prompt)))


def test_stop_string_ends_the_text_before_it(client):
    free = _complete(client, max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:7]
    out = _complete(client, max_tokens=30, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.text == free[:free.index(stop)]


def test_chat_answers_and_streams_the_same_text(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    kw = dict(model=MODEL_NAME, messages=messages, temperature=0, max_completion_tokens=10,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_carry_top_alternatives(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_bad_values_are_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, temperature=-1)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        _complete(client, prompt=[[5, 100000]])
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, max_tokens=MAX_MODEL_LEN)
    assert "context limit" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], n=0)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)
    assert err.value.body["code"] == "model_not_found"


def test_draining_server_answers_503_with_retry_after(server, client):
    server.state.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as err:
            _complete(client)
        assert err.value.status_code == 503 and "retry-after" in err.value.response.headers
        assert httpx.get(f"{server.url}/health").status_code == 503
    finally:
        server.state.draining = False
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_models_tokenizer_and_version_routes(server, client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "héllo"}).json()
    assert ids["count"] == len("héllo".encode()) and ids["max_model_len"] == MAX_MODEL_LEN
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "héllo"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] > 1
    assert httpx.get(f"{server.url}/tokenizer_info").json()["eos_token"] == "<|endoftext|>"
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_metrics_count_tokens_and_finished_requests(server, client):
    _complete(client, max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "slot_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket"):
        assert f"deltaserve:{name}" in text
    assert 'deltaserve:request_success_total{finished_reason="length"' in text
    # The engine's step counters: the request above took at least one step per token.
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("deltaserve:engine_")}
    assert values["deltaserve:engine_steps_total"] >= 3
    assert values["deltaserve:engine_step_seconds_total"] > 0
    assert "deltaserve:engine_overlapped_decode_steps_total" in values
    assert values["deltaserve:engine_kernel_builds_total"] == 0  # on CPU Triton interprets: builds nothing


def test_a_request_beyond_the_context_is_context_length_exceeded_naming_the_prompt(client):
    # what clients look for to trim a conversation and retry; the message says the limit
    chat = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=MAX_MODEL_LEN)
    for create, kw, param in [(client.chat.completions.create, chat, "messages"),
                              (client.completions.create, dict(model=MODEL_NAME, prompt=[7] * (MAX_MODEL_LEN - 5),
                                                               max_tokens=6), "prompt"),
                              (client.completions.create, dict(model=MODEL_NAME, prompt=[[7], [7] * MAX_MODEL_LEN],
                                                               max_tokens=None), "prompt")]:
        with pytest.raises(openai.BadRequestError) as err:
            create(**kw)
        assert (err.value.code, err.value.param) == ("context_length_exceeded", param)
        assert str(MAX_MODEL_LEN) in err.value.message
