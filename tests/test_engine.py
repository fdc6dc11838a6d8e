"""The engine's promises: batching never changes a request's output, slots are never shared and
always come back, n > 1 forks one prefill, stop strings and seeds behave."""

import asyncio
import dataclasses
import time

import pytest
import torch

from engine.async_engine import AsyncEngine, EngineOverloaded
from engine.cuda_graphs import attention_lengths
from engine.demo import write_gated_deltanet
from engine.engine import EngineConfig, LLMEngine
from engine.loader import load_model
from engine.models import attention
from engine.sampling import SamplingParams
from engine.stopping import StopChecker

HYBRID = {"model_type": "gated_deltanet", "vocab_size": 300, "hidden_size": 48, "num_hidden_layers": 3,
          "num_heads": 2, "head_dim": 16, "expand_v": 1.5, "hidden_ratio": 2, "tie_word_embeddings": True,
          "attn": {"layers": [1], "num_heads": 3, "window_size": 40}}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(write_gated_deltanet(tmp_path_factory.mktemp("hybrid"), HYBRID, seed=8), device="cpu")


def _prompt(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _drive(engine, arrivals, check=None):
    """Run until idle; arrivals maps step number -> [(id, prompt, params)]. Returns id -> (ids, text, finish)."""
    results, step = {}, 0
    while engine.has_work() or any(s >= step for s in arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            for c in out.outputs:
                ids, text, _ = results.get((out.request_id, c.index), ([], "", None))
                results[(out.request_id, c.index)] = (ids + c.token_ids, text + c.text, c.finish_reason)
        if check:
            check(engine)
        step += 1
    return results


def _slots_unique(engine):
    held = [s.slot for r in engine.scheduler.running for s in r.sequences if s.slot is not None]
    assert len(held) == len(set(held))
    assert len(held) + engine.pool.num_free == engine.pool.capacity


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_greedy_output_is_the_same_alone_and_among_many(loaded):
    lengths = [1, 5, 17, 40, 63, 64, 65, 90, 3, 33, 120, 8, 50, 2, 77, 21, 44, 9]
    prompts = {f"r{i}": _prompt(n, i) for i, n in enumerate(lengths)}
    alone = {}
    for rid, prompt in prompts.items():
        engine = LLMEngine(loaded, EngineConfig(max_num_seqs=1, max_num_batched_tokens=256))
        alone[rid] = _drive(engine, {0: [(rid, prompt, GREEDY)]})[(rid, 0)]
    # Many at once, arriving over several steps, with a small token budget: prompts are chunked
    # across steps and mixed with other requests' decodes; fewer slots than requests, so slots
    # are reused as requests finish.
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=7, max_num_batched_tokens=48))
    arrivals = {}
    for i, (rid, prompt) in enumerate(prompts.items()):
        arrivals.setdefault(i % 5 * 3, []).append((rid, prompt, GREEDY))
    together = _drive(engine, arrivals, check=_slots_unique)
    for rid in prompts:
        assert together[(rid, 0)] == alone[rid], rid
    assert engine.pool.num_free == engine.pool.capacity and not engine.requests


def test_static_decode_path_gives_the_eager_output(loaded):
    # The padded fixed-size decode step that CUDA graphs capture, run eagerly: padding rows go to
    # the scratch slot, attention reads whole slot buffers masked by position.
    prompts = {f"r{i}": _prompt(n, 40 + i) for i, n in enumerate([3, 70, 20, 9, 45])}
    arrivals = {0: [(rid, p, GREEDY) for rid, p in list(prompts.items())[:3]],
                4: [(rid, p, GREEDY) for rid, p in list(prompts.items())[3:]]}
    eager = _drive(LLMEngine(loaded, EngineConfig(max_num_seqs=6, decode_graphs=False)), arrivals)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=6, decode_graphs=True))
    assert engine.decode_step is not None and engine.decode_step.sizes == [1, 2, 4, 6]
    static = _drive(engine, arrivals, check=_slots_unique)
    assert static == eager


