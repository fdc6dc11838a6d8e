"""The single-request generate path: stopping, sampling, and bad input."""

import dataclasses

import pytest

from engine.demo import DEMO_CONFIG, write_gated_deltanet
from engine.generate import generate
from engine.loader import load_model
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(write_gated_deltanet(tmp_path_factory.mktemp("m"), DEMO_CONFIG, seed=5), device="cpu")


def _ids(loaded, prompt, **params):
    return [s.token_id for s in generate(loaded, prompt, SamplingParams(**params))]


def test_stops_at_eos_with_finish_reason_stop(loaded):
    first = _ids(loaded, "The cat", max_tokens=1)[0]
    with_eos = dataclasses.replace(loaded, tokenizer=loaded.tokenizer)
    with_eos.tokenizer = type(loaded.tokenizer).__new__(type(loaded.tokenizer))
    with_eos.tokenizer.__dict__.update(loaded.tokenizer.__dict__, eos_token_ids=frozenset({first}))
    steps = list(generate(with_eos, "The cat", SamplingParams(max_tokens=10)))
    assert [(s.token_id, s.finish_reason, s.text) for s in steps] == [(first, "stop", "")]
    ignored = list(generate(with_eos, "The cat", SamplingParams(max_tokens=10, ignore_eos=True)))
    assert len(ignored) == 10 and ignored[-1].finish_reason == "length"


def test_same_seed_same_sample_different_seed_differs(loaded):
    runs = {seed: _ids(loaded, "Once", max_tokens=24, temperature=1.5, seed=seed, ignore_eos=True)
            for seed in (1, 1, 2)}
    again = _ids(loaded, "Once", max_tokens=24, temperature=1.5, seed=1, ignore_eos=True)
    assert runs[1] == again
    assert runs[1] != runs[2]


def test_top_k_1_is_greedy(loaded):
    greedy = _ids(loaded, "abc", max_tokens=8, ignore_eos=True)
    assert _ids(loaded, "abc", max_tokens=8, temperature=0.8, top_k=1, seed=3, ignore_eos=True) == greedy


def test_streamed_text_is_the_decode_of_the_tokens(loaded):
    steps = list(generate(loaded, "Hi there", SamplingParams(max_tokens=20, temperature=1.0, seed=0,
                                                              ignore_eos=True)))
    assert "".join(s.text for s in steps) == loaded.tokenizer.decode([s.token_id for s in steps])


@pytest.mark.parametrize("prompt, message", [("", "empty"), ([1, 99999], "outside the vocabulary")])
def test_bad_prompts_are_value_errors(loaded, prompt, message):
    with pytest.raises(ValueError, match=message):
        list(generate(loaded, prompt, SamplingParams()))


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -1), ("top_p", 1.5), ("top_k", -2)])
def test_out_of_range_sampling_params_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
