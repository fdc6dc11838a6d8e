"""How many GPU kernels one decode step launches, counted on CPU: every memory-writing aten op and
every Triton launch of one `DecodeStep` (the function a CUDA graph captures) of a random-weight
Qwen3.5-shaped model (24 layers: 18 Gated DeltaNet + 6 gated attention, as bench/engine.py's 0.65B,
with small widths: the count does not depend on them).

    TRITON_INTERPRET=1 python bench/decode_ops.py [--batch 1 128] [--backend triton] [--dtype bfloat16] [--ops]
    TRITON_INTERPRET=0 python bench/decode_ops.py --device cuda [--check]

On CUDA it also counts the GPU kernels (memcpys included) torch.profiler sees in one uncaptured step,
and --check compares the triton backend's logits with the torch backend's over prefill and a few
graph-captured decode steps of the same random model (bf16 and fp32); --check-pdl compares the graphed
decode logits with programmatic dependent launch (kernels/pdl.ENABLED) on and off for every decode-step
kernel (same kernels: they must be equal bit for bit), with every projection on kernels/decode_linear and
with its table's choice.

What counts as a launch: a Triton kernel call, and an aten op that is neither a view nor an
allocation. Two torch functions are one fused kernel on CUDA but decompose into several aten ops on
CPU; they count as one here, so the total is what the GPU sees: F.rms_norm (`_fused_rms_norm`) and
F.scaled_dot_product_attention. A cuBLAS matmul counts as one (it may be a GEMM plus a reduction).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cuda_graphs import DecodeStep  # noqa: E402
from engine.models import qwen3_5  # noqa: E402
from engine.models.hybrid import HybridLM  # noqa: E402
from engine.models.state import Batch  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=24,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             full_attention_interval=4, tie_word_embeddings=True)

# Allocations and metadata: no kernel on CUDA.
_FREE = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "set_", "resize_"}
# One fused kernel on CUDA; their CPU decomposition is not counted.
_FUSED_ON_CUDA = {F.rms_norm: "rms_norm", F.scaled_dot_product_attention: "scaled_dot_product_attention"}


def _aliases_an_input(out, args) -> bool:
    """Whether an op whose schema may alias (to, contiguous, reshape) returned a view rather than a copy."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return all(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in storages for o in outs)