def test_static_decode_reads_the_shortest_length_bucket_that_holds_the_batch(loaded, monkeypatch):
    # Attention in a captured step reads a fixed number of positions per slot: the next bucket above
    # the longest sequence, not the whole buffer; the tokens are those of the eager engine.
    prompts = {f"r{i}": _prompt(n, 60 + i) for i, n in enumerate([3, 30, 9])}
    arrivals = {0: [(rid, p, GREEDY) for rid, p in prompts.items()]}
    eager = _drive(LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_model_len=200, decode_graphs=False)), arrivals)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_model_len=200, decode_graphs=True))
    assert attention_lengths(200) == [200] and attention_lengths(1000) == [256, 512, 1000]
    engine.decode_step.lengths = attention_lengths(200, smallest=16)  # [16, 32, 64, 128, 200]
    read = []
    attend = attention.attend_decode
    monkeypatch.setattr(attention, "attend_decode",
                        lambda q, pos, *a: read.append((a[-2], int(pos.max()))) or attend(q, pos, *a))
    assert _drive(engine, arrivals) == eager
    # 3 layers, one of them attention: one read per step; the longest sequence grows from 30 to 41 tokens
    assert {length for length, _ in read} == {32, 64}
    assert all(longest < length <= 2 * max(longest, 16) for length, longest in read)


def test_aborts_free_slots_mid_prefill_and_mid_decode(loaded):
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16))
    engine.add_request("short", _prompt(4, 2), GREEDY)
    engine.add_request("long", _prompt(100, 1), GREEDY)  # 100 tokens at 15 a step: still prefilling
    for _ in range(3):
        engine.step()
    assert engine.requests["long"].prefilling and not engine.requests["short"].prefilling
    assert engine.pool.num_free == 2
    out = engine.abort("long")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.pool.num_free == 3
    engine.abort("short")
    assert engine.pool.num_free == 4 and not engine.has_work()


def test_n_choices_fork_one_prefill(loaded, monkeypatch):
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    fed = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda ids, *a: fed.append(len(ids)) or forward(ids, *a))
    prompt = _prompt(70, 3)
    request = engine.add_request("g", prompt, SamplingParams(n=3, max_tokens=6, ignore_eos=True))
    engine.step()  # the prompt, once; then every choice holds a copy of its state
    slots = [seq.slot for seq in request.sequences]
    for layer, conv in enumerate(engine.pool.conv):
        if conv is not None:
            rec = engine.pool.recurrent[layer]
            assert rec[slots[0]].abs().sum() > 0
            assert all(torch.equal(rec[s], rec[slots[0]]) and torch.equal(conv[s], conv[slots[0]]) for s in slots)
        else:
            assert all(torch.equal(engine.pool.keys[layer][s], engine.pool.keys[layer][slots[0]]) for s in slots)
    greedy = _drive(engine, {})
    assert fed[0] == 70 and all(n == 3 for n in fed[1:])  # then 3 decodes a step
    single = _drive(LLMEngine(loaded), {0: [("one", prompt, SamplingParams(max_tokens=6, ignore_eos=True))]})
    assert greedy[("g", 0)][0] == greedy[("g", 1)][0] == greedy[("g", 2)][0] == single[("one", 0)][0][1:]
    sampled = _drive(engine, {0: [("s", prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=4,
                                                                 ignore_eos=True))]})
    assert len({tuple(sampled[("s", i)][0]) for i in range(3)}) > 1


def test_same_seed_same_text_whatever_the_batch(loaded):
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=123, ignore_eos=True)
    alone = _drive(LLMEngine(loaded, EngineConfig(max_num_seqs=2)), {0: [("x", _prompt(30, 5), params)]})
    noisy = {0: [(f"o{i}", _prompt(10 + i, 50 + i), SamplingParams(max_tokens=10, temperature=1.0,
                                                                   ignore_eos=True)) for i in range(5)]}
    noisy[2] = [("x", _prompt(30, 5), params)]
    together = _drive(LLMEngine(loaded, EngineConfig(max_num_seqs=8)), noisy)
    assert together[("x", 0)] == alone[("x", 0)]


