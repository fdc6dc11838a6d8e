"""Prefill kernel benchmark: ours (kernels/chunk.py) vs fla-core's chunk_gated_delta_rule, same card,
same inputs, same run. Checks ours (and fla, with --check-fla) against the fp32 reference first,
then checks that every launch is deterministic (each of the three launches, and the whole prefill,
run --det-repeats times on the same inputs and compared bit for bit with the first run: any
difference is reported per shape and makes the process exit with status 1 after the table), then
times with do_bench (median): eagerly and as a CUDA graph replay (GPU time only, the
kernel-to-kernel comparison), and prints Mtok/s and the ratio ours / fla. Writes JSON to
$OUT/prefill_<shape>.json if OUT is set.

    python bench/kernels_prefill.py --shape i [--layouts T=8192,16x4096] [--sweep] [--profile]
        [--no-fla] [--no-check] [--det-repeats 3]

--sass needs no GPU: it compiles the kernels for sm_90 with Triton's bundled ptxas and prints
registers, spill stack and SASS counts (cheap feedback between device calls).
--sweep times ChunkConfig variants (one kernel's launch shape changed at a time) as graph
replays (each variant checked for determinism as above) and keeps the best deterministic one
per kernel; --profile prints per-kernel GPU times of one call of
each, from torch.profiler. Ours is timed as the engine calls it (chunk plan built once per
batch, as fla caches its chunk indices per cu_seqlens). fla's autotuning and compiles take most
of the time of a shape: run one process per shape.
"""

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kernels import reference  # noqa: E402
from kernels.chunk import (  # noqa: E402
    chunk_gated_delta_rule_prefill,
    launch_output,
    launch_state,
    launch_wy,
    pick_config,
    plan_chunks,
)

DEVICE = "cuda"
SHAPES = [(16, 16, 128, 128), (16, 32, 128, 128), (6, 6, 256, 512)]  # (H, HV, K, V)
LAYOUTS = [("T=8192", [8192]), ("16x4096", [4096] * 16), ("T=65536", [65536]), ("T=2048", [2048])]


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


CONFIG_CHANGES = {}  # --config (and --wy-solve): applied to every row's pick_config


def config_for(num_seqs, HV, K, V):
    return replace(pick_config(num_seqs, HV, K, V), **CONFIG_CHANGES)


def run_ours(q, k, v, g, beta, cu, h0, config=None):
    """Returns (o, final states)."""
    pool, slots, has = make_pool(h0)
    config = config or config_for(cu.numel() - 1, v.shape[1], k.shape[2], v.shape[2])
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


def _bits(x):
    return x.contiguous().view(torch.uint8)


def _differ(a, b):
    """Number of elements of a and b whose bits differ (0: identical)."""
    if a.shape != b.shape:
        return a.numel()
    return int((_bits(a).view(a.numel(), -1) != _bits(b).view(b.numel(), -1)).any(-1).sum())


def determinism(q, k, v, g, beta, cu, h0, cfg, plan, repeats=3):
    """Each launch, and the whole prefill, `repeats` times on the same inputs, compared bit for bit
    with the first run. Returns {launch: elements that differed in any repeat (0: deterministic)}.
    The state pass and the prefill run on a fresh copy of the pool each time; h of the unused
    tail chunks is not written by design and is left out."""
    scale = q.shape[2] ** -0.5
    pool, slots, has = make_pool(h0)
    valid = plan.chunk_seq < cu.numel() - 1  # [NC]
    diff = {"wy": 0, "state": 0, "output": 0, "prefill": 0}
    first = launch_wy(k, v, g, beta, plan, cfg)[1:]
    for _ in range(repeats - 1):
        again = launch_wy(k, v, g, beta, plan, cfg)[1:]
        diff["wy"] += sum(_differ(a, b) for a, b in zip(first, again))
    G, rk, w, u = first

    def state():
        p = pool.clone()
        _, h, v_new = launch_state(k, w, u, G, rk, p, slots, has, plan, cfg)
        return h[valid], v_new, p

    s0 = state()
    for _ in range(repeats - 1):
        diff["state"] += sum(_differ(a, b) for a, b in zip(s0, state()))
    _, h_full, v_new = launch_state(k, w, u, G, rk, pool.clone(), slots, has, plan, cfg)
    o0 = launch_output(q, k, G, rk, h_full, v_new, plan, cfg, scale)[1]
    for _ in range(repeats - 1):
        diff["output"] += _differ(o0, launch_output(q, k, G, rk, h_full, v_new, plan, cfg, scale)[1])

    def whole():
        p = pool.clone()
        o = chunk_gated_delta_rule_prefill(q, k, v, g, beta, cu, p, slots, has, config=cfg, plan=plan)
        return o, p

    p0 = whole()
    for _ in range(repeats - 1):
        diff["prefill"] += sum(_differ(a, b) for a, b in zip(p0, whole()))
    return diff


