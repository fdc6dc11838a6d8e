"""One scenario the triton-backend tests run on a tiny Qwen3.5 hybrid (3 Gated DeltaNet layers, then
gated attention) on both backends: a varlen prefill, three decode steps through the padded DecodeStep
that CUDA graphs capture, and a mixed step (a prompt chunk beside two decodes)."""

import torch

from engine.cuda_graphs import DecodeStep
from engine.loader import load_model
from engine.models.state import Batch


def load_qwen_pair(folder, seed: int) -> list:
    """The same random Qwen3.5 checkpoint on the torch and the triton backend (CPU)."""
    from tiny_checkpoints import save_qwen3_5
    save_qwen3_5(folder, seed=seed, num_hidden_layers=4)
    return [load_model(folder, device="cpu", backend=b).model for b in ("torch", "triton")]


def prefill_decode_mixed(model) -> tuple[list[torch.Tensor], object]:
    """(logits of every step as fp32, the pool after them) for the scenario above: sequences of 6, 33
    and 2 tokens in slots 0, 2, 1 of a 4-slot pool; decode steps padded from 3 sequences to 4."""
    lens, slots = [6, 33, 2], [0, 2, 1]
    prompts = torch.randint(0, 384, (sum(lens),), generator=torch.Generator().manual_seed(3))
    pool = model.new_pool(4, max_len=64)
    for _ in range(4):
        pool.allocate()
    outs = [model.logits(model(prompts, Batch.build(lens, slots, [0, 0, 0], model.device), pool))]
    step = DecodeStep(model, pool, max_batch=4, capture=False)  # pads 3 sequences to 4: one scratch row
    positions = list(lens)
    for i in range(3):
        ids = [(17 * i + 5 * j) % 384 for j in range(3)]
        outs.append(step.run(ids, slots, positions).float().clone())
        positions = [p + 1 for p in positions]
    sizes = [3, 1, 1]  # a mixed step: one prompt chunk beside two decodes
    ids = torch.randint(0, 384, (sum(sizes),), generator=torch.Generator().manual_seed(4))
    outs.append(model.logits(model(ids, Batch.build(sizes, slots, positions, model.device), pool)))
    return outs, pool
