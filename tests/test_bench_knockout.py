"""bench/knockout.py: each kind knocked out takes exactly its own launches out of a decode step (counted
on the CPU under the Triton interpreter, as tests/test_decode_launches.py counts them), and nothing else."""

import pytest
import torch

from bench.decode_ops import SHAPE, count_decode_step, random_model
from bench.knockout import knock_out


BATCH = 5  # past the one-launch Gated DeltaNet step's batches on a GPU; decode_linear's projections


@pytest.fixture(scope="module")
def model():
    # 3 Gated DeltaNet layers and one attention layer, one value head per key head: the interpreter is slow
    shape = {**SHAPE, "num_hidden_layers": 4, "linear_num_value_heads": 2}
    return random_model("triton", torch.bfloat16, shape)


def _launches(model, monkeypatch):
    from kernels import decode_linear, gdn_decode
    monkeypatch.setattr(decode_linear, "MODE", "on")  # our projections, as on the GPU
    monkeypatch.setattr(gdn_decode, "use_fused_decode", lambda *args: False)  # the gated norm a launch of its own
    return count_decode_step(model, BATCH, position=20, max_len=32).counts


@pytest.fixture(scope="module")
def every_kind(model):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _launches(model, monkeypatch)


@pytest.mark.parametrize("kind, gone", [
    ("norms", {"triton:_rms_norm_kernel"}),
    ("gated_norms", {"triton:_gated_rms_norm_kernel"}),
    ("gdn", {"triton:_fused_recurrent_decode_kernel"}),
    ("projections", {"triton:_decode_linear_kernel", "triton:_gemv_kernel", "matmul", "mm"}),
    ("attention", {"triton:_qk_norm_rope_store_kernel", "triton:_decode_attention_kernel"}),
])
def test_a_knocked_out_kind_launches_nothing_and_the_rest_is_untouched(model, every_kind, kind, gone, monkeypatch):
    assert any(every_kind[name] for name in gone), every_kind  # the kind launches something at this batch...
    knock_out([kind], monkeypatch.setattr)
    after = _launches(model, monkeypatch)
    assert not any(after[name] for name in gone), (kind, after)  # ...and nothing once knocked out
    assert {n: c for n, c in after.items() if n not in gone and c} == {
        n: c for n, c in every_kind.items() if n not in gone and c and not _fed_only_by(kind, n)}


def test_knocked_out_attention_takes_its_one_launch_form_too(model, monkeypatch):
    """Where decode attention runs one split a sequence, rope and attention are one launch
    (rope_decode_attention): knocked out with the rest of attention."""
    from kernels import decode_attention
    monkeypatch.setattr(decode_attention, "launch_config", lambda *args, **kwargs: decode_attention.LaunchConfig(1, 16))
    monkeypatch.setattr(decode_attention, "_num_sms", lambda device: 1)  # more programs than multiprocessors
    fused = "triton:_rope_decode_attention_kernel"
    before = _launches(model, monkeypatch)
    knock_out(["attention"], monkeypatch.setattr)
    after = _launches(model, monkeypatch)
    assert before[fused] and not after[fused]
    assert {n: c for n, c in after.items() if c} == {n: c for n, c in before.items() if c and n != fused}


def _fed_only_by(kind: str, name: str) -> bool:
    """Launches that exist only to feed or follow the knocked-out kind (its split-K reduction, the SwiGLU of
    cuBLAS's gate_up, the combine of attention's splits), which go with it."""
    return (kind == "projections" and name in ("triton:_reduce_kernel", "triton:_silu_mul_kernel")) or (
        kind == "attention" and "combine" in name)


def test_an_unknown_kind_is_refused():
    with pytest.raises(SystemExit, match="unknown kind"):
        knock_out(["nroms"], lambda *a: pytest.fail("patched"))
