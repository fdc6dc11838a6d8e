"""The engine in a process of its own (ProcessEngine) keeps AsyncEngine's promises: the synchronous
engine's tokens, aborts and departed consumers free their slots, a full queue refuses; and what is new
with a second process: a load error is a ModelLoadError, and a dead engine process fails the open
streams at once instead of leaving them hanging. One engine process is shared where a test allows it
(each start spawns an interpreter and imports torch)."""

import asyncio
import os
import signal
import time

import pytest
import torch

from engine.async_engine import EngineDead, EngineOverloaded, EngineStopped
from engine.demo import write_gated_deltanet
from engine.engine import EngineConfig, LLMEngine
from engine.engine_process import ModelSpec, ProcessEngine
from engine.errors import ModelLoadError
from engine.loader import load_model
from engine.sampling import SamplingParams

HYBRID = {"model_type": "gated_deltanet", "vocab_size": 300, "hidden_size": 48, "num_hidden_layers": 3,
          "num_heads": 2, "head_dim": 16, "expand_v": 1.5, "hidden_ratio": 2, "tie_word_embeddings": True,
          "attn": {"layers": [1], "num_heads": 3, "window_size": 40}}
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64)
LONG = SamplingParams(max_tokens=1500, ignore_eos=True)  # never reached: these get aborted


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_gated_deltanet(tmp_path_factory.mktemp("hybrid"), HYBRID, seed=8)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = ProcessEngine(ModelSpec(model_dir, device="cpu"), CONFIG)
    engine.start()
    yield engine
    engine.stop()


def _prompt(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Result:
    """Everything a request's outputs carried, joined."""

    def __init__(self):
        self.ids, self.text, self.finish, self.logprobs, self.prompt_logprobs = [], "", None, [], None

    def add(self, out):
        for c in out.outputs:
            self.ids, self.text, self.finish = self.ids + c.token_ids, self.text + c.text, c.finish_reason
            self.logprobs += c.logprobs or []
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        return self

    def __eq__(self, other):
        return vars(self) == vars(other)

    def __repr__(self):
        return repr(vars(self))


def _sync_results(model_dir, requests):
    """id -> Result from the synchronous engine in this process."""
    engine = LLMEngine(load_model(model_dir, device="cpu"), CONFIG)
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    results = {request_id: Result() for request_id, _, _ in requests}
    while engine.has_work():
        for out in engine.step():
            results[out.request_id].add(out)
    return results


async def _collect(engine, request_id, prompt, params):
    result = Result()
    async for out in engine.generate(request_id, prompt, params):
        result.add(out)
    return result


async def _drain(stream):
    async for _ in stream:
        pass


async def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_gives_the_tokens_of_the_synchronous_engine(engine, model_dir):
    requests = [(f"r{i}", _prompt(n, i), SamplingParams(max_tokens=12, ignore_eos=True))
                for i, n in enumerate([1, 5, 70, 33, 9, 120])]  # more than the 4 slots; 70 and 120 are chunked
    requests.append(("sampled", _prompt(20, 99), SamplingParams(max_tokens=12, temperature=0.9, seed=7, logprobs=2,
                                                                 prompt_logprobs=1, ignore_eos=True)))
    expected = _sync_results(model_dir, requests)

    async def scenario():
        results = await asyncio.wait_for(asyncio.gather(*(_collect(engine, *request) for request in requests)), 60)
        return {request_id: result for (request_id, _, _), result in zip(requests, results)}

    assert asyncio.run(scenario()) == expected
    assert len(expected["sampled"].logprobs) == 12 and len(expected["sampled"].prompt_logprobs) == 20
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.slots_used, stats.slots_total) == (0, 0, 0, 4)
    assert stats.steps >= 12 and stats.step_seconds > 0  # the engine process's own counters came across


