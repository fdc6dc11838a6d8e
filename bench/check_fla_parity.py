"""GPU check of the `gated_deltanet` family against flash-linear-attention's own model.

Builds random GatedDeltaNetForCausalLM models with fla (pip fla-core + flash-linear-attention),
saves them with save_pretrained, loads the folders with deltaserve and compares prompt logits and
greedy continuations. Pure GDN only: fla's hybrid attention layer needs flash-attn, which the GPU
machine lacks (the hybrid path is checked on CPU against a naive reading in tests/).

    python bench/check_fla_parity.py            # prints one JSON line per comparison
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import write_byte_tokenizer  # noqa: E402
from engine.generate import generate  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

SHAPES = {
    "H4_K64_V128": dict(num_heads=4, head_dim=64, expand_v=2.0),
    "H2_HV4_K128_V128_nogate": dict(num_heads=2, num_v_heads=4, head_dim=128, expand_v=1.0, use_gate=False),
}


def fla_model(shape: dict, seed: int):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    torch.manual_seed(seed)
    config = GatedDeltaNetConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, hidden_ratio=4,
                                 tie_word_embeddings=False, fuse_cross_entropy=False, **shape)
    model = GatedDeltaNetForCausalLM(config)
    with torch.no_grad():  # move norms off 1 so a skipped or misplaced norm weight shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def report(**fields):
    line = json.dumps(fields)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "fla_parity.jsonl", "a") as f:
            f.write(line + "\n")


def main() -> None:
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            ref = fla_model(shape, seed=0)
            folder = Path(tempfile.mkdtemp())
            ref.save_pretrained(folder)
            write_byte_tokenizer(folder)
            ref = ref.to("cuda", dtype)
            for backend, T in [(b, t) for b in ("torch", "triton") for t in (40, 300)]:
                ours = load_model(folder, device="cuda", dtype=str(dtype).removeprefix("torch."), backend=backend)
                ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(T)).cuda()
                with torch.no_grad():
                    expected = ref(ids[None]).logits[0].float()
                    generated = ref.generate(ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)
                got = ours.model.logits(ours.model.run(ids, ours.model.new_state()))
                rel = ((got - expected).norm() / expected.norm()).item()
                mine = [s.token_id for s in generate(ours, ids.tolist(),
                                                     SamplingParams(max_tokens=32, ignore_eos=True))]
                theirs = generated[0, T:].tolist()
                same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
                report(shape=name, dtype=str(dtype), backend=backend, T=T, max_abs=(got - expected).abs().max().item(),
                       rel_err=rel, argmax_agree=(got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
                       greedy_tokens_identical=same, of=len(mine))


if __name__ == "__main__":
    main()
