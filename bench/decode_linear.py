"""A decode step's GEMMs: kernels/decode_linear.py vs cuBLAS (torch.matmul), per shape of the bench
model (bench/engine.py's 0.65B Qwen3.5 shape) and batch M, on the weight bytes each must stream.

    python3 bench/decode_linear.py [--ms 1,8,32,64,128,256] [--shapes in_proj,down] [--sweep]

Each time is one call's share of a CUDA graph of many calls that rotate over enough copies of the
weight (>= 4, >= ~200 MB in all) that every call reads its weight from HBM, not from the 50-60 MB L2,
as in a decode step, where each layer's weights are read once; x stays the same (it is in L2 in a step
too, written by the kernel before). cuBLAS is `torch.matmul(x, w.t(), out=y)`; for gate_up it is
followed by kernels/swiglu.silu_mul, since ours fuses the activation (cuBLAS alone is printed too).
TB/s is weight bytes / time; "copy" is the card's device-to-device copy rate (bytes read + written).

Without --sweep: ours with the launch shape kernels/decode_linear.pick takes (TABLE; the default
config where the table has none), checked against fp32 torch on the GPU. With --sweep: every launch
shape of a grid per (shape, M), the best re-timed against cuBLAS, and the TABLE to paste into
kernels/decode_linear.py (ours where it beats cuBLAS by >= 3%). Kernels are compiled first in parallel
worker processes (Triton's disk cache), as compiling the grid in one process takes minutes.
JSON lines go to $OUT/decode_linear.jsonl when OUT is set, and the sweep's table to
$OUT/decode_linear_table.json (bench/engine.py --decode-linear-table that file makes the engine use it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import copy_bandwidth  # noqa: E402
from kernels import decode_linear as dl  # noqa: E402
from kernels import pdl as pdl_switch  # noqa: E402
from kernels.decode_linear import LinearConfig  # noqa: E402

# name -> (N, K, silu): bench/engine.py's model (hidden 1024, intermediate 3584, 16 heads of 128 for
# Gated DeltaNet, 8 x 256 gated attention with 2 KV heads, vocab 151936)
SHAPES = {
    "in_proj": (8224, 1024, False),  # 18 a step
    "gate_up": (7168, 1024, True),  # 24, with silu * up fused
    "down": (1024, 3584, False),  # 24
    "out_proj": (1024, 2048, False),  # 18 GDN out_proj + 6 attention o_proj
    "qkv": (5120, 1024, False),  # 6
    "lm_head": (151936, 1024, False),  # 1
}
PER_STEP = {"in_proj": 18, "gate_up": 24, "down": 24, "out_proj": 24, "qkv": 6, "lm_head": 1}
ROTATE_BYTES = 200e6


def report(**fields) -> None:
    line = json.dumps(fields)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "decode_linear.jsonl", "a") as f:
            f.write(line + "\n")


class Case:
    """One (shape, M): weight copies to rotate over, x, and an output buffer."""

    def __init__(self, name: str, M: int, dtype=torch.bfloat16):
        self.name, self.M = name, M
        N, K, silu = SHAPES[name]
        self.N, self.K, self.silu = N, K, silu
        self.bytes = N * K * torch.finfo(dtype).bits // 8
        copies = max(4, int(ROTATE_BYTES // self.bytes) + 1)
        gen = torch.Generator(device="cuda").manual_seed(M)
        self.ws = [0.03 * torch.randn(N, K, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
        self.x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen)
        self.out = torch.empty(M, N // 2 if silu else N, device="cuda", dtype=dtype)
        self.norm_weight = torch.ones(K, device="cuda")
        self.spacer = False  # each call preceded by an RMSNorm writing x, as in a decode step

    def _x(self):
        if not self.spacer:
            return self.x
        from kernels.norm import rms_norm
        return rms_norm(self.x, self.norm_weight)

    def norm_only(self):
        return lambda w: self._x()

    def calls(self) -> int:
        return max(len(self.ws), 24)

    def ours(self, cfg: LinearConfig):
        return lambda w: dl.linear(self._x(), w, cfg, silu=self.silu, out=self.out)

    def cublas(self, with_silu: bool = True):
        if self.silu and with_silu:
            from kernels.swiglu import silu_mul
            return lambda w: silu_mul(torch.matmul(self._x(), w.t()))
        out = torch.empty(self.M, self.N, device="cuda", dtype=self.x.dtype)
        return lambda w: torch.matmul(self._x(), w.t(), out=out)


def time_us(case: Case, fn, replays: int = 3) -> float:
    """Microseconds per call of fn over the case's rotating weights, replayed as one CUDA graph."""
    n = case.calls()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in case.ws[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(case.ws[i % len(case.ws)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / (replays * n)


def check(case: Case, cfg: LinearConfig) -> float:
    """||ours - fp32 torch|| / ||fp32 torch|| on the case's first weight."""
    import torch.nn.functional as F
    w = case.ws[0]
    ref = case.x.float() @ w.float().t()
    if case.silu:
        gate, up = ref.chunk(2, dim=-1)
        ref = F.silu(gate) * up
    got = dl.linear(case.x, w, cfg, silu=case.silu).float()
    return ((got - ref).norm() / ref.norm()).item()


def grid(M: int, N: int, K: int, silu: bool) -> list[LinearConfig]:
    """The launch shapes the sweep times for one (M, N, K)."""
    BM = dl.block_m(M)
    out = []
    tiles_64 = -(-(N // 2 if silu else N) // (32 if silu else 64))
    splits = [1] if tiles_64 >= 400 else [1, 2] if tiles_64 >= 64 else [1, 2, 4, 8]
    for bn, bk, warps, stages, split in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 5), splits):
        if warps == 8 and bn * BM < 64 * 64 or warps == 4 and bn * BM > 128 * 128:
            continue
        if stages * (bn + BM) * bk * 2 > 200 * 1024:  # shared memory
            continue
        if split > 1 and K // split < 256:
            continue
        out.append(LinearConfig(bn=bn, bk=bk, split=split, warps=warps, stages=stages))
    return out


def _compile_worker(jobs: list[tuple]) -> int:
    """Run each job once (building its kernel into Triton's disk cache); returns how many failed."""
    failed = 0
    for name, M, cfg, *pdl in jobs:
        pdl_switch.ENABLED = pdl[0] if pdl else pdl_switch.ENABLED
        N, K, silu = SHAPES[name]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(min(N, 2048), K, device="cuda", dtype=torch.bfloat16)  # N's value is not compiled in
        try:
            dl.linear(x, w, cfg, silu=silu)
        except Exception:  # noqa: BLE001 (out of resources: the sweep skips it)
            failed += 1
    torch.cuda.synchronize()
    return failed


def precompile(jobs: list[tuple], workers: int) -> None:
    """Build the kernels of `jobs` ((shape, M, config[, pdl])) in parallel processes (deduplicated by what
    Triton compiles by)."""
    import multiprocessing as mp
    seen, unique = set(), []
    for job in jobs:
        name, M, cfg = job[:3]
        N, K, silu = SHAPES[name]
        key = (dl.block_m(M), cfg.bn, min(cfg.bk, K), cfg.warps, cfg.stages, silu, cfg.split, K % cfg.bk == 0, *job[3:])
        if key not in seen:
            seen.add(key)
            unique.append(job)
    start = time.perf_counter()
    chunks = [unique[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = sum(pool.map(_compile_worker, chunks))
    print(f"compiled {len(unique)} kernel variants in {time.perf_counter() - start:.0f} s "
          f"with {workers} processes ({failed} failed)", flush=True)


def sweep(names: list[str], ms: list[int], workers: int, copy_bw: float) -> None:
    jobs = [(name, M, cfg) for name in names for M in ms for cfg in grid(M, *SHAPES[name])]
    precompile(jobs, workers)
    table: dict[str, list] = {}
    for name in names:
        for M in ms:
            case = Case(name, M)
            timed = []
            for cfg in grid(M, *SHAPES[name]):
                try:
                    timed.append((time_us(case, case.ours(cfg), replays=2), cfg))
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} M={M} {cfg}: {type(e).__name__}", flush=True)
            timed.sort(key=lambda t: t[0])
            top = [cfg for _, cfg in timed[:3]]
            # re-time the three best and cuBLAS, interleaved, to take the sweep's luck out
            again = {cfg: [] for cfg in top}
            cublas = []
            for _ in range(3):
                cublas.append(time_us(case, case.cublas()))
                for cfg in top:
                    again[cfg].append(time_us(case, case.ours(cfg)))
            best = min(top, key=lambda c: sorted(again[c])[1])
            ours_us, cublas_us = sorted(again[best])[1], sorted(cublas)[1]
            cublas_alone = time_us(case, case.cublas(with_silu=False)) if case.silu else cublas_us
            err = check(case, best)
            report(what="sweep", shape=name, N=case.N, K=case.K, M=M, configs=len(timed), best=str(best),
                   ours_us=round(ours_us, 2), cublas_us=round(cublas_us, 2), cublas_gemm_only_us=round(cublas_alone, 2),
                   ours_TBps=round(case.bytes / ours_us / 1e6, 2), cublas_TBps=round(case.bytes / cublas_us / 1e6, 2),
                   copy_us=round(case.bytes / copy_bw * 1e6, 2), ratio=round(cublas_us / ours_us, 2), rel_err=f"{err:.1e}",
                   runners_up=[(str(c), round(t, 2)) for t, c in timed[1:4]])
            table.setdefault(name, []).append((M, best if ours_us < 0.97 * cublas_us else None))
            del case
            torch.cuda.empty_cache()
    write_table(table)


def compare(names: list[str], ms: list[int], copy_bw: float, workers: int, spacer: bool) -> None:
    """Ours (the launch shape from TABLE, else --candidates', else the default; with PDL as
    kernels/pdl.ENABLED says, and the other way too) vs cuBLAS per (shape, M), and the sum over a step's
    GEMMs per M. With `spacer`, every call follows an RMSNorm writing x (as in a decode step, where the norm's
    tail and our launch can overlap under PDL); its time alone is printed and subtracted. Writes the table
    of winners (ours, as PDL says, >= 3% faster) to $OUT."""
    default_pdl = pdl_switch.ENABLED
    configs = {}
    for name in names:
        N, K, silu = SHAPES[name]
        for M in ms:
            configs[name, M] = dl.measured(M, N, K, silu)[1] or CANDIDATES.get((N, K, silu, M)) or \
                dl.default_config(M, N, K, silu)
    precompile([(name, M, cfg, pdl) for (name, M), cfg in configs.items() for pdl in (True, False)], workers)
    winners: dict[str, list] = {}
    for M in ms:
        step = {"ours": 0.0, "cublas": 0.0, "bytes": 0.0}
        for name in names:
            case = Case(name, M)
            case.spacer = spacer
            cfg = configs[name, M]
            times = {"cublas": [], "ours": [], "ours_other_pdl": [], "norm": []}
            fns = {"cublas": case.cublas(), "ours": case.ours(cfg), "ours_other_pdl": case.ours(cfg),
                   "norm": case.norm_only()}
            for _ in range(3):
                for key, fn in fns.items():
                    if key != "norm" or spacer:
                        # PDL is one switch for every kernel (the spacer norm's too): flipped for that variant only
                        pdl_switch.ENABLED = default_pdl != (key == "ours_other_pdl")
                        times[key].append(time_us(case, fn))
            pdl_switch.ENABLED = default_pdl
            med = {k: sorted(v)[1] if v else 0.0 for k, v in times.items()}
            us = {k: med[k] - med["norm"] for k in ("cublas", "ours", "ours_other_pdl")}
            win = us["ours"] < 0.97 * us["cublas"]
            winners.setdefault(name, []).append((M, cfg if win else None))
            report(what="gemm", shape=name, M=M, config=str(cfg), spacer_norm_us=round(med["norm"], 2),
                   pdl=default_pdl, ours_us=round(us["ours"], 2),
                   ours_other_pdl_us=round(us["ours_other_pdl"], 2),
                   cublas_us=round(us["cublas"], 2), ratio=round(us["cublas"] / us["ours"], 2),
                   ours_TBps=round(case.bytes / us["ours"] / 1e6, 2), cublas_TBps=round(case.bytes / us["cublas"] / 1e6, 2),
                   copy_us=round(case.bytes / copy_bw * 1e6, 2), ours_wins=win, rel_err=f"{check(case, cfg):.1e}")
            n = PER_STEP[name]
            step["ours"] += n * min(us["ours"], us["cublas"]) if win else n * us["cublas"]
            step["cublas"] += n * us["cublas"]
            step["bytes"] += n * case.bytes
            del case
            torch.cuda.empty_cache()
        report(what="step_gemms", M=M, with_winners_us=round(step["ours"], 1), cublas_us=round(step["cublas"], 1),
               copy_us=round(step["bytes"] / copy_bw * 1e6, 1))
    write_table(winners)


CANDIDATES: dict = {}  # (N, K, silu, M) -> config: --candidates (a sweep's best per row, winner or not)


def write_table(table: dict[str, list]) -> None:
    if os.environ.get("OUT"):
        import dataclasses
        rows = [[*SHAPES[name], [[M, None if c is None else dataclasses.asdict(c)] for M, c in entries]]
                for name, entries in table.items()]
        with open(Path(os.environ["OUT"]) / "decode_linear_table.json", "w") as f:
            json.dump(rows, f)
    print("TABLE = {")
    for name, rows in table.items():
        N, K, silu = SHAPES[name]
        print(f"    ({N}, {K}, {silu}): [  # {name}")
        for M, cfg in rows:
            print(f"        ({M}, {cfg!r}),")
        print("    ],")
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,8,32,64,128,256")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--spacer", action="store_true", help="an RMSNorm writing x before every call")
    parser.add_argument("--candidates", help="a table JSON (as written to $OUT) whose configs the comparison "
                        "times where kernels/decode_linear.TABLE has none")
    args = parser.parse_args()
    if args.candidates:
        for N, K, silu, entries in json.load(open(args.candidates)):
            for M, c in entries:
                if c is not None:
                    CANDIDATES[N, K, bool(silu), M] = LinearConfig(**c)
    names = args.shapes.split(",")
    ms = [int(m) for m in args.ms.split(",")]
    copy_bw = copy_bandwidth()
    report(what="copy", TBps=round(copy_bw / 1e12, 3), gpu=torch.cuda.get_device_name(),
           triton=__import__("triton").__version__, torch=torch.__version__)
    if args.sweep:
        sweep(names, ms, args.workers, copy_bw)
    else:
        compare(names, ms, copy_bw, args.workers, args.spacer)


if __name__ == "__main__":
    main()