def det_text(diff):
    bad = {k: n for k, n in diff.items() if n}
    return "bitwise identical" if not bad else "NONDETERMINISTIC " + ", ".join(
        f"{k}: {n} elements differ" for k, n in bad.items())


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
        print(json.dumps(row), flush=True)
        assert torch.isfinite(o.float()).all()
        assert row["ours_o"] < 3e-2 and row["ours_state"] < 3e-2, row
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


def sweep_variants(base, K, V):
    """ChunkConfig variants of base, one kernel's launch shape changed at a time."""
    out = []
    for bv, nw, ns, split in [(16, 4, 3, False), (32, 4, 3, False), (32, 4, 2, False),
                              (64, 4, 3, False), (32, 8, 3, False)]:
        out.append(("state", replace(base, state_bv=min(bv, max(16, V)), state_warps=nw,
                                     state_stages=ns, state_split=split)))
    for bk, bv, nw, ns, solve in [(32, 64, 2, 3, "blocks"), (64, 64, 2, 3, "blocks"),
                                  (32, 64, 2, 1, "blocks"), (64, 64, 4, 3, "blocks"),
                                  (32, 64, 4, 3, "blocks"), (32, 64, 2, 3, "together"),
                                  (64, 64, 2, 3, "together"), (64, 64, 4, 3, "together"), (32, 64, 4, 3, "together"),
                                  (64, 64, 8, 3, "together")]:
        out.append(("wy", replace(base, wy_bk=min(bk, K), wy_bv=min(bv, V), wy_warps=nw,
                                  wy_stages=ns, wy_solve=solve)))
    # out_bv = 32 is left out: on Triton 3.6 (H200) it faulted (illegal address) at K = 128, as
    # did V blocks of 64 with K blocks of 128 at 2 stages (K = 256); those run last if at all.
    for bv, bk, nw, ns in [(64, 64, 4, 1), (128, 64, 4, 1), (64, 64, 4, 2), (128, 64, 4, 2),
                           (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2),
                           (128, 128, 8, 2)]:
        out.append(("out", replace(base, out_bv=min(bv, V), out_bk=min(bk, K), out_warps=nw,
                                   out_stages=ns)))
    seen, uniq = {base}, []
    for kind, c in out:
        if c not in seen:
            seen.add(c)
            uniq.append((kind, c))
    return uniq


def run_sweep(ours, base, K, V, det):
    """Graph time and determinism of every variant; returns (best deterministic config, rows)."""
    t_base = bench_graph(lambda: ours(base))
    rows = [("base", str(base), t_base, det_text(det(base)))]
    best = {}
    for kind, c in sweep_variants(base, K, V):
        print(f"  sweep {kind}: {c}", flush=True)  # before the launch: a fault ends the process
        try:
            t = bench_graph(lambda: ours(c))
            d = det_text(det(c))
        except Exception as e:  # out of shared memory / registers
            print(f"    {type(e).__name__} {str(e)[:80]}", flush=True)
            continue
        if t is None:
            continue
        print(f"    {t:.4f} ms (base {t_base:.4f}), {d}", flush=True)
        rows.append((kind, str(c), t, d))
        if d == "bitwise identical" and t < best.get(kind, (t_base, None))[0]:
            best[kind] = (t, c)
    fields = {"state": ("state_bv", "state_warps", "state_stages", "state_split"),
              "out": ("out_bv", "out_bk", "out_warps", "out_stages"),
              "wy": ("wy_bk", "wy_bv", "wy_warps", "wy_stages", "wy_solve")}
    cfg = base
    for kind, (_, c) in best.items():
        cfg = replace(cfg, **{f: getattr(c, f) for f in fields[kind]})
    return cfg, rows


