"""The model on the Triton kernels (run on CPU under TRITON_INTERPRET=1, as CI does) computes what
it computes on the PyTorch reference: varlen prefill from fresh and carried state, then decode; for
a Qwen3.5 hybrid also through the padded decode step CUDA graphs capture."""

import pytest
import torch

from engine.demo import write_gated_deltanet
from engine.loader import load_model
from engine.models.state import Batch
from hybrid_steps import load_qwen_pair, prefill_decode_mixed

SMALL = {"model_type": "gated_deltanet", "vocab_size": 260, "hidden_size": 32, "num_hidden_layers": 2,
         "num_heads": 2, "num_v_heads": 4, "head_dim": 16, "expand_v": 1.0, "hidden_ratio": 2,
         "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = write_gated_deltanet(tmp_path_factory.mktemp("small"), SMALL, seed=21)
    return (load_model(folder, device="cpu", backend="torch").model,
            load_model(folder, device="cpu", backend="triton").model)


def use_decode_path(monkeypatch, path: str) -> None:
    """Make decode-only steps take `path`: "unfused" (conv step, decode, norm: three launches), "folded"
    (the conv inside the decode kernel, then the norm) or "fused" (kernels/gdn_decode.py, one launch)."""
    import engine.models.gdn_backend
    import kernels.gdn_decode
    monkeypatch.setattr(kernels.gdn_decode, "use_fused_decode", lambda *args: path == "fused")
    monkeypatch.setattr(engine.models.gdn_backend, "FOLD_CONV", path == "folded")


@pytest.mark.parametrize("path", ["unfused", "folded", "fused"])
def test_triton_backend_matches_reference_through_prefill_and_decode(pair, path, monkeypatch):
    torch_model, triton_model = pair
    use_decode_path(monkeypatch, path)
    import kernels.recurrent
    decode_batches = []  # sizes of the batches the single-token kernel ran, post-conv
    decode = kernels.recurrent.fused_recurrent_decode
    monkeypatch.setattr(kernels.recurrent, "fused_recurrent_decode",
                        lambda q, *a, **k: decode_batches.append(q.shape[0]) or decode(q, *a, **k))
    folded_batches = []  # ... and with the conv folded in
    conv_decode = kernels.recurrent.conv_recurrent_decode
    monkeypatch.setattr(kernels.recurrent, "conv_recurrent_decode",
                        lambda x, *a, **k: folded_batches.append(x.shape[0]) or conv_decode(x, *a, **k))
    import kernels.chunk
    plans = []  # one chunk table per forward with prompt chunks, shared by its layers
    plan_chunks = kernels.chunk.plan_chunks
    monkeypatch.setattr(kernels.chunk, "plan_chunks", lambda *a: plans.append(1) or plan_chunks(*a))
    assert triton_model.layers[0].mixer.backend == "triton"
    gen = torch.Generator().manual_seed(0)
    lens = [5, 70, 1]
    prompts = torch.randint(0, 256, (sum(lens),), generator=gen)
    pools = [m.new_pool(5) for m in pair]
    for pool in pools:
        pool.allocate()  # occupied by someone else
    slots = [4, 1, 3]
    for pool in pools:
        for _ in range(4):
            pool.allocate()
    results = []
    for model, pool in zip(pair, pools):
        outs = [model.logits(model(prompts, Batch.build(lens, slots, [0, 0, 0], model.device), pool))]
        starts = list(lens)
        # decode steps, then mixed steps: a chunk of 4 first, then decodes first (those run through
        # the single-token kernels, the chunk through the chunkwise ones)
        for sizes in ([1, 1, 1], [1, 1, 1], [4, 1, 2], [1, 1, 3]):
            step = len(outs)
            ids = torch.randint(0, 256, (sum(sizes),), generator=torch.Generator().manual_seed(step))
            outs.append(model.logits(model(ids, Batch.build(sizes, slots, starts, model.device), pool)))
            starts = [s + n for s, n in zip(starts, sizes)]
        results.append(outs)
    # per layer: 3 in each decode step (through the path's kernel); in the last mixed step the 2 leading
    # decodes, unfolded (mixed steps run the conv over the whole batch first)
    layers = SMALL["num_hidden_layers"]
    decode_steps = [3] * 2 * layers
    assert decode_batches == (decode_steps if path == "unfused" else []) + [2] * layers
    assert folded_batches == (decode_steps if path == "folded" else [])
    assert len(plans) == 3  # the prompts, and the two mixed steps
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    for layer in range(SMALL["num_hidden_layers"]):
        torch.testing.assert_close(pools[1].recurrent[layer], pools[0].recurrent[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pools[1].conv[layer], pools[0].conv[layer])


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    return load_qwen_pair(tmp_path_factory.mktemp("qwen3_5"), seed=5)


@pytest.mark.parametrize("path", ["unfused", "folded", "fused"])
def test_triton_backend_matches_reference_on_a_hybrid_through_the_padded_decode_step(qwen_pair, path, monkeypatch):
    # fused: decode-only steps take the one-launch conv -> delta rule -> gated norm kernel whatever their
    # size (on a GPU only batches that fill it do).
    import kernels.gdn_decode
    fused_batches = []
    conv_decode_norm = kernels.gdn_decode.conv_decode_norm
    use_decode_path(monkeypatch, path)
    monkeypatch.setattr(kernels.gdn_decode, "conv_decode_norm",
                        lambda x, *a, **k: fused_batches.append(x.shape[0]) or conv_decode_norm(x, *a, **k))
    results = [prefill_decode_mixed(model) for model in qwen_pair]
    # 3 Gated DeltaNet layers in each of the 3 padded decode steps
    assert fused_batches == ([4] * 3 * 3 if path == "fused" else [])
    (expected, ref_pool), (got, pool) = results
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-4)
    for layer in range(3):
        torch.testing.assert_close(pool.recurrent[layer], ref_pool.recurrent[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pool.conv[layer], ref_pool.conv[layer])
    attn = 3
    torch.testing.assert_close(pool.keys[attn], ref_pool.keys[attn], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool.values[attn], ref_pool.values[attn], atol=1e-4, rtol=1e-4)
