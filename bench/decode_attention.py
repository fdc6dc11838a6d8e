"""Decode attention (kernels/decode_attention.py) against the memory roofline and torch's SDPA, at the
bench model's attention shape (bench/engine.py: 8 query heads, 2 kv heads, head_dim 256, output gate).

    python bench/decode_attention.py [--batches 1 8 32 64 128 256 512] [--contexts 128 576 2048 8192]
    python bench/decode_attention.py --sweep   # every launch config per row: which one is fastest
    python bench/decode_attention.py --pdl off # kernels/pdl.ENABLED off (PDL overlaps one call's launch with the last)

Every sequence of a row is at position context - 1 of its slot (it reads context keys and values), the
slots a random permutation of the pool. Times are `triton.testing.do_bench_cudagraph` medians: each call
captured in a CUDA graph, as the engine runs decode. Where one call's keys and values would fit in L2,
each timed call runs over several disjoint slot sets in turn (about 4x L2 in all, at most 8 sets) and
the time is per set; rows far below L2 are still partly cache-resident. TB/s counts the key and value
bytes a call must read (B x context x kv heads x head_dim x 2 x 2 bytes); % copy is that over a
device-to-device copy measured in the same process (bytes read + written, as bench/engine.py does).

The peer is `F.scaled_dot_product_attention` on the flash backend (enable_gqa: each kv head read once
for its 4 query heads), on the same data gathered into [B, kv heads, context, d] outside the timed
region, then the output gate (sigmoid and product) as our kernel applies it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.engine import copy_bandwidth  # noqa: E402
from kernels import pdl  # noqa: E402
from kernels.decode_attention import LaunchConfig, decode_attention, launch_config  # noqa: E402

H, KVH, D = 8, 2, 256
L2_FILL = 4  # slot sets per timed call span this many L2s where one set would not


@dataclass
class Case:
    """One row: `sets` disjoint slot sets of B sequences each over one pool."""

    B: int
    context: int
    keys: torch.Tensor  # [sets * B, context, KVH, D] bf16
    values: torch.Tensor  # [sets * B, context, KVH, D] bf16
    q: list[torch.Tensor]  # per set [B, H, D]
    gate: list[torch.Tensor]  # per set [B, H, D], a strided view (per head [query | gate], as the model splits it)
    slots: list[torch.Tensor]  # per set [B] int64
    positions: torch.Tensor  # [B] int64: context - 1

    @property
    def kv_bytes(self) -> int:
        """Key and value bytes one set's call must read."""
        return self.B * self.context * KVH * D * 2 * self.keys.element_size()


def make_case(B: int, context: int, seed: int = 0) -> Case:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    one_set = B * context * KVH * D * 2 * 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sets = max(1, min(8, L2_FILL * l2 // one_set))
    shape = (sets * B, context, KVH, D)
    keys = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    qg = torch.randn(sets, B, H, 2 * D, generator=gen, device="cuda", dtype=torch.bfloat16)
    order = torch.randperm(sets * B, generator=gen, device="cuda").view(sets, B)
    positions = torch.full((B,), context - 1, dtype=torch.int64, device="cuda")
    return Case(B, context, keys, values, [x[..., :D].contiguous() for x in qg], [x[..., D:] for x in qg],
                list(order), positions)


def ours(case: Case, config: LaunchConfig | None = None, attend=decode_attention):
    """The timed call: our kernel over each slot set."""
    def run():
        for q, gate, slots in zip(case.q, case.gate, case.slots):
            attend(q, gate, case.keys, case.values, case.positions, slots, config=config)
    return run


def sdpa(case: Case):
    """The timed call of the peer, its inputs gathered first: flash SDPA then the gate, per slot set."""
    gathered = [(q.unsqueeze(2), gate, case.keys[slots].transpose(1, 2).contiguous(),
                 case.values[slots].transpose(1, 2).contiguous()) for q, gate, slots in zip(case.q, case.gate, case.slots)]

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for q, gate, k, v in gathered:  # q [B, H, 1, D], k and v [B, KVH, context, D]
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True).squeeze(2) * torch.sigmoid(gate)
    return run


def sdpa_output(case: Case) -> torch.Tensor:
    q, gate, slots = case.q[0], case.gate[0], case.slots[0]
    k, v = (x[slots].transpose(1, 2) for x in (case.keys, case.values))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2) * torch.sigmoid(gate)


def time_us(case: Case, run, rep: int) -> float:
    """Microseconds per slot set of one call, CUDA-graphed."""
    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3 / len(case.q)


def candidate_configs(B: int, context: int) -> list[LaunchConfig]:
    """Launch configs --sweep tries: key blocks, warps and stages the kernel builds well (no spills),
    and power-of-two splits from 1 up to a split per block or 64 splits."""
    shapes = [(16, 4, 3), (32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 8, 2), (64, 8, 3)]
    configs = []
    for block, warps, stages in shapes:
        splits = 1
        while splits <= 64 and splits * block <= max(context, block):
            configs.append(LaunchConfig(splits, block, warps, stages))
            splits *= 2
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 576, 2048, 8192])
    parser.add_argument("--rep", type=int, default=10, help="do_bench_cudagraph's rep (ms)")
    parser.add_argument("--sweep", action="store_true", help="time every candidate launch config per row")
    parser.add_argument("--pdl", default="on", choices=["on", "off"], help="kernels/pdl.ENABLED for our kernels")
    args = parser.parse_args()
    pdl.ENABLED = args.pdl == "on"
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s, triton {triton.__version__}, "
          f"torch {torch.__version__}, PDL {'on' if pdl.enabled(torch.device('cuda')) else 'off'}")
    print("| B | context | KV MB | sets | config | ours us | TB/s | % copy | SDPA+gate us | % copy | SDPA / ours | "
          "max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B in args.batches:
        for context in args.contexts:
            case = make_case(B, context)
            config = launch_config(B, KVH, context, case.keys.device)
            out = decode_attention(case.q[0], case.gate[0], case.keys, case.values, case.positions, case.slots[0])
            ref = sdpa_output(case)
            diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_ours = time_us(case, ours(case), args.rep)
            t_sdpa = time_us(case, sdpa(case), args.rep)
            mb = case.kv_bytes / 1e6
            pct = lambda t: 100 * case.kv_bytes / (t * 1e-6) / copy_bw  # noqa: E731
            print(f"| {B} | {context} | {mb:.1f} | {len(case.q)} | {tuple(config)} | {t_ours:.1f} | "
                  f"{case.kv_bytes / t_ours / 1e6:.2f} | {pct(t_ours):.1f} | {t_sdpa:.1f} | {pct(t_sdpa):.1f} | "
                  f"{t_sdpa / t_ours:.2f} | {diff:.1e} |")
            if args.sweep:
                sweep(case, args.rep, pct)
            del case
            torch.cuda.empty_cache()


def sweep(case: Case, rep: int, pct) -> None:
    """Time every candidate config of one row; print the five fastest."""
    timed = sorted((time_us(case, ours(case, config), rep), config)
                   for config in candidate_configs(case.B, case.context))
    for t, config in timed[:5]:
        print(f"|   | sweep | | | {tuple(config)} | {t:.1f} | | {pct(t):.1f} | | | | |")


if __name__ == "__main__":
    main()
