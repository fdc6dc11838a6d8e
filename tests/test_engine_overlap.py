"""Decode steps overlapped with the host's work on the previous step's tokens (EngineConfig.
overlap_decode): the next step is launched on the device's tokens before the host reads them, so
a sequence that the in-flight token ends gets one extra token computed, which must never show."""

import pytest
from engine.default_model import shipped_model_dir
from engine.engine import EngineConfig, LLMEngine
from engine.in_flight import InFlightDecode
from engine.loader import load_model
from engine.sampling import SamplingParams

PROMPTS = ["import os\n", "def main(", "class Foo:\n    ", "for i in range(", "x = [", "return "]


@pytest.fixture(scope="module")
def loaded():
    # The shipped model: trained, so greedy text varies and stop strings and tokens fire mid-way.
    return load_model(shipped_model_dir(), device="cpu")


def _prompt(loaded, i):
    return loaded.tokenizer.encode(PROMPTS[i])


def _engine(loaded, overlap):
    return LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, decode_graphs=True,
                                          overlap_decode=overlap))


def _drive(engine, arrivals, aborts=None):
    """Run until idle; arrivals: step -> [(id, prompt, params)], aborts: step -> [id].
    Returns id -> (token ids, text, finish reason) and the steps at which outputs came."""
    results, step, aborts = {}, 0, aborts or {}
    while engine.has_work() or any(s >= step for s in arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for request_id in aborts.get(step, []):
            engine.abort(request_id)
            assert request_id not in engine.requests
        for out in engine.step():
            for c in out.outputs:
                ids, text, reason = results.get(out.request_id, ([], "", None))
                assert reason is None, f"{out.request_id} got output after it finished"
                results[out.request_id] = (ids + c.token_ids, text + c.text, c.finish_reason)
        held = [s.slot for r in engine.scheduler.running for s in r.sequences if s.slot is not None]
        assert len(held) == len(set(held)) and len(held) + engine.pool.num_free == engine.pool.capacity
        step += 1
    assert engine.pool.num_free == engine.pool.capacity and not engine.requests
    return results


def _count_launches(monkeypatch):
    launches = []
    launch = InFlightDecode.launch.__func__

    def counted(cls, seqs, logits):
        launches.append(len(seqs))
        return launch(cls, seqs, logits)

    monkeypatch.setattr(InFlightDecode, "launch", classmethod(counted))
    return launches


def test_overlapped_decode_gives_the_same_outputs_and_stops_in_the_same_place(loaded, monkeypatch):
    greedy = SamplingParams(max_tokens=14, ignore_eos=True)
    prompts = {f"r{i}": _prompt(loaded, i) for i in range(len(PROMPTS))}
    plain = _drive(_engine(loaded, False), {0: [(rid, p, greedy) for rid, p in prompts.items()]})
    # Stops that fire mid-generation: a stop string from r1's text, a stop token from r2's tokens,
    # and a short max_tokens for r3, so sequences end while a step after their last is in flight.
    r1_text, r2_ids = plain["r1"][1], plain["r2"][0]
    first_new = next(j for j in range(2, len(r2_ids)) if r2_ids[j] not in r2_ids[:j])
    cut = next(i for i in range(3, len(r1_text) - 2) if r1_text.find(r1_text[i:i + 2]) == i)
    stop_text = r1_text[cut:cut + 2]
    params = {"r0": greedy, "r1": SamplingParams(max_tokens=14, ignore_eos=True, stop=[stop_text]),
              "r2": SamplingParams(max_tokens=14, ignore_eos=True, stop_token_ids=[r2_ids[first_new]]),
              "r3": SamplingParams(max_tokens=3, ignore_eos=True), "r4": greedy, "r5": greedy}
    arrivals = {0: [(rid, prompts[rid], params[rid]) for rid in ("r0", "r1", "r2", "r3")],
                6: [(rid, prompts[rid], params[rid]) for rid in ("r4", "r5")]}
    expected = _drive(_engine(loaded, False), arrivals)
    launches = _count_launches(monkeypatch)
    overlapped = _drive(_engine(loaded, True), arrivals)
    assert launches, "no decode step was overlapped"
    assert overlapped == expected
    assert expected["r1"][1] == r1_text[:cut] and expected["r1"][2] == "stop"
    assert expected["r2"][0] == r2_ids[:first_new + 1] and expected["r3"][2] == "length" and len(expected["r3"][0]) == 3


def test_drawn_tokens_are_overlapped_and_seeds_still_reproduce(loaded, monkeypatch):
    # Temperature, top-k/p, min-p, a seed and a logit bias need nothing from the previous token:
    # the step after is launched before the host reads it, and the seeded draws stay the same.
    drawn = {"a": SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5),
             "b": SamplingParams(max_tokens=10, temperature=0.7, top_k=20, min_p=0.05, seed=6,
                                 logit_bias={10: 3.0}),
             "c": SamplingParams(max_tokens=10, ignore_eos=True)}
    arrivals = {0: [(rid, _prompt(loaded, i), p) for i, (rid, p) in enumerate(drawn.items())]}
    launches = _count_launches(monkeypatch)
    overlapped = _drive(_engine(loaded, True), arrivals)
    assert launches and max(launches) == 3
    assert overlapped == _drive(_engine(loaded, False), arrivals)


def test_requests_that_need_their_history_are_not_overlapped(loaded, monkeypatch):
    # Penalties count the previous token, min_tokens bans by the output's length, logprobs are read back.
    launches = _count_launches(monkeypatch)
    needy = {"pen": SamplingParams(max_tokens=8, temperature=0.8, seed=5, repetition_penalty=1.3),
             "min": SamplingParams(max_tokens=8, min_tokens=6),
             "lp": SamplingParams(max_tokens=8, logprobs=2)}
    arrivals = {0: [(rid, _prompt(loaded, i), p) for i, (rid, p) in enumerate(needy.items())]}
    results = _drive(_engine(loaded, True), arrivals)
    assert not launches and all(len(ids) == 8 for ids, _, _ in results.values())
    assert results == _drive(_engine(loaded, False), arrivals)


def test_abort_while_a_step_is_in_flight_frees_the_slot_and_sends_nothing_more(loaded):
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    engine = _engine(loaded, True)
    prompts = {"keep": _prompt(loaded, 2), "drop": _prompt(loaded, 3)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, greedy)
    for _ in range(5):
        engine.step()
    assert engine._in_flight is not None and len(engine._in_flight.seqs) == 2
    engine.abort("drop")
    assert engine.pool.num_free == engine.pool.capacity - 1
    rest = {}
    while engine.has_work():
        for out in engine.step():
            assert out.request_id == "keep"
            rest.setdefault(out.request_id, []).extend(t for c in out.outputs for t in c.token_ids)
    alone = _drive(_engine(loaded, False), {0: [("keep", prompts["keep"], greedy)]})
    assert rest["keep"] == alone["keep"][0][-len(rest["keep"]):]
    assert engine.pool.num_free == engine.pool.capacity
