"""The batched sampler: what each parameter does to the chosen tokens and to the reported logprobs."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.sampling import SamplingParams, SequenceSampler, prompt_logprobs, sample_batch

VOCAB = 50
EOS = 7


def _sampler(prompt=(1, 2, 3), vocab=VOCAB, seed_offset=0, **params):
    return SequenceSampler(SamplingParams(**params), list(prompt), frozenset({EOS}), vocab, seed_offset)


def _logits(rows, vocab=VOCAB, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _run(samplers, steps, seed=0):
    """Decode `steps` tokens for every sampler; each step's logits are random but the same in every row."""
    for step in range(steps):
        logits = _logits(1, seed=seed * 1000 + step).repeat(len(samplers), 1)
        for sampler, token in zip(samplers, sample_batch(logits, samplers).token_ids):
            sampler.append(token)
    return [s.output_ids for s in samplers]


def test_greedy_takes_the_argmax_and_leaves_the_logits_alone():
    logits = _logits(6)
    before = logits.clone()
    out = sample_batch(logits, [_sampler() for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(logits, before)


class _Outputs(TorchDispatchMode):
    """Records the shape of every new tensor a torch op makes (not views or returns of its inputs)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_an_all_greedy_batch_makes_no_vocab_sized_tensor():
    # The serving fast path: argmax on the logits where they are, only the [B] ids go to the host.
    logits = _logits(8)
    samplers = [_sampler(min_tokens=i % 2) for i in range(8)]  # min_tokens 1 with no output yet bans EOS...
    plain = logits[::2]  # ...so only the min_tokens=0 rows are plain argmax
    with _Outputs() as ops:
        sample_batch(plain, samplers[::2])
    assert ops.shapes and all(shape == (4,) for shape in ops.shapes), ops.shapes
    with _Outputs() as ops:
        tokens = sample_batch(logits, samplers).token_ids
    assert (8, VOCAB) in ops.shapes  # EOS banned in half the rows: those logits are processed
    expected = logits.clone()
    expected[1::2, EOS] = float("-inf")
    assert tokens == expected.argmax(dim=-1).tolist()


def test_a_batch_without_penalties_bias_or_min_tokens_does_not_copy_the_logits():
    logits = _logits(4)
    samplers = [_sampler(), _sampler(temperature=1.0, seed=1), _sampler(logprobs=2), _sampler(temperature=0.5)]
    with _Outputs() as ops:
        sample_batch(logits, samplers)
    assert ops.shapes.count((4, VOCAB)) == 0  # read in place; only the drawn rows [2, vocab] are computed on


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_1_and_tiny_top_p_are_greedy(truncation):
    logits = _logits(16, seed=1)
    samplers = [_sampler(temperature=1.5, seed=i if i % 2 else None, **truncation) for i in range(16)]
    assert sample_batch(logits, samplers).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    tokens = set(sample_batch(logits, [_sampler(vocab=5, temperature=2.0, top_k=2) for _ in range(4000)]).token_ids)
    assert tokens == {1, 3}


def test_min_p_drops_tokens_below_min_p_times_the_top_probability():
    probs = torch.tensor([0.40, 0.25, 0.19, 0.10, 0.06])
    logits = probs.log().repeat(4000, 1)
    torch.manual_seed(0)
    tokens = set(sample_batch(logits, [_sampler(vocab=5, temperature=1.0, min_p=0.45) for _ in range(4000)]).token_ids)
    assert tokens == {0, 1, 2}  # 0.19 >= 0.45 * 0.40 = 0.18 > 0.10


def test_frequencies_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    expected = torch.softmax(logits / 0.7, dim=-1)
    rows = 20000
    torch.manual_seed(0)
    unseeded = sample_batch(logits.repeat(rows, 1), [_sampler(vocab=5, temperature=0.7) for _ in range(rows)])
    seeded = sample_batch(logits.repeat(rows, 1), [_sampler(vocab=5, temperature=0.7, seed=s) for s in range(rows)])
    for out in (unseeded, seeded):
        counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float() / rows
        assert torch.allclose(counts, expected, atol=0.015), (counts, expected)


def test_same_seed_same_tokens_alone_and_in_a_mixed_batch():
    params = dict(temperature=0.9, top_p=0.95, seed=1234)
    alone = _run([_sampler(**params)], steps=12)[0]
    others = [_sampler(temperature=1.0), _sampler(temperature=0.5, seed=7), _sampler(), _sampler(temperature=2.0),
              _sampler(temperature=1.0, top_k=5, seed=99), _sampler(temperature=0.8, min_p=0.1),
              _sampler(temperature=1.0, logprobs=3)]
    batch = [*others[:3], _sampler(**params), *others[3:]]
    assert len(batch) == 8
    torch.manual_seed(5)  # the unseeded rows draw from the global generator; that must not matter
    assert _run(batch, steps=12)[3] == alone


def test_different_seeds_and_different_choices_of_one_request_differ():
    runs = [_run([_sampler(temperature=1.0, seed=seed)], steps=16)[0] for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    choices = _run([_sampler(temperature=1.0, seed=1, seed_offset=i) for i in range(2)], steps=16)
    assert choices[0] == runs[0] and choices[1] != runs[0]


def test_penalties_change_logits_as_the_formulas_say():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0, 0.5]])
    sampler = _sampler(prompt=[0, 1], vocab=6, repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25, logprobs=6)
    for token in (1, 2, 2):
        sampler.append(token)
    expected = torch.tensor([
        2.0 / 2,                   # in the prompt, positive: divided by the repetition penalty
        -2.0 * 2 - 0.5 - 0.25,     # in prompt and output once: multiplied, then frequency x1 and presence
        1.0 / 2 - 0.5 * 2 - 0.25,  # in the output twice
        -1.0, 3.0, 0.5,            # never seen: unchanged
    ])
    out = sample_batch(logits, [sampler])
    assert out.token_ids == [4]
    reported = dict(out.logprobs[0].top)
    assert [reported[t] for t in range(6)] == pytest.approx(torch.log_softmax(expected, dim=-1).tolist(), abs=1e-6)


def test_logit_bias_minus_100_bans_and_plus_100_forces():
    logits = _logits(200, seed=3)
    top = logits[0].argmax().item()
    banned = _sampler(logit_bias={top: -100})
    forced = [_sampler(temperature=1.0, logit_bias=((11, 100.0),)) for _ in range(199)]
    tokens = sample_batch(logits[:1].repeat(200, 1), [banned, *forced]).token_ids
    assert tokens[0] == logits[0].topk(2).indices[1].item()
    assert tokens[1:] == [11] * 199


def test_min_tokens_keeps_eos_and_stop_token_ids_out_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 9], logits[0, 4] = 10.0, 9.0, 8.0
    plain = _sampler(min_tokens=3, stop_token_ids=(9,))
    assert _run_fixed(plain, logits, 4) == [4, 4, 4, EOS]
    # under ignore_eos, EOS is an ordinary token and is not held back; stop_token_ids still are
    assert _run_fixed(_sampler(min_tokens=2, stop_token_ids=(9,), ignore_eos=True), logits, 3) == [EOS, EOS, EOS]
    logits[0, EOS] = 0.0
    assert _run_fixed(_sampler(min_tokens=2, stop_token_ids=(9,), ignore_eos=True), logits, 3) == [4, 4, 9]


def _run_fixed(sampler, logits, steps):
    for _ in range(steps):
        sampler.append(sample_batch(logits, [sampler]).token_ids[0])
    return sampler.output_ids


def test_logprobs_are_log_softmax_before_temperature_with_sorted_top_k():
    logits = _logits(3, seed=4)
    samplers = [_sampler(temperature=0.5, seed=1, logprobs=4), _sampler(logprobs=0), _sampler()]
    out = sample_batch(logits, samplers)
    expected = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(expected[0, first.token_id].item(), abs=1e-6)
    values, ids = expected[0].topk(4)
    assert [t for t, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    second = out.logprobs[1]
    assert second.top == [] and second.logprob == pytest.approx(expected[1].max().item(), abs=1e-6)
    assert out.logprobs[2] is None


def test_prompt_logprobs_start_with_none_and_gather_log_softmax():
    prompt = [5, 17, 3, 42, 8]
    logits = _logits(len(prompt), seed=6)
    expected = torch.log_softmax(logits, dim=-1)
    for rows in (len(prompt), len(prompt) - 1):  # the last row predicts a generated token; it may be left off
        entries = prompt_logprobs(logits[:rows], prompt, k=2)
        assert entries[0] is None and len(entries) == len(prompt)
        for i in range(1, len(prompt)):
            assert entries[i].token_id == prompt[i]
            assert entries[i].logprob == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-6)
            assert [t for t, _ in entries[i].top] == expected[i - 1].topk(2).indices.tolist()
    assert prompt_logprobs(logits[:1], prompt[:1], k=2) == [None]


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 65), ("temperature", -0.1),
    ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("min_p", 1.5), ("min_p", -0.1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("frequency_penalty", 3.0), ("frequency_penalty", -3.0),
    ("repetition_penalty", 0.0), ("logit_bias", {5: 101}), ("logit_bias", {-1: 1}), ("logit_bias", {"x": 1}),
    ("stop", ("",)), ("stop_token_ids", (-1,)), ("logprobs", -1), ("logprobs", 21), ("prompt_logprobs", -1),
])
def test_out_of_range_params_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_client_spellings_are_accepted():
    params = SamplingParams(top_k=-1, stop=["###"], stop_token_ids=[3], logit_bias={"5": 1.5})
    assert (params.top_k, params.stop, params.stop_token_ids, params.logit_bias) == (0, ("###",), (3,), ((5, 1.5),))
    hash(params)


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
def test_token_ids_outside_the_vocabulary_are_rejected(field):
    value = {VOCAB: 1.0} if field == "logit_bias" else (VOCAB,)
    with pytest.raises(ValueError, match=field):
        _sampler(**{field: value})


def test_a_temperature_beyond_float32_draws_among_the_allowed_tokens_only():
    # 1e39 is inf in float32: a banned token's -inf / inf was NaN, and the draw took token 0, banned or not.
    logits = _logits(1, seed=8).repeat(300, 1)
    banned = [_sampler(temperature=1e39, min_tokens=1, stop_token_ids=(0,), seed=i) for i in range(150)]
    top_two = [_sampler(temperature=1e39, top_k=2, seed=i) for i in range(150)]
    tokens = sample_batch(logits, banned + top_two).token_ids
    assert not {0, EOS} & set(tokens[:150]) and len(set(tokens[:150])) > 30  # spread over the rest
    assert set(tokens[150:]) == set(logits[0].topk(2).indices.tolist())


def test_a_repetition_penalty_beyond_float32_keeps_every_logit_a_number():
    # 1e39 is inf in float32 and 0 * inf is NaN, which the argmax took; 1e-39 is 0 and 5 / 0 is inf, whose
    # softmax is NaN. Each is its limit instead: seen tokens pushed to 0, or the largest seen one forced.
    logits = torch.full((1, 6), -1.0)
    logits[0, 1], logits[0, 2], logits[0, 4] = 0.0, 5.0, 1.0  # 1 and 2 are in the prompt; 4 is not
    harsh = _sampler(prompt=[1, 2], vocab=6, repetition_penalty=1e39)
    assert sample_batch(logits, [harsh]).token_ids == [4]
    eager = [_sampler(prompt=[1, 2], vocab=6, repetition_penalty=1e-39, temperature=1.0, seed=i) for i in range(20)]
    assert sample_batch(logits.repeat(20, 1), eager).token_ids == [2] * 20


def test_min_tokens_with_stop_ids_and_eos_banning_the_whole_vocabulary_is_refused():
    # Until min_tokens, EOS and the stop token ids are banned: with every token banned, no first token could
    # be drawn (the argmax of an all -inf row is token 0, banned or not).
    others = tuple(t for t in range(VOCAB) if t != EOS)
    with pytest.raises(ValueError, match="cover all .* tokens .* min_tokens=2"):
        _sampler(min_tokens=2, stop_token_ids=others)
    with pytest.raises(ValueError, match="leave one out"):
        _sampler(min_tokens=1, stop_token_ids=tuple(range(VOCAB)), ignore_eos=True)
    _sampler(min_tokens=2, stop_token_ids=others[1:])  # one token left: fine
    _sampler(min_tokens=2, stop_token_ids=others, ignore_eos=True)  # EOS is not banned under ignore_eos
    _sampler(min_tokens=0, stop_token_ids=others)  # no ban without min_tokens
