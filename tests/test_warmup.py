"""Start-up forwards that build every kernel shape a mixed step can meet (engine/warmup.py): they
cover each distinct launch shape once, and touch no slot but the scratch row, which ends cleared."""

import pytest
import torch

from engine.demo import write_gated_deltanet
from engine.loader import load_model
from engine.models.state import Batch
from engine.warmup import first_of_each, mixed_step_batches, warm_up
from kernels.chunk import pick_config
from kernels.recurrent import decode_launch_config

SMALL = {"model_type": "gated_deltanet", "vocab_size": 260, "hidden_size": 32, "num_hidden_layers": 2,
         "num_heads": 2, "num_v_heads": 4, "head_dim": 16, "expand_v": 4.0, "hidden_ratio": 2,
         "tie_word_embeddings": True, "attn": {"layers": [1], "num_heads": 2, "window_size": 8}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = write_gated_deltanet(tmp_path_factory.mktemp("warm"), SMALL, seed=4)
    return {backend: load_model(folder, device="cpu", backend=backend).model for backend in ("torch", "triton")}


def test_first_of_each_finds_where_every_shape_starts():
    assert first_of_each(lambda n: min(n // 3, 2), 10) == [1, 3, 6]
    assert first_of_each(lambda n: 0, 5) == [1]


def test_batches_cover_every_launch_shape_up_to_the_batch_limit(models):
    model = models["triton"]
    pool = model.new_pool(4)
    gdn = model.config.gdn
    HV, K, V = gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim
    batches = mixed_step_batches(model, pool, 300)
    chunk_ns = [len(lens) for lens in batches if lens[0] == 2]
    single_ns = [len(lens) - 1 for lens in batches if lens[0] == 1]
    # this shape's state pass changes V blocks at 9 and 66 sequences
    assert [pick_config(n, HV, K, V).state_bv for n in chunk_ns] == [16, 32, 64]
    assert {pick_config(n, HV, K, V) for n in chunk_ns} == {pick_config(n, HV, K, V) for n in range(1, 301)}
    every = {decode_launch_config(n, HV, K, V, model.device, 4) for n in range(1, 301)}
    assert {decode_launch_config(n, HV, K, V, model.device, 4) for n in single_ns} == every
    assert len(every) > 1 and len(single_ns) in (len(every), len(every) + 1)
    assert {1, 2} <= set(single_ns)  # chunks after an odd and an even number of singles: both alignments
    assert all(lens[-1] == 2 for lens in batches)  # never decode-only: those are the graphs' business
    assert mixed_step_batches(models["torch"], models["torch"].new_pool(4), 300) == []  # nothing to build


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("max_len", [64, 2])  # 2: the shortest context the CLI allows
def test_warm_up_touches_no_request_slot_and_clears_the_scratch_row(models, max_len, decode_only):
    model = models["triton"]
    pool = model.new_pool(3, max_len)
    slot = pool.allocate()
    length = min(9, max_len)
    prompt = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(0))
    model(prompt, Batch.build([length], [slot], [0], model.device), pool)  # a request's state in its slot
    before = [t.clone() for t in pool.recurrent + pool.conv + pool.keys + pool.values if t is not None]
    assert warm_up(model, pool, 3, decode_only) == len(mixed_step_batches(model, pool, 3, decode_only)) > 0
    after = [t for t in pool.recurrent + pool.conv + pool.keys + pool.values if t is not None]
    for old, new in zip(before, after):
        assert torch.equal(old[:pool.scratch], new[:pool.scratch])  # every real slot, bit for bit
    for state in pool.recurrent + pool.conv:
        if state is not None:
            assert not state[pool.scratch].any()


def test_without_decode_graphs_decode_only_steps_of_every_shape_are_built_too(models):
    """An engine without decode graphs runs decode-only steps eagerly: their launch shapes (the
    decode kernels' and the decode attention's split count) must be built at start-up as well."""
    from engine.warmup import decode_only_shape

    model = models["triton"]
    pool = model.new_pool(4, 4096)
    with_graphs = mixed_step_batches(model, pool, 300)
    batches = mixed_step_batches(model, pool, 300, decode_only=True)
    assert batches[:len(with_graphs)] == with_graphs
    decode_ns = [len(lens) for lens in batches[len(with_graphs):]]
    assert decode_ns and all(set(lens) == {1} for lens in batches[len(with_graphs):])
    every = {decode_only_shape(model, pool, d) for d in range(1, 301)}
    assert {decode_only_shape(model, pool, d) for d in decode_ns} == every
    assert len({shape[1] for shape in every}) > 1  # split counts do vary with the batch here


def test_without_decode_graphs_every_decode_projection_shape_is_built_too(models, monkeypatch):
    """With kernels/decode_linear taking a decode step's projections (forced on here: on a GPU, where its
    table says so), their row blocks and configs change with the batch: each must be met at start-up."""
    import kernels.decode_linear
    from engine.warmup import decode_only_shape, projections

    monkeypatch.setattr(kernels.decode_linear, "MODE", "on")
    model = models["triton"]
    pool = model.new_pool(4, 4096)
    hidden = model.config.hidden_size
    assert (2 * model.config.intermediate_size, hidden, True) in projections(model)  # gate_up, silu fused
    batches = mixed_step_batches(model, pool, 300, decode_only=True)
    decode_ns = [len(lens) for lens in batches if set(lens) == {1}]
    every = {decode_only_shape(model, pool, d) for d in range(1, 301)}
    assert {decode_only_shape(model, pool, d) for d in decode_ns} == every
    assert all(key[0] == "gemv" for key in decode_only_shape(model, pool, 1)[-1])  # one row: kernels/decode_gemv
    blocks = {key[1] for shape in every for key in shape[-1] if key is not None and key[0] != "gemv"}
    assert blocks == {16, 32, 64, 128, 256}  # x rows a program holds, by batch
    assert all(key is None for key in decode_only_shape(model, pool, 257)[-1])  # past MAX_M: cuBLAS


def test_warm_up_runs_the_greedy_argmax_on_logits_of_every_dtype_a_step_samples(models, monkeypatch):
    """kernels/argmax.py compiles by the logits' dtype: start-up meets both an eager step's fp32 logits and a
    decode graph's in the model's dtype, so no step builds it."""
    from types import SimpleNamespace

    from engine import sampling
    from engine.warmup import sampled_logits

    bf16_model = SimpleNamespace(config=SimpleNamespace(vocab_size=50), embed=torch.zeros(1, dtype=torch.bfloat16),
                                 device=torch.device("cpu"))
    assert {(t.dtype, tuple(t.shape)) for t in sampled_logits(bf16_model)} == {(torch.bfloat16, (1, 50)),
                                                                           (torch.float32, (1, 50))}
    seen = []
    run = sampling.argmax
    monkeypatch.setattr(sampling, "argmax", lambda logits: seen.append(logits.dtype) or run(logits))
    model = models["torch"]  # no forwards to build: the argmax runs all the same
    assert warm_up(model, model.new_pool(2), 2) == 0
    assert seen == [t.dtype for t in sampled_logits(model)] == [torch.float32]
