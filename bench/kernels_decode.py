"""Decode kernel benchmark (GPU): our fused recurrent decode vs fla-core 0.6.0's
fused_recurrent_gated_delta_rule vs the copy-bandwidth roofline, measured in one run on one card.

    python bench/kernels_decode.py [--sweep] [--profile]

Per layer per request, decode reads and writes the fp32 state once: 2 * HV * K * V * 4 bytes.
The roofline is that over the card's device-to-device copy bandwidth (bytes read + written),
measured here in the same run. Both kernels do the same fused work from raw inputs (gates,
sigmoid(b), q/k l2norm, the update, the output); fla reads an [N, HV, K, V] initial state and
writes a new final state, ours updates a shuffled slot pool in place (same bytes).

fla runs in a child process, restarted after a failure: 0.6.0 was reported (issue 3) to die with an
illegal memory access at large batch with HV = 32, which would poison the CUDA context for
anything after it (not seen on an H200 with triton 3.6.0; docs/performance.md).
Also checks our kernel against kernels/reference.py at real sizes, including a pool of more than
2^31 elements. Prints a table; writes JSON to $OUT/kernels_decode.json when OUT is set.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kernels import reference  # noqa: E402
from kernels.recurrent import decode_launch_config, fused_recurrent_decode  # noqa: E402

SHAPES = {
    "H16 HV16 K128 V128": dict(H=16, HV=16, K=128, V=128),
    "H16 HV32 K128 V128": dict(H=16, HV=32, K=128, V=128),
    "H6 HV6 K256 V512": dict(H=6, HV=6, K=256, V=512),
}
BATCHES = [1, 8, 32, 128, 256, 1024, 2048]
DTYPE = torch.bfloat16  # activations; states are fp32


def state_bytes(s: dict, B: int) -> int:
    return 2 * B * s["HV"] * s["K"] * s["V"] * 4  # read + write, fp32


def inputs(s: dict, B: int, seed: int = 0) -> dict:
    """Random post-conv q, k, v [B, heads, dim] and raw gates (never zeros)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, HV, K, V = s["H"], s["HV"], s["K"], s["V"]
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(DTYPE)
    return dict(
        q=rand(B, H, K), k=rand(B, H, K), v=rand(B, HV, V), a=rand(B, HV), b=rand(B, HV),
        A_log=torch.randn(HV, generator=g, device="cuda") * 0.5,
        dt_bias=torch.randn(HV, generator=g, device="cuda") * 0.5,
    )


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn) -> float:
    """Median time of fn replayed as a captured CUDA graph: the kernel without host overhead,
    as the engine runs decode."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = median_ms(graph.replay)
    del graph
    return ms


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def copy_bandwidth_tbs() -> float:
    n = 1 << 28  # 1 GiB of fp32, far past L2
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / ms / 1e9


def check_ours(name: str, s: dict, B: int, num_slots: int) -> dict:
    """One decode step over a shuffled, padded batch of a num_slots pool vs the reference."""
    HV, K, V = s["HV"], s["K"], s["V"]
    x = inputs(s, B, seed=1)
    pool = torch.empty(num_slots, HV, K, V, device="cuda")  # [S, HV, K, V]
    pool.normal_()
    # Distinct shuffled slots, led by the pool's last (offsets past 2^31 when the pool is big).
    slots = torch.randperm(num_slots - 1, device="cuda")[:B]
    slots[0] = num_slots - 1
    slots[1::16] = -1  # padding
    live = (slots >= 0).nonzero().flatten()
    in_batch = set(slots.tolist())
    others = torch.tensor([i for i in range(num_slots) if i not in in_batch][:8], device="cuda")
    before, others_before = pool[slots[live]].clone(), pool[others].clone()

    o = fused_recurrent_decode(**x, state_pool=pool, slot_ids=slots)
    torch.cuda.synchronize()
    g, beta = reference.gdn_gates(x["a"][live], x["b"][live], x["A_log"], x["dt_bias"])
    o_ref, state_ref = reference.recurrent_gated_delta_rule(
        x["q"][live], x["k"][live], x["v"][live], g, beta, initial_state=before,
        cu_seqlens=torch.arange(len(live) + 1, device="cuda"))
    result = dict(
        shape=name, B=B, pool_elements=pool.numel(),
        o_rel_err=rel_err(o[live], o_ref), state_rel_err=rel_err(pool[slots[live]], state_ref),
        padding_rows_zero=bool((o[slots < 0] == 0).all()),
        other_slots_untouched=bool(torch.equal(pool[others], others_before)),
    )
    result["ok"] = (result["o_rel_err"] < 1e-2 and result["state_rel_err"] < 1e-5
                    and result["padding_rows_zero"] and result["other_slots_untouched"])
    del pool
    torch.cuda.empty_cache()
    return result


def time_ours(s: dict, B: int, BV=None, num_warps=None, graph=False):
    """Median ms (eager), or (eager, graph-replay) ms with graph=True."""
    x = inputs(s, B)
    pool = torch.randn(B, s["HV"], s["K"], s["V"], device="cuda")
    slots = torch.randperm(B, device="cuda", dtype=torch.int32)  # scattered, as in serving

    def run():
        return fused_recurrent_decode(**x, state_pool=pool, slot_ids=slots, BV=BV, num_warps=num_warps)

    ms = median_ms(run)
    if graph:
        ms = (ms, graph_ms(run))
    del pool
    torch.cuda.empty_cache()
    return ms


def sweep(name: str, s: dict, B: int) -> list[dict]:
    """Our kernel over (BV, num_warps) for one shape and batch."""
    rows = []
    BK = triton.next_power_of_2(s["K"])
    for BV in (32, 64, 128):
        for warps in (2, 4, 8, 16):
            per_thread = BK * BV // (32 * warps)
            if BV > s["V"] or not 16 <= per_thread <= 128:
                continue
            ms = time_ours(s, B, BV, warps)
            rows.append(dict(shape=name, B=B, BV=BV, num_warps=warps, us=ms * 1e3))
    return rows


# ---- fla-core in a child process --------------------------------------------------------------

def fla_worker(jobs: list) -> None:
    """Times fla on each job, printing one RESULT line per job; exits on the first failure (a
    CUDA error leaves the context unusable) after printing it."""
    try:
        from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule as fla_fn
    except Exception as e:  # noqa: BLE001 - no fla: every job fails the same way, once
        for name, B in jobs:
            print("RESULT " + json.dumps(dict(shape=name, B=B, error=f"import: {e!r}"[:300])), flush=True)
        return

    for name, B in jobs:
        s = SHAPES[name]
        try:
            x = inputs(s, B)
            h0 = torch.randn(B, s["HV"], s["K"], s["V"], device="cuda")  # [N, HV, K, V]
            q, k, v = x["q"][:, None], x["k"][:, None], x["v"][:, None]  # [B, T=1, heads, dim]
            a, b = x["a"][:, None], x["b"][:, None]  # [B, 1, HV]

            def run():
                return fla_fn(q, k, v, g=a, beta=b, initial_state=h0, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                              A_log=x["A_log"], dt_bias=x["dt_bias"], use_beta_sigmoid_in_kernel=True)

            o_fla, ht = run()
            pool = h0.clone()
            o_ours = fused_recurrent_decode(**x, state_pool=pool, slot_ids=torch.arange(B, device="cuda"))
            torch.cuda.synchronize()
            agree = dict(o_vs_ours=rel_err(o_fla[:, 0], o_ours), state_vs_ours=rel_err(ht, pool))
            del pool
            ms = median_ms(run)
            try:
                agree["graph_us"] = graph_ms(run) * 1e3
            except Exception as e:  # noqa: BLE001 - eager timing stands; say why graphs failed
                agree["graph_error"] = repr(e)[:200]
            print("RESULT " + json.dumps(dict(shape=name, B=B, us=ms * 1e3, **agree)), flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, then the parent restarts us
            print("RESULT " + json.dumps(dict(shape=name, B=B, error=repr(e)[:300])), flush=True)
            sys.exit(1)
        del x, h0
        torch.cuda.empty_cache()


def run_fla(jobs: list) -> dict:
    """{(shape, B): result} for every job; a child that dies mid-job marks that job failed."""
    results = {}
    remaining = list(jobs)
    while remaining:
        try:
            proc = subprocess.run([sys.executable, __file__, "--fla-worker", json.dumps(remaining)],
                                  capture_output=True, text=True, timeout=240)
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode(), "timeout"
        for line in out.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[(r["shape"], r["B"])] = r
        pending = [j for j in remaining if tuple(j) not in results]
        if pending and pending == remaining:  # died before reporting its first job
            name, B = pending[0]
            results[(name, B)] = dict(shape=name, B=B, error=err.strip()[-300:] or "worker died")
            pending = pending[1:]
        remaining = pending
    return results


# ---- ncu --------------------------------------------------------------------------------------

def profile_target() -> None:
    """One launch of each kernel at H16 HV16 K128 V128, B=1024 (run under ncu)."""
    from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule as fla_fn
    s, B = SHAPES["H16 HV16 K128 V128"], 1024
    x = inputs(s, B)
    pool = torch.randn(B, s["HV"], s["K"], s["V"], device="cuda")
    slots = torch.randperm(B, device="cuda", dtype=torch.int32)
    fused_recurrent_decode(**x, state_pool=pool, slot_ids=slots)
    fla_fn(x["q"][:, None], x["k"][:, None], x["v"][:, None], g=x["a"][:, None], beta=x["b"][:, None],
           initial_state=pool, output_final_state=True, use_qk_l2norm_in_kernel=True,
           use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"],
           use_beta_sigmoid_in_kernel=True)
    torch.cuda.synchronize()


def run_ncu(out_dir: str | None) -> list[str]:
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        return ["ncu not found"]
    cmd = [ncu, "--clock-control", "none", "-k", "regex:fused_recurrent", "-c", "2",
           "--section", "SpeedOfLight", "--section", "Occupancy", "--section", "LaunchStats",
           "--section", "MemoryWorkloadAnalysis", sys.executable, __file__, "--profile-target"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    text = proc.stdout + proc.stderr
    if out_dir:
        with open(os.path.join(out_dir, "ncu.txt"), "w") as f:
            f.write(text)
    keys = ("fused_recurrent", "DRAM Throughput", "Memory Throughput", "Duration", "Registers Per",
            "Achieved Occupancy", "Theoretical Occupancy", "Block Limit Registers", "L2 Hit", "Mem Busy",
            "Max Bandwidth", "Waves Per SM")
    return [line.rstrip() for line in text.splitlines() if any(k in line for k in keys)]


# ---- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fla-worker")
    parser.add_argument("--profile-target", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep (BV, num_warps)")
    parser.add_argument("--profile", action="store_true", help="also run ncu on both kernels")
    args = parser.parse_args()
    if args.fla_worker:
        return fla_worker(json.loads(args.fla_worker))
    if args.profile_target:
        return profile_target()

    out_dir = os.environ.get("OUT")
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    meta = dict(card=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__)
    print(meta, flush=True)
    report = dict(meta=meta)

    def save():
        if out_dir:
            with open(os.path.join(out_dir, "kernels_decode.json"), "w") as f:
                json.dump(report, f, indent=1)

    copy_tbs = copy_bandwidth_tbs()
    report["copy_TBps"] = copy_tbs
    print(f"device-to-device copy: {copy_tbs:.3f} TB/s (read + write)", flush=True)

    checks = []
    for name, s in SHAPES.items():
        checks.append(check_ours(name, s, B=256, num_slots=512))
    big = SHAPES["H16 HV32 K128 V128"]  # 4200 slots x 32 x 128 x 128 = 2.2e9 elements > 2^31
    checks.append(check_ours("H16 HV32 K128 V128", big, B=256, num_slots=4200))
    report["checks"] = checks
    for c in checks:
        print("check", c, flush=True)
    save()

    if args.sweep:
        rows = []
        for name, s in SHAPES.items():
            for B in (1024,):
                rows += sweep(name, s, B)
                for r in rows:
                    if r["shape"] == name and r["B"] == B:
                        frac = state_bytes(s, B) / r["us"] / 1e6 / copy_tbs
                        print(f"  BV={r['BV']:3d} warps={r['num_warps']:2d} {r['us']:8.1f} us "
                              f"{100 * frac:5.1f}% of copy", flush=True)
                best = min((r for r in rows if r["shape"] == name and r["B"] == B), key=lambda r: r["us"],
                           default=None)
                if best is None:
                    continue
                print(f"sweep {name} B={B}: best BV={best['BV']} warps={best['num_warps']} "
                      f"{best['us']:.1f} us; default {decode_launch_config(B, s['HV'], s['K'], s['V'], torch.device('cuda'))}",
                      flush=True)
        report["sweep"] = rows
        save()

    ours = {}
    for name, s in SHAPES.items():
        for B in BATCHES:
            ours[(name, B)] = [ms * 1e3 for ms in time_ours(s, B, graph=True)]
    torch.cuda.empty_cache()
    fla = run_fla([[name, B] for name in SHAPES for B in BATCHES])

    table = []
    for name, s in SHAPES.items():
        for B in BATCHES:
            nbytes = state_bytes(s, B)
            us, graph_us = ours[(name, B)]
            f = fla[(name, B)]
            row = dict(shape=name, B=B, state_MB=nbytes / 2 / 1e6, ours_us=us, ours_graph_us=graph_us,
                       ours_TBps=nbytes / us / 1e6, ours_frac_copy=nbytes / us / 1e6 / copy_tbs,
                       config=decode_launch_config(B, s["HV"], s["K"], s["V"], torch.device("cuda")))
            if "us" in f:
                row.update(fla_us=f["us"], fla_frac_copy=nbytes / f["us"] / 1e6 / copy_tbs,
                           speedup=f["us"] / us, fla_o_vs_ours=f["o_vs_ours"],
                           fla_state_vs_ours=f["state_vs_ours"],
                           fla_graph_us=f.get("graph_us"), fla_graph_error=f.get("graph_error"))
            else:
                row["fla_error"] = f["error"]
            table.append(row)
    report["table"] = table
    save()

    if args.profile:
        report["ncu"] = run_ncu(out_dir)
        print("\n".join(report["ncu"]))
        save()

    print(f"\ncard {meta['card']}, copy {copy_tbs:.2f} TB/s, triton {meta['triton']}, "
          f"{time.time() - t_start:.0f} s")
    print("all checks ok" if all(c["ok"] for c in checks) else "CHECK FAILED")
    print(f"{'shape':20} {'B':>5} {'state MB':>9} {'ours us':>8} {'%copy':>6} {'fla us':>8} "
          f"{'%copy':>6} {'speedup':>7} {'ours graph':>10} {'fla graph':>9}  BV,warps")
    for r in table:
        fla_part = (f"{r['fla_us']:8.1f} {100 * r['fla_frac_copy']:6.1f} {r['speedup']:7.2f}"
                    if "fla_us" in r else f"{'FAILED':>8} {'':6} {'':7}")
        fla_graph = r.get("fla_graph_us")
        fla_graph = f"{fla_graph:9.1f}" if fla_graph else f"{'-':>9}"
        print(f"{r['shape']:20} {r['B']:5d} {r['state_MB']:9.1f} {r['ours_us']:8.1f} "
              f"{100 * r['ours_frac_copy']:6.1f} {fla_part} {r['ours_graph_us']:10.1f} {fla_graph}  "
              f"{r['config']}")
    for r in table:
        if "fla_error" in r:
            print(f"fla failed at {r['shape']} B={r['B']}: {r['fla_error'][-160:]}")
        elif r.get("fla_graph_error"):
            print(f"fla graph capture failed at {r['shape']} B={r['B']}: {r['fla_graph_error'][:160]}")


if __name__ == "__main__":
    main()
