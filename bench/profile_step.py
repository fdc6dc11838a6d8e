"""Where a decode step's host time goes: cProfile over decode steps, and the step's wall time split
into the forward (model + LM head, or the graph replay) and everything else (schedule, sampling,
detokenization, stop checks, outputs), which is host work that the GPU waits on.

    python bench/profile_step.py [--batch 1] [--steps 30]                 # bench/engine.py's model, CUDA
    python bench/profile_step.py --device cpu --tiny --batch 128 [--vocab 151936]

--tiny is a 2-layer Qwen3.5-shaped model (one GDN layer, one attention layer) small enough that a
CPU step is mostly the engine's own per-sequence work; --vocab sets its vocabulary (151936 shows
the sampler's cost at the real size; the default 384 matches the test tokenizer, so detokenization
sees real text).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "engine.py")
bench_engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_engine)

from engine.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def build_tiny(folder: Path, vocab: int) -> None:
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM
    from tiny_tokenizer import write_tiny_tokenizer

    torch.manual_seed(0)
    config = Qwen3_5TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                               linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                               full_attention_interval=2, tie_word_embeddings=True)
    Qwen3_5ForCausalLM(config).eval().save_pretrained(folder)
    write_tiny_tokenizer(folder, vocab_size=min(vocab, 384))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class ForwardTimer:
    """Wraps the engine's two forward paths and adds up their wall time."""

    def __init__(self, engine: LLMEngine):
        self.seconds = 0.0
        self.device = engine.model.device
        engine._eager_forward = self.timed(engine._eager_forward)
        if engine.decode_step is not None:
            engine.decode_step.run = self.timed(engine.decode_step.run)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return out
        return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--vocab", type=int, default=384)
    parser.add_argument("--top", type=int, default=25, help="rows of the cProfile table")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    if args.tiny:
        build_tiny(folder, args.vocab)
        dtype = "float32" if args.device == "cpu" else "bfloat16"
    else:
        bench_engine.build_model(folder)
        dtype = "bfloat16"
    loaded = load_model(folder, device=args.device, dtype=dtype)
    device = loaded.model.device
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(8192, args.batch),
                                            max_model_len=1024))
    gen = torch.Generator().manual_seed(0)
    vocab = min(args.vocab, 384) if args.tiny else 384
    for i in range(args.batch):
        prompt = torch.randint(3, vocab, (64,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
    for _ in range(5):
        engine.step()
    synchronize(device)
    timer = ForwardTimer(engine)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    synchronize(device)
    profile.disable()
    total = (time.perf_counter() - start) / args.steps
    forward = timer.seconds / args.steps
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    print(f"B={args.batch} device={device.type} step {total * 1e3:.2f} ms: forward {forward * 1e3:.2f} ms, "
          f"rest (host) {(total - forward) * 1e3:.2f} ms  (under cProfile)")
    # The same steps again without the profiler, which inflates Python-heavy code.
    timer.seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    synchronize(device)
    total = (time.perf_counter() - start) / args.steps
    forward = timer.seconds / args.steps
    print(f"B={args.batch} device={device.type} step {total * 1e3:.2f} ms: forward {forward * 1e3:.2f} ms, "
          f"rest (host) {(total - forward) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