def test_stop_string_spanning_tokens_ends_the_text_before_it(loaded):
    # Bias the random model towards ten ASCII letters (one token each) so its text is readable.
    letters = tuple((t, 30.0) for t in loaded.tokenizer.encode("abcdefghij", add_special_tokens=False))
    prompt = _prompt(12, 9)
    params = SamplingParams(max_tokens=20, ignore_eos=True, logit_bias=letters, temperature=1.0, seed=3)
    free = _drive(LLMEngine(loaded), {0: [("a", prompt, params)]})
    text = free[("a", 0)][1]
    assert len(text) == 20
    start = next(i for i in range(3, 17) if text.find(text[i:i + 3]) == i)  # first occurrence, not at 0
    stop = text[start:start + 3]  # three tokens
    stopped = _drive(LLMEngine(loaded), {0: [("b", prompt, dataclasses.replace(params, stop=(stop,)))]})
    ids, got, finish = stopped[("b", 0)]
    assert got == text[:text.index(stop)] and finish == "stop"
    assert len(ids) == text.index(stop) + 3  # the tokens of the stop string were generated, not shown


def test_stop_string_does_not_end_the_output_before_min_tokens(loaded):
    # min_tokens keeps EOS and stop token ids out of the first tokens; a stop string in them must not end
    # the output either (vLLM's rule): the first match counts only from token min_tokens + 1 on.
    letters = tuple((t, 30.0) for t in loaded.tokenizer.encode("abcdefghij", add_special_tokens=False))
    params = SamplingParams(max_tokens=20, ignore_eos=True, logit_bias=letters, temperature=1.0, seed=3)
    text = _drive(LLMEngine(loaded), {0: [("a", _prompt(12, 9), params)]})[("a", 0)][1]
    stop = next(c for c in text[:5] if c in text[5:19])  # one letter, one token, in the first five and after
    later = text.find(stop, 5)
    held_off = dataclasses.replace(params, stop=(stop,), min_tokens=5)
    ids, got, finish = _drive(LLMEngine(loaded), {0: [("b", _prompt(12, 9), held_off)]})[("b", 0)]
    assert (got, finish, len(ids)) == (text[:later], "stop", later + 1)


def test_requests_without_stop_strings_skip_the_stop_checker_and_keep_their_text(loaded, monkeypatch):
    params = SamplingParams(max_tokens=15, temperature=1.0, seed=2, ignore_eos=True)
    expected = _drive(LLMEngine(loaded), {0: [("a", _prompt(12, 9), params)]})[("a", 0)]
    assert expected[1] == loaded.tokenizer.decode(expected[0])

    def refuse(self, text):
        raise AssertionError("a request without stop strings fed its stop checker")
    monkeypatch.setattr(StopChecker, "feed", refuse)
    assert _drive(LLMEngine(loaded), {0: [("a", _prompt(12, 9), params)]})[("a", 0)] == expected


def test_prompt_logprobs_match_a_direct_forward(loaded):
    prompt = _prompt(75, 11)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32))  # 3 chunks
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    lp = next(o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None)
    model = loaded.model
    expected = torch.log_softmax(model.logits(model.run(torch.tensor(prompt), model.new_state())), -1)
    assert lp[0] is None and len(lp) == len(prompt)
    for i in range(1, len(prompt)):
        assert lp[i].token_id == prompt[i]
        assert abs(lp[i].logprob - expected[i - 1, prompt[i]].item()) < 1e-4


def test_request_that_can_never_run_is_rejected_up_front(loaded):
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=2, max_model_len=50))
    for prompt, params, message in [([], GREEDY, "empty"), ([1, 999], GREEDY, "vocabulary"),
                                    (_prompt(45, 1), GREEDY, "context"),
                                    ([1], SamplingParams(n=3, max_tokens=4), "n=3")]:
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", prompt, params)
    assert not engine.has_work()


def test_max_model_len_beyond_the_models_context_is_refused_at_start(loaded):
    # It was taken as given: a slot's attention buffer sized for positions the model was never trained on.
    assert loaded.config.max_position_embeddings == 2048
    assert LLMEngine(loaded, EngineConfig(max_num_seqs=1, max_model_len=2048)).max_model_len == 2048
    with pytest.raises(ValueError, match="max_model_len 2049 exceeds the model's context of 2048 tokens"):
        LLMEngine(loaded, EngineConfig(max_num_seqs=1, max_model_len=2049))


