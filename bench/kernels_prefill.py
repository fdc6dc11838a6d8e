"""Prefill kernel benchmark: ours (kernels/chunk.py) vs fla-core's chunk_gated_delta_rule, same card,
same inputs, same run. Checks both against the fp32 reference first, then times with do_bench
(median) and prints Mtok/s and the ratio ours / fla. Writes JSON to $OUT/prefill.json if OUT is set.

    python bench/kernels_prefill.py [--sweep] [--profile] [--quick]

--sweep also times every StateConfig in a small grid (the state kernel's launch shape) per row;
--profile prints per-kernel GPU times of one call of each, from torch.profiler.
Ours is timed as the engine calls it (chunk plan built once per batch, as fla caches its chunk
indices per cu_seqlens), with the plan rebuilt per call, and as a CUDA graph replay (no launch
overhead); fla eagerly and, where capture works, as a graph too.
One shape with all four layouts takes over 105 s on an H200 (fla's autotuning and compiles take
most of it): run one process per shape (--shape 0/1/2) with about 200 s each, and the
correctness check alone with --shape 9.
"""

import argparse
import itertools
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kernels import reference  # noqa: E402
from kernels.chunk import (  # noqa: E402
    StateConfig,
    chunk_gated_delta_rule_prefill,
    pick_state_config,
    plan_chunks,
)

DEVICE = "cuda"
SHAPES = [(16, 16, 128, 128), (16, 32, 128, 128), (6, 6, 256, 512)]  # (H, HV, K, V)
LAYOUTS = [("T=2048", [2048]), ("T=8192", [8192]), ("T=65536", [65536]), ("16x4096", [4096] * 16)]


def make_inputs(lengths, H, HV, K, V, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    T, N = sum(lengths), len(lengths)
    dev = DEVICE
    q = torch.randn(T, H, K, device=dev, dtype=dtype)
    k = torch.randn(T, H, K, device=dev, dtype=dtype)
    v = torch.randn(T, HV, V, device=dev, dtype=dtype)
    a, b = torch.randn(T, HV, device=dev), torch.randn(T, HV, device=dev)
    A_log = torch.rand(HV, device=dev) * 2 - 1
    dt_bias = torch.randn(HV, device=dev) * 0.5
    g, beta = reference.gdn_gates(a, b, A_log, dt_bias)
    beta = beta.to(dtype)
    cu = torch.tensor([0] + lengths, device=dev).cumsum(0)
    h0 = torch.randn(N, HV, K, V, device=dev)  # [N, HV, K, V] fp32
    return q, k, v, g, beta, cu, h0


def make_pool(h0):
    """A pool holding h0 with the slots in reverse order, (pool, slots, has_initial_state)."""
    N = h0.shape[0]
    slots = torch.arange(N - 1, -1, -1, device=h0.device)
    pool = torch.empty_like(h0)
    pool[slots] = h0
    return pool, slots, torch.ones(N, dtype=torch.bool, device=h0.device)


def run_ours(q, k, v, g, beta, cu, h0, config=None):
    """Returns (o, final states)."""
    pool, slots, has = make_pool(h0)
    o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, pool, slots, has, config=config)
    return o, pool[slots]


def fla_fn():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def run(q, k, v, g, beta, cu, h0):
        varlen = cu.numel() > 2
        o, ht = chunk_gated_delta_rule(
            q[None], k[None], v[None], g[None], beta[None],
            initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
            cu_seqlens=cu if varlen else None,
        )
        return o[0], ht

    return run


def rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check(fla, only_k=0):
    """Both kernels vs the fp32 reference on real sizes; returns rows of errors."""
    rows = []
    cases = [
        ("recurrent ref, H16 HV32 K128 V128, lens 1,63,64,65,200,777", (16, 32, 128, 128),
         [1, 63, 64, 65, 200, 777], reference.recurrent_gated_delta_rule),
        ("chunk ref, H16 HV16 K128 V128, 4 x 2048 + 1000", (16, 16, 128, 128),
         [2048] * 4 + [1000], reference.chunk_gated_delta_rule),
        ("chunk ref, H6 HV6 K256 V512, 3000 + 1029", (6, 6, 256, 512), [3000, 1029],
         reference.chunk_gated_delta_rule),
    ]
    for name, (H, HV, K, V), lengths, ref_fn in cases:
        if only_k not in (0, K):
            continue
        q, k, v, g, beta, cu, h0 = make_inputs(lengths, H, HV, K, V, seed=1)
        o_ref, s_ref = ref_fn(q, k, v.float(), g, beta.float(), initial_state=h0, cu_seqlens=cu)
        o, s = run_ours(q, k, v, g, beta, cu, h0)
        row = {"case": name, "ours_o": rel(o, o_ref), "ours_state": rel(s, s_ref)}
        if fla is not None:
            o_f, s_f = fla(q, k, v, g, beta, cu, h0)
            row.update(fla_o=rel(o_f, o_ref), fla_state=rel(s_f, s_ref))
        assert torch.isfinite(o.float()).all()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def bench_graph(fn):
    """Median ms of a CUDA graph replay of fn; None if fn cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except Exception as e:  # capture refused (host sync inside)
        print(f"  graph capture failed: {type(e).__name__}: {str(e)[:100]}")
        torch.cuda.synchronize()
        return None


def profile(fn, label):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    times = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.device_time_total
    print(f"  profile {label}: " + ", ".join(f"{n[:40]} {t:.0f}us" for n, t in
                                              sorted(times.items(), key=lambda x: -x[1])[:8]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="T=8192 and 16x4096 only")
    ap.add_argument("--shape", type=int, default=-1, help="only SHAPES[i]")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    print(f"card: {name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    try:
        fla = fla_fn()
    except ImportError as e:
        print(f"fla-core not importable ({e}); timing ours alone")
        fla = None

    result = {"card": name, "date": time.strftime("%Y-%m-%d"), "rows": []}
    with torch.inference_mode():
        result["check"] = [] if args.no_check else check(fla)
        layouts = [x for x in LAYOUTS if not args.quick or x[0] in ("T=8192", "16x4096")]
        shapes = [x for i, x in enumerate(SHAPES) if args.shape in (-1, i)]
        for (H, HV, K, V), (lname, lengths) in itertools.product(shapes, layouts):
            q, k, v, g, beta, cu, h0 = make_inputs(lengths, H, HV, K, V)
            T = q.shape[0]
            cfg = pick_state_config(len(lengths), HV, K, V)
            pool, slots, has = make_pool(h0)
            plan = plan_chunks(cu, T)

            def ours(c, p=plan):  # in place on the pool, as the engine calls it
                return chunk_gated_delta_rule_prefill(
                    q, k, v, g, beta, cu, pool, slots, has, config=c, plan=p)

            t_ours = bench(lambda: ours(cfg))
            row = {"H": H, "HV": HV, "K": K, "V": V, "layout": lname, "T": T,
                   "ours_ms": t_ours, "ours_cfg": str(cfg),
                   "ours_plan_per_call_ms": bench(lambda: ours(cfg, None)),
                   "ours_graph_ms": bench_graph(lambda: ours(cfg))}
            if fla is not None:
                t_fla = bench(lambda: fla(q, k, v, g, beta, cu, h0))
                row.update(fla_ms=t_fla, ratio=t_fla / t_ours,
                           fla_graph_ms=bench_graph(lambda: fla(q, k, v, g, beta, cu, h0)))
            if args.sweep and lname in ("T=8192", "16x4096"):
                best = (t_ours, str(cfg))
                grid = [(bv, nw, 2) for bv in (16, 32, 64) for nw in (4, 8)] if K <= 128 else \
                    [(64, 8, 1), (32, 8, 1), (64, 4, 1)]
                for bv, nw, ns in grid:
                    c = StateConfig(bv, nw, ns)
                    try:
                        t = bench(lambda: ours(c))
                    except Exception as e:  # out of shared memory / registers
                        print(f"  {c}: {type(e).__name__}")
                        continue
                    best = min(best, (t, str(c)))
                row.update(best_ms=best[0], best_cfg=best[1])
            msg = (f"H{H} HV{HV} K{K} V{V} {lname:8s} ours {T / t_ours / 1e3:7.2f} Mtok/s"
                   f" ({t_ours:.3f} ms)")
            if fla is not None:
                msg += f"  fla {T / row['fla_ms'] / 1e3:7.2f} Mtok/s  ours/fla {row['ratio']:.2f}x"
            gr = [row.get("ours_graph_ms"), row.get("fla_graph_ms")]
            msg += "  graph ours/fla " + " / ".join(f"{x:.3f}" if x else "-" for x in gr) + " ms"
            msg += f"  plan-per-call {row['ours_plan_per_call_ms']:.3f} ms"
            if "best_ms" in row:
                msg += f"  best {T / row['best_ms'] / 1e3:.2f} Mtok/s {row['best_cfg']}"
            print(msg, flush=True)
            result["rows"].append(row)
            if args.profile and lname in ("T=8192", "16x4096"):
                profile(lambda: ours(cfg), "ours")
                if fla is not None:
                    profile(lambda: fla(q, k, v, g, beta, cu, h0), "fla")
            del q, k, v, g, beta, cu, h0, pool
            if DEVICE == "cuda":
                torch.cuda.empty_cache()

    def mtok(r, key):
        return f"{r['T'] / r[key] / 1e3:.2f}" if r.get(key) else "-"

    print("\n| shape | layout | ours Mtok/s | fla Mtok/s | ours/fla | ours graph | fla graph |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        print(f"| H{r['H']} HV{r['HV']} K{r['K']} V{r['V']} | {r['layout']} | {mtok(r, 'ours_ms')} | "
              f"{mtok(r, 'fla_ms')} | {ratio} | {mtok(r, 'ours_graph_ms')} | {mtok(r, 'fla_graph_ms')} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"prefill_{args.shape}{'_sweep' if args.sweep else ''}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
