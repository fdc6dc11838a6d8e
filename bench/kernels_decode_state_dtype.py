"""The fused decode kernel on an fp32 vs a bf16 state pool (GPU): time per launch for every
(BV, num_warps) and for the default launch shape, at serving batches, H = HV = 16, K = V = 128.

    python bench/kernels_decode_state_dtype.py

Prints, per batch and state dtype, the default shape's time and bytes moved per second, the best
shape, and all shapes as BV/warps:us. decode_launch_config's bf16 rule came from this.
"""

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.recurrent import decode_launch_config, fused_recurrent_decode  # noqa: E402

H = HV = 16
K = V = 128


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), f"H={H} HV={HV} K={K} V={V}", flush=True)
    for B in (128, 512, 1024):
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=device).to(torch.bfloat16)

        x = dict(q=rand(B, H, K), k=rand(B, H, K), v=rand(B, HV, V), a=rand(B, HV), b=rand(B, HV),
                 A_log=torch.randn(HV, device=device) * 0.5, dt_bias=torch.randn(HV, device=device) * 0.5)
        slots = torch.randperm(B, device=device, dtype=torch.int32)  # scattered, as in serving
        for dtype in (torch.float32, torch.bfloat16):
            pool = torch.randn(B, HV, K, V, device=device).to(dtype)
            moved = 2 * pool.numel() * pool.element_size()  # read + written

            def run(BV=None, warps=None):
                return fused_recurrent_decode(**x, state_pool=pool, slot_ids=slots, BV=BV, num_warps=warps)

            shapes = [(triton.testing.do_bench(lambda: run(bv, w)), bv, w) for bv in (32, 64, 128) for w in (2, 4, 8)]
            default = decode_launch_config(B, HV, K, V, device, pool.element_size())
            ms = triton.testing.do_bench(run)
            best = min(shapes)
            print(f"B={B} {str(dtype):15s} default {default} {ms * 1e3:7.1f} us {moved / ms / 1e6:5.0f} GB/s | "
                  f"best BV={best[1]} warps={best[2]} {best[0] * 1e3:7.1f} us | all "
                  + " ".join(f"{bv}/{w}:{t * 1e3:.0f}" for t, bv, w in shapes), flush=True)
            del pool


if __name__ == "__main__":
    main()
