"""A decode step's kernel count on the triton backend (bench/decode_ops.py's counter, on CPU under the
Triton interpreter): what a CUDA graph replays per token. The fused kernels must stay in use; a
regression shows as torch ops coming back (norms, activations, attention's gathers) or the total
rising past what was measured with headroom (256 per 24-layer step at B=1 and B=4, 250 at B=128
where attention needs no split-combining launch; 752 before the fusions; the conv folded into the
decode kernel takes one launch off each Gated DeltaNet layer; the RoPE angles computed in the rotation
kernel took nine more off: 210 at B=1 and 4 with the one-launch Gated DeltaNet step, 228 without)."""

import pytest
import torch

from bench.decode_ops import count_decode_step, random_model


@pytest.fixture(scope="module")
def model():
    return random_model("triton", torch.bfloat16)  # 24 layers: 18 Gated DeltaNet + 6 gated attention


@pytest.mark.parametrize("fold_conv", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_triton_decode_step_launches_the_fused_kernels_and_no_more(model, batch, fold_conv, monkeypatch):
    import engine.models.gdn_backend
    import kernels.gdn_decode
    monkeypatch.setattr(kernels.gdn_decode, "use_fused_decode", lambda *args: False)  # delta rule and norm apart
    monkeypatch.setattr(engine.models.gdn_backend, "FOLD_CONV", fold_conv)  # the conv inside the decode kernel or not
    counts = count_decode_step(model, batch).counts
    gdn, attn, layers = 18, 6, 24
    assert counts["triton:_fused_recurrent_decode_kernel"] == gdn
    assert counts["triton:_causal_conv1d_step_kernel"] == (0 if fold_conv else gdn)
    assert counts["triton:_gated_rms_norm_kernel"] == gdn
    assert counts["triton:_rms_norm_kernel"] == 2 * layers + 1  # residual add + norm, fused
    assert counts["triton:_qk_norm_rope_store_kernel"] == attn
    assert counts["triton:_decode_attention_kernel"] == attn
    assert counts["triton:_combine_splits_kernel"] in (0, attn)  # small batches split the keys
    assert counts["triton:_silu_mul_kernel"] == layers
    for torch_form in ("rms_norm", "silu", "sigmoid", "add", "index_put", "scaled_dot_product_attention", "cat"):
        assert counts[torch_form] <= 1, f"{torch_form} is back on the decode path: {counts[torch_form]} launches"
    # The RoPE angles are computed inside the rotation kernel: no tables are built.
    assert counts["cos"] == counts["sin"] == counts["pow"] == counts["cat"] == 0
    # per layer one matmul for the mixer's inputs (q, k, v (and gates) in one), its output, gate_up and down;
    # and the LM head (cuBLAS on CPU: kernels/decode_linear takes them on a GPU where measured faster)
    assert counts["matmul"] + counts["linear"] == 4 * layers + 1
    assert sum(counts.values()) <= 260 - (gdn if fold_conv else 0), counts


def test_a_decode_step_large_enough_for_the_fused_gdn_kernel_launches_one_per_layer(model, monkeypatch):
    # Where kernels/gdn_decode.use_fused_decode takes it (forced here): conv, delta rule and gated norm
    # are one launch per Gated DeltaNet layer.
    import kernels.gdn_decode
    monkeypatch.setattr(kernels.gdn_decode, "use_fused_decode", lambda *args: True)
    counts = count_decode_step(model, 4).counts
    gdn = 18
    assert counts["triton:_conv_decode_norm_kernel"] == gdn
    for unfused in ("_causal_conv1d_step_kernel", "_fused_recurrent_decode_kernel", "_gated_rms_norm_kernel"):
        assert counts[f"triton:{unfused}"] == 0
    assert sum(counts.values()) <= 260 - 2 * gdn, counts
