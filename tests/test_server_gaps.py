"""Gaps an audit found between this server and the OpenAI API, or in its limits and metrics: each test
states the behaviour a client now gets."""

import httpx

from server_harness import MODEL_NAME


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
