"""Whole models against transformers' own modelling code on tiny random checkpoints it saved."""

import copy

import pytest
import torch

from engine.generate import generate
from engine.loader import load_model
from engine.sampling import SamplingParams
from tiny_checkpoints import VOCAB, save_qwen3_5, save_qwen3_next

FAMILIES = {"qwen3_5": save_qwen3_5, "qwen3_next": save_qwen3_next}
PROMPT_LENGTHS = [23, 64, 150]  # shorter than, equal to and longer than one 64-token chunk


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = FAMILIES[request.param](folder)
    return hf_model, load_model(folder, device="cpu", dtype="float32")


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_prompt_logits_match_transformers(pair, length):
    hf_model, ours = pair
    ids = _prompt(length)
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0].float()
    got = ours.model.logits(ours.model.run(ids, ours.model.new_state()))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_greedy_tokens_match_transformers_generate(pair, length):
    hf_model, ours = pair
    ids = _prompt(length)
    with torch.no_grad():
        out = hf_model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=32,
                                min_new_tokens=32, do_sample=False)
    expected = out[0, length:].tolist()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    got = [step.token_id for step in generate(ours, ids.tolist(), params)]
    assert got == expected


def test_prefill_in_pieces_equals_prefill_at_once(pair):
    # The state at any split point is exact: what chunked prefill in the engine relies on.
    _, ours = pair
    ids = _prompt(150)
    whole = ours.model.logits(ours.model.run(ids, ours.model.new_state()))
    state = ours.model.new_state()
    parts = [ours.model.run(piece, state) for piece in (ids[:37], ids[37:101], ids[101:])]
    torch.testing.assert_close(ours.model.logits(torch.cat(parts)), whole, atol=1e-4, rtol=1e-4)


def test_bfloat16_load_is_as_close_to_fp32_as_transformers_bf16(pair):
    hf_model, ours = pair
    half = load_model(ours.path, device="cpu", dtype="bfloat16")
    assert half.model.embed.dtype == torch.bfloat16
    assert half.model.layers[0].mixer.A_log.dtype == torch.float32  # gate constants stay fp32
    ids = _prompt(80)
    full = ours.model.logits(ours.model.run(ids, ours.model.new_state()))
    approx = half.model.logits(half.model.run(ids, half.model.new_state()))
    with torch.no_grad():
        hf_half = copy.deepcopy(hf_model).to(torch.bfloat16)(ids[None]).logits[0].float()
    ours_err = (approx - full).norm() / full.norm()
    hf_err = (hf_half - full).norm() / full.norm()
    assert ours_err < 1.5 * hf_err + 1e-3