def test_abort_and_a_consumer_that_leaves_free_their_slots(engine):
    async def scenario():
        aborted = engine.generate("aborted", _prompt(8, 1), LONG)
        first = await aborted.__anext__()
        assert not first.finished and engine.stats().slots_used == 1
        engine.abort("aborted")
        rest = [out async for out in aborted]
        assert rest[-1].finished and rest[-1].outputs[-1].finish_reason == "abort"
        await _until(lambda: engine.stats().slots_used == 0)

        left = engine.generate("left", _prompt(8, 2), LONG)
        async for _ in left:
            break  # the client went away after one chunk
        await left.aclose()
        await _until(lambda: engine.stats().slots_used == 0 and engine.stats().num_running == 0)

    asyncio.run(scenario())


def test_a_full_queue_refuses_with_overloaded(engine):
    async def scenario():
        engine.max_queued_requests = 0
        try:
            with pytest.raises(EngineOverloaded):
                await _collect(engine, "x", [1, 2], SamplingParams(max_tokens=2))
        finally:
            engine.max_queued_requests = 1024

    asyncio.run(scenario())
    assert engine.stats().num_waiting == 0


def test_requests_are_validated_in_the_server_process(engine):
    assert engine.max_model_len == 2048 and engine.limits.max_num_seqs == 4 and engine.limits.vocab_size == 300
    with pytest.raises(ValueError, match="context limit of 2048"):
        engine.validate([1, 2], SamplingParams(max_tokens=2047))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.validate([1, 300], SamplingParams())
    with pytest.raises(ValueError, match="n=5"):
        engine.validate([1], SamplingParams(n=5))


def test_a_model_that_cannot_load_is_a_model_load_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as in_thread:
        load_model(tmp_path / "empty", device="cpu")
    engine = ProcessEngine(ModelSpec(tmp_path / "empty", device="cpu"))
    with pytest.raises(ModelLoadError) as in_process:
        engine.start()
    assert str(in_process.value) == str(in_thread.value)
    assert engine._process.exitcode == 0  # reported, then exited: nothing left running


def test_an_engine_process_that_dies_fails_open_streams_at_once(model_dir):
    engine = ProcessEngine(ModelSpec(model_dir, device="cpu"), CONFIG)
    engine.start()

    async def scenario():
        stream = engine.generate("doomed", _prompt(8, 3), LONG)
        await stream.__anext__()
        os.kill(engine.pid, signal.SIGKILL)  # as the OOM killer would
        with pytest.raises(EngineDead, match="SIGKILL"):
            await asyncio.wait_for(_drain(stream), timeout=5)  # not a hang
        with pytest.raises(EngineDead):
            await _collect(engine, "late", [1, 2], SamplingParams(max_tokens=2))

    try:
        asyncio.run(scenario())
        assert not engine.stats().alive and engine.error is not None
    finally:
        engine.stop()
    assert engine._process.exitcode == -signal.SIGKILL


def test_stop_ends_open_streams_and_reaps_the_engine_process(model_dir):
    engine = ProcessEngine(ModelSpec(model_dir, device="cpu"), CONFIG)
    engine.start()

    async def scenario():
        stream = engine.generate("running", _prompt(8, 4), LONG)
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(_drain(stream), timeout=5)
        with pytest.raises(EngineStopped):
            await _collect(engine, "late", [1, 2], SamplingParams(max_tokens=2))

    asyncio.run(scenario())
    assert engine._process.exitcode == 0


def test_outputs_that_queued_up_merge_from_their_packed_form_as_from_the_outputs_themselves():
    from engine.engine_process import _merge_packed, _pack
    from engine.request import CompletionOutput, RequestOutput, merge_outputs
    from engine.sampling import TokenLogprob

    def out(text, token, finish=None, logprobs=None, done=False, count=1):
        return RequestOutput("r", [CompletionOutput(0, text, [token], logprobs, finish, None)], [], None, done, 7,
                             count)

    plain = [out("a", 97, count=1), out("é", 233, count=2), out('"', 34, count=3)]
    mixed = plain + [out("z", 122, logprobs=[TokenLogprob(122, -0.5, [(122, -0.5)])], count=4),
                     out("", 0, finish="length", done=True, count=5)]
    for outputs in (plain[:1], plain, mixed):
        merged = _merge_packed("r", [_pack(o) for o in outputs])
        expected = outputs[0]
        for later in outputs[1:]:
            expected = merge_outputs(expected, later)
        assert merged == expected