class LaunchCounter(TorchDispatchMode):
    """Counts launches by name while active: aten ops (see the module docstring) and Triton kernels."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.muted = 0  # inside a function counted as one fused kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if not self.muted and name not in _FREE and not (func.is_view and _aliases_an_input(out, args)):
            self.counts[name] += 1
        return out

    def __enter__(self):
        self._patch_triton()
        self._fused = _FusedCounter(self)
        self._fused.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._fused.__exit__(*exc)
        self._unpatch_triton()

    def _patch_triton(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        self._originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}
        counter = self

        def counted(original):
            def run(fn, *args, **kwargs):
                if not kwargs.get("warmup"):
                    counter.counts[f"triton:{fn.__name__}"] += 1
                counter.muted += 1  # the interpreter's own host copies are not launches
                try:
                    return original(fn, *args, **kwargs)
                finally:
                    counter.muted -= 1
            return run

        for cls, original in self._originals.items():
            cls.run = counted(original)

    def _unpatch_triton(self) -> None:
        for cls, original in self._originals.items():
            cls.run = original

    def summary(self) -> tuple[int, int, int]:
        """(aten launches, triton launches, total)."""
        triton = sum(n for k, n in self.counts.items() if k.startswith("triton:"))
        total = sum(self.counts.values())
        return total - triton, triton, total


class _FusedCounter(TorchFunctionMode):
    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _FUSED_ON_CUDA.get(func)
        if name is None or self.counter.muted:
            return func(*args, **(kwargs or {}))
        self.counter.counts[name] += 1
        self.counter.muted += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.muted -= 1


def random_model(backend: str, dtype: torch.dtype, shape: dict = SHAPE, seed: int = 0,
                 device: str = "cpu") -> HybridLM:
    """The Qwen3.5-shaped decoder with random weights (fp32 norms and gate constants, as loaded)."""
    torch.manual_seed(seed)
    model = HybridLM(qwen3_5.parse_config(shape), backend)
    with torch.no_grad():
        for param in model.parameters():
            if param.fp32:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape))
            else:
                param.copy_(0.05 * torch.randn(param.shape))
                param.data = param.data.to(dtype)
    return model.to(device).eval()


def count_decode_step(model: HybridLM, batch: int, position: int = 40, max_len: int = 640) -> LaunchCounter:
    """Launches of one decode step of `batch` sequences at `position` through DecodeStep (uncaptured), in a
    pool of max_len positions (bench/engine.py: 512 + 128)."""
    pool = model.new_pool(batch, max_len=max_len)
    slots = [pool.allocate() for _ in range(batch)]
    step = DecodeStep(model, pool, max_batch=batch, capture=False)
    ids = [(7 * i) % model.config.vocab_size for i in range(batch)]
    positions = [position] * batch
    step.run(ids, slots, positions)  # once outside the counter: first-call caches do not count
    counter = LaunchCounter()
    with counter:
        step.run(ids, slots, positions)
    return counter


def gpu_kernels(model: HybridLM, batch: int, position: int = 40, max_len: int = 640) -> int:
    """GPU kernels (and memcpys) torch.profiler records in one uncaptured decode step."""
    from torch.profiler import ProfilerActivity, profile
    pool = model.new_pool(batch, max_len=max_len)
    slots = [pool.allocate() for _ in range(batch)]
    step = DecodeStep(model, pool, max_batch=batch, capture=False)
    ids, positions = [(7 * i) % model.config.vocab_size for i in range(batch)], [position] * batch
    step.run(ids, slots, positions)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step.run(ids, slots, positions)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def check_against_torch(batch: int, dtype: torch.dtype, device: str, steps: int = 8) -> float:
    """Largest |logit difference| between the triton and torch backends of the same random model over a
    prefill of 100 tokens per sequence and `steps` decode steps (the triton backend's captured as CUDA graphs
    on CUDA)."""
    logits = []
    for backend in ("torch", "triton"):
        model = random_model(backend, dtype, device=device)
        pool = model.new_pool(batch, max_len=256)
        slots = [pool.allocate() for _ in range(batch)]
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, model.config.vocab_size, (batch * 100,), generator=gen).to(device)
        outs = [model.logits(model(prompts, Batch.build([100] * batch, slots, [0] * batch, model.device), pool))]
        # The torch backend reads sequence bounds on the host, which a CUDA graph cannot capture.
        step = DecodeStep(model, pool, max_batch=batch, capture=device == "cuda" and backend == "triton")
        for i in range(steps):
            ids = [(13 * i + 7 * j) % model.config.vocab_size for j in range(batch)]
            outs.append(step.run(ids, slots, [100 + i] * batch).float().clone())
        logits.append(torch.cat(outs))
    return (logits[0] - logits[1]).abs().max().item()


def check_pdl(model: HybridLM, batch: int, mode: str, steps: int = 8) -> bool:
    """Whether graphed decode logits after a 100-token prefill are bitwise the same with
    kernels/pdl.ENABLED off and on, kernels/decode_linear.MODE set to `mode`."""
    from kernels import decode_linear, pdl
    saved = decode_linear.MODE, pdl.ENABLED
    logits = []
    for use_pdl in (False, True):
        decode_linear.MODE, pdl.ENABLED = mode, use_pdl
        pool = model.new_pool(batch, max_len=256)
        slots = [pool.allocate() for _ in range(batch)]
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, model.config.vocab_size, (batch * 100,), generator=gen).to(model.device)
        model(prompts, Batch.build([100] * batch, slots, [0] * batch, model.device), pool)
        step = DecodeStep(model, pool, max_batch=batch, capture=model.device.type == "cuda")
        outs = []
        for i in range(steps):
            ids = [(13 * i + 7 * j) % model.config.vocab_size for j in range(batch)]
            outs.append(step.run(ids, slots, [100 + i] * batch).clone())
        logits.append(torch.cat(outs))
    decode_linear.MODE, pdl.ENABLED = saved
    return torch.equal(logits[0], logits[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--backend", default="triton", choices=["triton", "torch"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ops", action="store_true", help="list the launches by op")
    parser.add_argument("--check", action="store_true", help="triton vs torch backend logits (see above)")
    parser.add_argument("--check-pdl", action="store_true", help="decode logits with PDL on vs off (see above)")
    args = parser.parse_args()
    model = random_model(args.backend, getattr(torch, args.dtype), device=args.device)
    layers = model.config.num_layers
    for batch in args.batch:
        counter = count_decode_step(model, batch)
        aten, triton, total = counter.summary()
        print(f"B={batch} backend={args.backend} dtype={args.dtype} {layers} layers: {total} launches per decode "
              f"step ({aten} aten, {triton} triton)")
        if args.device.startswith("cuda"):
            print(f"  torch.profiler: {gpu_kernels(model, batch)} GPU kernels + memcpys in one uncaptured step")
        if args.check:
            for dtype in (torch.float32, torch.bfloat16):
                diff = check_against_torch(batch, dtype, args.device)
                print(f"  triton vs torch backend, {dtype}: max |logit diff| {diff:.3g}")
        if args.check_pdl:
            for mode in ("on", "auto"):
                print(f"  decode_linear MODE={mode}: PDL on vs off bitwise equal: {check_pdl(model, batch, mode)}")
        if args.ops:
            for name, n in counter.counts.most_common():
                print(f"  {n:6d}  {name}")


if __name__ == "__main__":
    main()
