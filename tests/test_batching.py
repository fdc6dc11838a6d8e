"""Many sequences in one forward call, each in its own slot, compute what each computes alone."""

import itertools

import pytest
import torch

from engine.demo import write_gated_deltanet
from engine.loader import load_model
from engine.models.state import Batch
from tiny_checkpoints import save_qwen3_5

HYBRID = {"model_type": "gated_deltanet", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 3,
          "num_heads": 2, "head_dim": 16, "expand_v": 2.0, "hidden_ratio": 2, "tie_word_embeddings": False,
          "num_v_heads": 4, "attn": {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 9}}


@pytest.fixture(scope="module", params=["fla_hybrid_window", "qwen3_5_full_attention"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "fla_hybrid_window":
        write_gated_deltanet(folder, HYBRID, seed=11)
    else:
        save_qwen3_5(folder, seed=11)
    return load_model(folder, device="cpu", dtype="float32").model


def _tokens(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


def _alone(model, tokens):
    return model.logits(model.run(tokens, model.new_state()))


def test_varlen_prefill_then_mixed_steps_match_each_sequence_alone(model):
    prompts = [_tokens(n, n) for n in (1, 63, 64, 65, 20)]
    follow = [_tokens(9, 100 + i) for i in range(len(prompts))]
    pool = model.new_pool(8)
    pool.allocate()  # an occupied slot the batch must leave alone
    slots = [pool.allocate() for _ in prompts][::-1]  # shuffled, non-contiguous order
    untouched = [t[0].clone() for t in pool.recurrent if t is not None]

    batch = Batch.build([len(p) for p in prompts], slots, [0] * len(prompts), model.device)
    hidden = model(torch.cat(prompts), batch, pool)
    for (begin, end), prompt in zip(batch.bounds, prompts):
        torch.testing.assert_close(model.logits(hidden[begin:end]), _alone(model, prompt), atol=1e-4, rtol=1e-4)

    # Then steps where some sequences decode one token and others take a chunk of several.
    done = [len(p) for p in prompts]
    for step in range(3):
        sizes = [1 if (i + step) % 2 else 3 for i in range(len(prompts))]
        pieces = [follow[i][step * 3: step * 3 + sizes[i]] for i in range(len(prompts))]
        batch = Batch.build(sizes, slots, done, model.device)
        hidden = model(torch.cat(pieces), batch, pool)
        for i, ((begin, end), piece) in enumerate(zip(batch.bounds, pieces)):
            history = torch.cat([prompts[i]] + [follow[i][s * 3: s * 3 + (1 if (i + s) % 2 else 3)]
                                                for s in range(step + 1)])
            expected = _alone(model, history)[-len(piece):]
            torch.testing.assert_close(model.logits(hidden[begin:end]), expected, atol=1e-4, rtol=1e-4)
            done[i] += sizes[i]
    for before, after in zip(untouched, (t[0] for t in pool.recurrent if t is not None)):
        assert torch.equal(before, after)


def test_reused_slot_gives_the_output_of_a_fresh_one(model):
    pool = model.new_pool(2)
    slot = pool.allocate()
    model(_tokens(50, 1), Batch.build([50], [slot], [0], model.device), pool)
    pool.release(slot)
    again = pool.allocate()
    assert again == slot
    prompt = _tokens(30, 2)
    hidden = model(prompt, Batch.build([30], [again], [0], model.device), pool)
    torch.testing.assert_close(model.logits(hidden), _alone(model, prompt))


def test_pool_hands_each_slot_to_one_owner(model):
    pool = model.new_pool(4)
    slots = [pool.allocate() for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3] and pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate()
    pool.release(slots[2])
    with pytest.raises(AssertionError):
        pool.release(slots[2])
    assert pool.allocate() == slots[2]


def test_slots_allocated_together_are_distinct_and_zeroed_and_others_untouched(model):
    pool = model.new_pool(5)
    first = pool.allocate_many(3)
    states = [t for t in pool.conv + pool.recurrent if t is not None]
    for t in states:
        t.normal_()  # every row dirty, the free ones too, as a previous owner would leave them
    kept = [t[first].clone() for t in states]
    for slot in first[:2]:
        pool.release(slot)
    again = pool.allocate_many(4)
    assert len(set(again)) == 4 and set(again).isdisjoint({first[2]}) and pool.num_free == 0
    for t, before in zip(states, kept):
        assert not t[again].any()
        torch.testing.assert_close(t[first[2]], before[2])  # the slot still in use keeps its state
    with pytest.raises(RuntimeError):
        pool.allocate_many(1)


@pytest.mark.parametrize("num_single", [0, 1, 2, 3])
@pytest.mark.parametrize("num_chunks", [1, 2, 5])
def test_batch_index_tensors_start_16_byte_aligned_whatever_the_sizes(num_single, num_chunks):
    # Triton builds one kernel variant per pointer alignment: every index tensor a kernel reads must
    # be aligned alike, or steps of new sizes build kernels mid-serving (seen on an H200: ~1 s each).
    lens = [1] * num_single + [7, 64, 3, 10, 1][:num_chunks] + [5]
    slots = list(range(10, 10 + len(lens)))[::-1]
    starts = [4] * len(lens)
    batch = Batch.build(lens, slots, starts, torch.device("cpu"))
    for name in ("cu_seqlens", "slot_ids", "positions", "token_slots"):
        assert getattr(batch, name).data_ptr() % 16 == 0, name
    rest = batch.after_single
    assert rest.slot_ids.data_ptr() % 16 == 0 and rest.slot_ids.tolist() == slots[num_single:]
    assert rest.cu_seqlens.tolist() == [0, *itertools.accumulate(lens[num_single:])]
    assert batch.slot_ids.tolist() == slots and batch.cu_seqlens[-1] == sum(lens)
    assert batch.positions.tolist() == [4 + i for n in lens for i in range(n)]
    assert batch.token_slots.tolist() == [s for s, n in zip(slots, lens) for _ in range(n)]