def parse_variants(text):
    """'wy_solve=blocks;wy_warps=4,wy_bk=64' -> [{'wy_solve': 'blocks'}, {'wy_warps': 4, 'wy_bk': 64}]."""
    def value(x):
        return {"True": True, "False": False}.get(x, int(x) if x.lstrip("-").isdigit() else x)
    return [{f: value(x) for f, x in (kv.split("=") for kv in spec.split(","))}
            for spec in text.split(";") if spec]


def time_variants(ours, base, variants, det, run, row, prof=False):
    """Graph time, determinism and difference from base's results (o and final states, from
    the same initial pool: elements whose bits differ, and ||x - base|| / ||base||) of each
    variant of base, appended to row["variants"]; with prof, its per-kernel GPU times too."""
    o_base, s_base = run(base)
    for spec in variants:
        c = replace(base, **spec)
        try:
            t = bench_graph(lambda: ours(c))
            o, s = run(c)
            d = det(c)
        except Exception as e:  # a build that fails (out of resources, compiler error): the next one
            print(f"  variant {spec}: {type(e).__name__} {str(e)[:200]}", flush=True)
            continue
        v = {"variant": spec, "graph_ms": t, "det": det_text(d), "det_diff": sum(d.values()),
             "differs_from_base": _differ(o, o_base) + _differ(s, s_base),
             "rel_o_vs_base": rel(o, o_base), "rel_state_vs_base": rel(s, s_base)}
        if row.get("fla_graph_ms") and t:
            v["graph_ratio"] = row["fla_graph_ms"] / t
        print(f"  variant {spec}: graph {t:.3f} ms (base {row['ours_graph_ms']:.3f})"
              + (f", fla/variant {v['graph_ratio']:.2f}x" if "graph_ratio" in v else "")
              + f", {v['det']}, elements differing from base: {v['differs_from_base']}"
              + f" (rel o {v['rel_o_vs_base']:.1e}, state {v['rel_state_vs_base']:.1e})",
              flush=True)
        if prof:
            profile(lambda: ours(c), f"variant {spec}")
        row.setdefault("variants", []).append(v)


