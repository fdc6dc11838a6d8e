"""The tally of Triton kernel builds (engine/kernel_builds.py) and what the engine makes of it: a step
that builds a kernel is counted, timed and logged. Triton builds nothing under the CPU interpreter, so
these tests call the hooks the way Triton's JIT does around a build."""

import logging

import pytest
from triton import knobs

from engine import kernel_builds as kb
from engine.demo import write_gated_deltanet
from engine.engine import EngineConfig, LLMEngine
from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.test_warmup import SMALL


def _triton_builds(name: str, key: str) -> None:
    """What Triton's JIT does around building a new variant of kernel `name`."""
    knobs.runtime.jit_cache_hook(key=key, repr=f"{name}[num_warps=4](x: *fp32)", fn=None, compile={},
                                 is_manual_warmup=False, already_compiled=False)
    knobs.runtime.jit_post_compile_hook(key=key, repr=f"{name}[num_warps=4](x: *fp32)", fn=None, compile={},
                                        is_manual_warmup=False, already_compiled=False)


@pytest.fixture
def fresh_tally(monkeypatch):
    """A tally of its own with the hooks installed, Triton's hooks and the module's tally restored after."""
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", knobs.runtime.jit_cache_hook)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", knobs.runtime.jit_post_compile_hook)
    monkeypatch.setattr(kb, "_builds", None)
    return kb.kernel_builds()


def test_builds_are_counted_and_named_and_other_hooks_still_run(monkeypatch):
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(("before", kw["key"])) or True)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(("after", kw["key"])))
    monkeypatch.setattr(kb, "_builds", None)
    tally = kb.kernel_builds()
    assert kb.kernel_builds() is tally  # one per process
    # another hook's answer (True: skip the build) still reaches Triton
    assert knobs.runtime.jit_cache_hook(key="k1", repr="a[num_warps=4]()") is True
    knobs.runtime.jit_post_compile_hook(key="k1", repr="a[num_warps=4]()")
    _triton_builds("chunk_state_kernel", "k2")
    assert tally.count == 2 and tally.names == ["a", "chunk_state_kernel"] and tally.seconds >= 0
    assert seen == [("before", "k1"), ("after", "k1"), ("before", "k2"), ("after", "k2")]


def test_a_step_that_builds_kernels_is_counted_and_logged(tmp_path, fresh_tally, caplog):
    engine = LLMEngine(load_model(write_gated_deltanet(tmp_path, SMALL, seed=1), device="cpu"),
                       EngineConfig(max_num_seqs=2))
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # nothing built: nothing counted, nothing said
    assert engine.counters.kernel_builds == 0 and not caplog.records
    real_step = engine._step

    def step_that_builds():
        _triton_builds("fused_recurrent_decode_kernel", "new-shape")
        return real_step()

    engine._step = step_that_builds
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        engine.step()
    assert engine.counters.kernel_builds == 1 and engine.counters.kernel_build_seconds >= 0
    assert "built 1 Triton kernel(s)" in caplog.text and "fused_recurrent_decode_kernel" in caplog.text