def test_slot_pool_on_cpu_is_sized_to_the_memory_available(loaded, monkeypatch):
    # On CPU every asked-for slot was allocated whatever it held: a real hybrid model's default context
    # (keys and values for 262144 positions, 64 slots) died in the allocator, or under the OOM killer.
    per_slot = LLMEngine(loaded, EngineConfig(max_num_seqs=1, max_model_len=2048)).pool.bytes_per_slot()
    monkeypatch.setattr("engine.engine.free_memory", lambda device: int(6.5 * per_slot / 0.9))
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=8, max_model_len=2048))
    assert engine.pool.capacity == engine.limits.max_num_seqs == 5  # 6 rows fit; one is the scratch row
    monkeypatch.setattr("engine.engine.free_memory", lambda device: per_slot)
    with pytest.raises(ValueError, match="the slot pool does not fit.*lower --max-model-len"):
        LLMEngine(loaded, EngineConfig(max_num_seqs=8, max_model_len=2048))


def test_cpu_free_memory_is_capped_by_the_containers_memory_limit(tmp_path):
    # In a container MemAvailable is the host's; the cgroup's limit is what the OOM killer enforces.
    from engine.engine import free_memory
    cpu = torch.device("cpu")
    (tmp_path / "meminfo").write_text("MemTotal: 64000000 kB\nMemAvailable: 32000000 kB\n")
    limited = tmp_path / "limited"
    limited.mkdir()
    (limited / "memory.max").write_text("4294967296\n")
    (limited / "memory.current").write_text("1073741824\n")
    assert free_memory(cpu, str(tmp_path / "meminfo"), str(limited)) == 3 * 2**30
    unlimited = tmp_path / "unlimited"
    unlimited.mkdir()
    (unlimited / "memory.max").write_text("max\n")
    assert free_memory(cpu, str(tmp_path / "meminfo"), str(unlimited)) == 32000000 * 1024
    assert free_memory(cpu, str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_async_consumer_that_leaves_frees_its_slot(loaded):
    async def scenario():
        engine = AsyncEngine(LLMEngine(loaded, EngineConfig(max_num_seqs=2)), max_queued_requests=2)
        engine.start()
        try:
            full = [o async for o in engine.generate("a", _prompt(8, 1), SamplingParams(max_tokens=5,
                                                                                         ignore_eos=True))]
            assert full[-1].finished and sum(len(c.token_ids) for o in full for c in o.outputs) == 5
            stream = engine.generate("b", _prompt(8, 2), SamplingParams(max_tokens=1000, ignore_eos=True))
            async for _ in stream:
                break  # the client went away after one chunk
            await stream.aclose()
            for _ in range(200):
                if engine.stats().slots_used == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().slots_used == 0 and engine.stats().num_running == 0
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_async_consumer_that_falls_behind_gets_what_queued_in_one_piece(loaded):
    """A slow consumer (a busy event loop) takes the outputs that queued up merged, in order, with
    nothing lost: the same tokens, text and logprobs as the synchronous engine, in fewer pieces."""
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=5, logprobs=2, n=2)
    sync = _drive(LLMEngine(loaded, EngineConfig(max_num_seqs=4)), {0: [("r", _prompt(9, 3), params)]})

    async def scenario():
        engine = AsyncEngine(LLMEngine(loaded, EngineConfig(max_num_seqs=4)))
        engine.start()
        try:
            pieces, tokens, texts, logprobs = 0, {}, {}, {}
            async for out in engine.generate("r", _prompt(9, 3), params):
                pieces += 1
                for c in out.outputs:
                    tokens.setdefault(c.index, []).extend(c.token_ids)
                    texts[c.index] = texts.get(c.index, "") + c.text
                    logprobs.setdefault(c.index, []).extend(c.logprobs or [])
                time.sleep(0.05)  # blocks the loop, as serving many streams does, while the engine steps on
            return pieces, tokens, texts, logprobs
        finally:
            engine.stop()

    pieces, tokens, texts, logprobs = asyncio.run(scenario())
    for index in (0, 1):
        assert (tokens[index], texts[index]) == sync[("r", index)][:2]
        assert len(logprobs[index]) == 24
    assert pieces < 24


def test_async_queue_bound_rejects_with_overloaded(loaded):
    async def scenario():
        engine = AsyncEngine(LLMEngine(loaded, EngineConfig(max_num_seqs=1)), max_queued_requests=0)
        engine.start()
        try:
            with pytest.raises(EngineOverloaded):
                async for _ in engine.generate("x", [1, 2], GREEDY):
                    pass
        finally:
            engine.stop()

    asyncio.run(scenario())
