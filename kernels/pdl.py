"""Programmatic dependent launch (PDL, Hopper on): the one switch and the launch helpers every
decode-step kernel uses.

A kernel launched with PDL may start while the kernel before it on the stream is still running: its
programs are scheduled once every program of the one before has called gdc_launch_dependents (or
exited), and each waits in gdc_wait until that kernel has finished and its writes are visible. So a
kernel that calls gdc_launch_dependents first and gdc_wait before its first load or store of shared
data computes exactly what it would without PDL (same bits), but its launch and prologue overlap the
tail of the kernel before. A decode step at small batch is ~190 launches of a few microseconds each,
where that overlap is a measurable share (docs/performance.md, "Session 6: decode GEMMs" and "Session 7").

Rules for a kernel that takes a PDL constexpr: under `if PDL:` call gdc_launch_dependents at the top
and gdc_wait before touching any tensor another kernel writes or reads; launch it with
`**launch_kwargs(device)` and PDL=enabled(device). Kernels launched without PDL (cuBLAS, torch's) wait
for everything before them as usual, so mixing is safe. Before gdc_wait a kernel may only read (or
prefetch_l2) what no kernel of the step writes: weights (kernels/decode_gemv.py, decode_linear.py,
norm.py), slot ids and positions copied in before the step, and a slot's recurrent state and conv taps of
earlier positions, which only its own layer's kernel writes (kernels/gdn_decode.py). Early launches chain, so "before" may be several
kernels back, never past a kernel launched without PDL.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # grid dependency control; an older Triton never turns PDL on (see enabled)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Whether decode-step kernels launch with PDL (where the device supports it). Read at every launch, so a
# benchmark can flip it between graph captures (bench/engine.py --pdl, bench/decode_ops.py --check-pdl).
ENABLED = True


def enabled(device: torch.device) -> bool:
    """Whether a kernel launched now on `device` uses PDL: ENABLED, a Triton that has it, a CUDA
    device of compute capability 9 or later."""
    return ENABLED and gdc_wait is not None and device.type == "cuda" and _hopper_or_later(device)


@functools.lru_cache(maxsize=None)
def _hopper_or_later(device: torch.device) -> bool:  # asked at every eager launch: once per device
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_kwargs(device: torch.device) -> dict:
    """The extra keyword arguments of a Triton launch on `device`: {"launch_pdl": True} or none."""
    return {"launch_pdl": True} if enabled(device) else {}


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at every pointer: a hint, nothing waits for it (CUDA only; the
    interpreter has no inline assembly). Before gdc_wait it overlaps the read of data no kernel on the
    stream writes (a GEMM's weights) with the kernel before."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
