"""Where a decode step's host time goes: cProfile over decode steps of the bench/engine.py model.

    python bench/profile_step.py [--batch 1] [--steps 30]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "engine.py")
bench_engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_engine)

from engine.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    bench_engine.build_model(folder)
    loaded = load_model(folder, device="cuda", dtype="bfloat16")
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=8192, max_model_len=1024))
    for i in range(args.batch):
        engine.add_request(f"r{i}", list(range(1, 65)), SamplingParams(max_tokens=500, ignore_eos=True))
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