def sass_report(variants=(), shape=-1):
    """Compile the kernels for sm_90 (no GPU needed: Triton's bundled ptxas) at each shape's
    launch shapes, and at each of variants (ChunkConfig changes), and print registers, spill
    stack and SASS counts from cuobjdump."""
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.chunk_output import _output_kernel
    from kernels.chunk_state import _state_kernel
    from kernels.chunk_wy import _wy_kernel

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    ptr = {"cu_seqlens": "*i64", "chunk_start": "*i64", "chunk_seq": "*i32", "slot_ids": "*i64",
           "has_initial_state": "*i1", "N": "i64", "scale": "fp32", "g": "*fp32", "G": "*fp32",
           "rk": "*fp32", "scratch": "*fp32", "state_pool": "*fp32"}

    def build(fn, consts, num_warps, num_stages=2, types=None):
        sig = {n: "constexpr" if n in consts else (types or {}).get(n, ptr.get(n, "*bf16"))
               for n in fn.arg_names}
        # Pointers 16-byte aligned, as torch allocates them and the JIT specialises: without this
        # hint no load is vectorised or pipelined and ptxas reports spills the real kernel lacks.
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        path = f"/tmp/{fn.__name__}.cubin"
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        use = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
        res = [x.split("CONSTANT")[0].strip() for x in use.stdout.splitlines() if "REG:" in x]
        n = sum(1 for x in sass.splitlines() if x.strip().startswith("/*") and ";" in x)
        print(f"  {fn.__name__:15s} {res[0] if res else '?'}  SASS {n}, BAR {sass.count('BAR.SYNC')}"
              f", LDL {sass.count('LDL')}, HGMMA {sass.count('HGMMA')}, HMMA {sass.count('HMMA')}"
              f", cp.async {k.asm['ptx'].count('cp.async.')}", flush=True)

    for (H, HV, K, V), spec in itertools.product(
            [x for i, x in enumerate(SHAPES) if shape in (-1, i)], [{}, *variants]):
        cfg = replace(config_for(1, HV, K, V), **spec)
        print(f"H{H} HV{HV} K{K} V{V}: {cfg}")
        common = dict(H=H, HV=HV, K=K, V=V, F32=False)
        build(_wy_kernel, dict(common, BK=cfg.wy_bk, BV=cfg.wy_bv, USE_L2=True, EPS=1e-6,
                               SOLVE_TOGETHER=cfg.wy_solve == "together"), cfg.wy_warps,
              cfg.wy_stages)
        two_k = cfg.state_split and K >= 32
        bk = max(16, triton.next_power_of_2((K + 1) // 2 if two_k else K))
        tma = cfg.state_tma and K == (2 * bk if two_k else bk) and V % cfg.state_bv == 0
        tiles = {"k_desc": (64, bk), "w_desc": (64, bk), "u_desc": (64, cfg.state_bv),
                 "h_desc": (bk, cfg.state_bv)}
        descs = ({n: f"tensordesc<bf16[{a}, {b}]>" for n, (a, b) in tiles.items()} if tma
                 else None)
        build(_state_kernel, dict(common, BK=bk, TWO_K=two_k, BV=cfg.state_bv, TMA=tma,
                                  **({} if tma else dict.fromkeys(tiles))),
              cfg.state_warps, cfg.state_stages, types=descs)
        build(_output_kernel, dict(common, BK=cfg.out_bk, BV=cfg.out_bv, USE_L2=True, EPS=1e-6),
              cfg.out_warps, cfg.out_stages)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--layouts", default="", help="comma-separated layout names (default all)")
    ap.add_argument("--shape", type=int, default=-1, help="only SHAPES[i]")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--det-repeats", type=int, default=3,
                    help="runs of each launch compared bit for bit (the first with each other one)")
    ap.add_argument("--check-fla", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--wy-solve", default="", help="override ChunkConfig.wy_solve everywhere")
    ap.add_argument("--config", default="",
                    help="ChunkConfig changes for every row, the accuracy check and --sass, e.g. "
                         "'wy_solve=blocks,wy_warps=4' (the base that --variants compare to)")
    ap.add_argument("--variants", default="",
                    help="also time these ChunkConfig changes per row, e.g. "
                         "'wy_warps=4,wy_bk=64;state_bv=32' (graph time, determinism, and "
                         "how many output and state elements differ from the row's config)")
    ap.add_argument("--sass", action="store_true",
                    help="no GPU: compile for sm_90 and print registers / spills / SASS counts")
    ap.add_argument("--warmup-only", action="store_true",
                    help="compile and autotune every kernel of the rows (and --variants), time "
                         "nothing (run the shapes' warm-ups side by side, then the timed runs one at "
                         "a time)")
    args = ap.parse_args()
    CONFIG_CHANGES.update(parse_variants(args.config)[0] if args.config else {})
    if args.wy_solve:
        CONFIG_CHANGES["wy_solve"] = args.wy_solve
    if args.sass:
        return sass_report(parse_variants(args.variants), args.shape)
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    print(f"card: {name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    fla = None
    if not args.no_fla:
        try:
            fla = fla_fn()
        except ImportError as e:
            print(f"fla-core not importable ({e}); timing ours alone")

    result = {"card": name, "date": time.strftime("%Y-%m-%d"), "rows": []}
    shapes = [x for i, x in enumerate(SHAPES) if args.shape in (-1, i)]
    wanted = args.layouts.split(",") if args.layouts else [n for n, _ in LAYOUTS]
    layouts = [x for x in LAYOUTS if x[0] in wanted]
    with torch.inference_mode():
        if not args.no_check and not args.warmup_only:
            ks = {K for _, _, K, _ in shapes}
            result["check"] = [r for K in ks for r in
                               check(fla if args.check_fla else None, only_k=K)]
        for (H, HV, K, V), (lname, lengths) in itertools.product(shapes, layouts):
            q, k, v, g, beta, cu, h0 = make_inputs(lengths, H, HV, K, V)
            T = q.shape[0]
            cfg = config_for(len(lengths), HV, K, V)
            pool, slots, has = make_pool(h0)
            plan = plan_chunks(cu, T)

            def ours(c, p=plan):  # in place on the pool, as the engine calls it
                return chunk_gated_delta_rule_prefill(
                    q, k, v, g, beta, cu, pool, slots, has, config=c, plan=p)

            def det(c, p=plan):
                return determinism(q, k, v, g, beta, cu, h0, c, p, args.det_repeats)

            if args.warmup_only:
                ours(cfg)
                for spec in parse_variants(args.variants):  # compile them too (cache on disk)
                    ours(replace(cfg, **spec))
                if args.sweep:  # compile the variants too (process-wide cache on disk)
                    for _, c in sweep_variants(cfg, K, V):
                        ours(c)
                if fla is not None:
                    fla(q, k, v, g, beta, cu, h0)
                torch.cuda.synchronize()
                print(f"warmed H{H} HV{HV} K{K} V{V} {lname}", flush=True)
                continue
            row = {"H": H, "HV": HV, "K": K, "V": V, "layout": lname, "T": T}
            row["det"] = det(cfg)
            print(f"H{H} HV{HV} K{K} V{V} {lname}: determinism over {args.det_repeats} runs: "
                  f"{det_text(row['det'])}", flush=True)
            row.update(ours_cfg=str(cfg), ours_ms=bench(lambda: ours(cfg)),
                       ours_graph_ms=bench_graph(lambda: ours(cfg)))
            if fla is not None:
                row.update(fla_ms=bench(lambda: fla(q, k, v, g, beta, cu, h0)),
                           fla_graph_ms=bench_graph(lambda: fla(q, k, v, g, beta, cu, h0)))
                row["ratio"] = row["fla_ms"] / row["ours_ms"]
                if row["ours_graph_ms"] and row["fla_graph_ms"]:
                    row["graph_ratio"] = row["fla_graph_ms"] / row["ours_graph_ms"]
            gr = [row.get("ours_graph_ms"), row.get("fla_graph_ms")]
            msg = (f"H{H} HV{HV} K{K} V{V} {lname:8s} ours {T / row['ours_ms'] / 1e3:7.2f} Mtok/s"
                   f" ({row['ours_ms']:.3f} ms)  graph ours/fla "
                   + " / ".join(f"{x:.3f}" if x else "-" for x in gr) + " ms")
            if "graph_ratio" in row:
                msg += f"  graph fla/ours {row['graph_ratio']:.2f}x"
            print(msg, flush=True)
            if args.variants:
                time_variants(ours, cfg, parse_variants(args.variants), det,
                              lambda c: run_ours(q, k, v, g, beta, cu, h0, c), row, args.profile)
            result["rows"].append(row)
            if args.profile:
                profile(lambda: ours(cfg), "ours")
                if fla is not None:
                    profile(lambda: fla(q, k, v, g, beta, cu, h0), "fla")
            if args.sweep:  # last: a launch shape that faults ends the process
                best, row["sweep"] = run_sweep(ours, cfg, K, V, det)
                print(f"  best: {best}", flush=True)
            del q, k, v, g, beta, cu, h0, pool
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            if os.environ.get("OUT"):
                with open(os.path.join(os.environ["OUT"], f"prefill_{args.shape}.json"), "w") as f:
                    json.dump(result, f, indent=1)

    for r in result["rows"]:
        for x in r.get("variants", []):
            r["det"][f"variant {x['variant']}"] = x["det_diff"]

    def mtok(r, key):
        return f"{r['T'] / r[key] / 1e3:.2f}" if r.get(key) else "-"

    print("\n| shape | layout | ours eager Mtok/s | fla eager Mtok/s | ours graph Mtok/s "
          "| fla graph Mtok/s | graph ours/fla | determinism |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ratio = f"{r['graph_ratio']:.2f}x" if "graph_ratio" in r else "-"
        print(f"| H{r['H']} HV{r['HV']} K{r['K']} V{r['V']} | {r['layout']} | {mtok(r, 'ours_ms')} | "
              f"{mtok(r, 'fla_ms')} | {mtok(r, 'ours_graph_ms')} | {mtok(r, 'fla_graph_ms')} | {ratio} |"
              f" {det_text(r['det'])} |")
    bad = [r for r in result["rows"] if any(r["det"].values())]
    if bad:
        for r in bad:
            print(f"NONDETERMINISTIC: H{r['H']} HV{r['HV']} K{r['K']} V{r['V']} {r['layout']}: "
                  f"{det_text(r['det'])}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
