"""Engine throughput vs transformers `generate` (with fla-core installed) on the same random-weight
0.65B Qwen3.5-shaped model as ../shared/anchors, in one run on one GPU, plus the memory roofline.

    python bench/engine.py [--batches 1,32,128,512] [--hf-batches 1,32,128] [--new 128] [--prompt 512]

Prints one JSON line per measurement (and appends them to $OUT/engine.jsonl when OUT is set).
Output tokens/s counts generated tokens over the whole request time (prefill included), as the
anchor's HF figures do; decode tokens/s and the roofline share are over the decode-only steps.
The roofline step is the bytes a decode step must move over the measured copy bandwidth: the weights
once, each sequence's recurrent state read and written, and the attention layers' keys and values up
to each sequence's position (full attention, as in the bench model); `roofline_pct_without_kv` leaves
the keys and values out (the figure sessions 2-5 reported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engine.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.models import gdn_backend  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.slots import SlotPool, resolve_state_dtype  # noqa: E402
from kernels import decode_gemv, decode_linear, pdl  # noqa: E402

SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
             num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
             linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
             full_attention_interval=4, tie_word_embeddings=True)


def report(**fields) -> None:
    line = json.dumps(fields)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "engine.jsonl", "a") as f:
            f.write(line + "\n")


def copy_bandwidth() -> float:
    x = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 20 / (time.perf_counter() - start)


def build_model(folder: Path):
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM
    from tiny_tokenizer import write_tiny_tokenizer

    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**SHAPE)).to("cuda", torch.bfloat16).eval()
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return model


def run_ours(loaded, batch: int, prompt_len: int, new: int, copy_bw: float, state_dtype: str) -> None:
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(8192, batch),
                                            max_model_len=prompt_len + new, state_dtype=state_dtype))
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (prompt_len,), generator=gen).tolist() for _ in range(batch)]

    def one_pass(tokens: int) -> tuple[float, float, int, int]:
        """(whole time, decode-only time, decode-only steps, attention positions those steps read)."""
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=tokens, ignore_eos=True))
        torch.cuda.synchronize()
        start = time.perf_counter()
        decode_start, decode_steps, entered = None, 0, []
        while engine.has_work():
            prefilling = any(r.prefilling for r in engine.scheduler.running) or engine.scheduler.waiting
            if not prefilling and decode_start is None:
                torch.cuda.synchronize()
                entered = [(s, s.num_computed) for r in engine.scheduler.running for s in r.sequences]
                decode_start = time.perf_counter()
            engine.step()
            decode_steps += decode_start is not None
        torch.cuda.synchronize()
        end = time.perf_counter()
        # A token fed at position p attends to positions 0..p: the KV a step must read grows with context.
        positions_read = sum((s.num_computed * (s.num_computed + 1) - n * (n + 1)) // 2 for s, n in entered)
        return end - start, end - (decode_start or end), decode_steps, positions_read

    one_pass(4)  # warm-up: Triton compiles, allocator settles
    # The first full pass meets batch shapes the short warm-up did not (decodes of up to B - 1
    # sequences mixed into prefill steps): its time, kept apart, shows what first use costs.
    first_total, _, _, _ = one_pass(params.max_tokens)
    total, decode, steps, positions_read = one_pass(params.max_tokens)
    pool = engine.pool
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    state = pool.bytes_per_slot()  # upper bound: attention buffers are read only up to the length
    gdn_state = sum(t[0].numel() * t.element_size() for t in pool.recurrent if t is not None)
    kv_per_position = sum(t[0, 0].numel() * t.element_size() for t in pool.keys + pool.values if t is not None)
    # The bytes a decode step cannot avoid: the weights once, every recurrent state read and written, and
    # the attention layers' keys and values up to each sequence's position (the hybrid's other state).
    weights_and_gdn = weights + batch * 2 * gdn_state
    kv_per_step = positions_read * kv_per_position / max(steps, 1)
    ideal_step = (weights_and_gdn + kv_per_step) / copy_bw
    measured_step = decode / max(steps, 1)
    report(what="deltaserve_engine", B=batch, state=state_dtype, prompt=prompt_len, new=new, s=round(total, 2), s_first=round(first_total, 2),
           out_tok_s=round(batch * new / total, 1), decode_tok_s=round(batch * steps / decode, 1) if decode else None,
           step_ms=round(measured_step * 1e3, 3), roofline_step_ms=round(ideal_step * 1e3, 3),
           roofline_pct=round(100 * ideal_step / measured_step, 1),
           roofline_pct_without_kv=round(100 * weights_and_gdn / copy_bw / measured_step, 1),
           kv_MB_per_step=round(kv_per_step / 1e6, 1), slot_MiB=round(state / 2**20, 2))


def run_hf(model, batch: int, prompt_len: int, new: int) -> None:
    x = torch.randint(0, SHAPE["vocab_size"], (batch, prompt_len), device="cuda")
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
    dt = time.perf_counter() - start
    report(what="hf_generate_fla", B=batch, prompt=prompt_len, new=new, s=round(dt, 2),
           out_tok_s=round(batch * new / dt, 1))


def check_determinism(loaded, prompt_len: int) -> None:
    """Greedy tokens of the eager engine run twice, with decode CUDA graphs, and with graphs plus
    overlapped decode steps, each against the first eager run, on this card."""
    variants = {"eager_again": dict(decode_graphs=False), "graphs": dict(decode_graphs=True, overlap_decode=False),
                "graphs_overlap": dict(decode_graphs=True, overlap_decode=True)}
    outputs = {}
    for name, options in [("eager", dict(decode_graphs=False)), *variants.items()]:
        engine = LLMEngine(loaded, EngineConfig(max_num_seqs=8, max_model_len=prompt_len + 32, **options))
        gen = torch.Generator().manual_seed(1)
        for i in range(6):
            prompt = torch.randint(0, SHAPE["vocab_size"], (prompt_len // (i + 1),), generator=gen).tolist()
            engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=32, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(t for c in out.outputs for t in c.token_ids)
        outputs[name] = tokens
    base = outputs["eager"]
    for name in variants:
        same = sum(base[r] == outputs[name][r] for r in base)
        agree = [next((i for i, (a, b) in enumerate(zip(base[r], outputs[name][r])) if a != b), 32)
                 for r in base]  # leading tokens in common, per request
        report(what=f"greedy_{name}_vs_eager", dtype=str(loaded.model.embed.dtype), requests_identical=same,
               of=len(base), leading_tokens_equal=agree)


def capacity(loaded, state_dtypes: list[str]) -> None:
    """Slots the card holds, and one slot's state at 1K vs 32K context."""
    dtype = loaded.model.embed.dtype
    for state_dtype, max_len in [(s, n) for s in state_dtypes for n in (1024, 32768)]:
        pool = SlotPool(loaded.config, 1, torch.device("meta"), dtype, max_len, resolve_state_dtype(state_dtype))
        gdn = sum(t[0].numel() * t.element_size() for t in pool.recurrent + pool.conv if t is not None)
        free, _ = torch.cuda.mem_get_info()
        report(what="slot_capacity", state=state_dtype, max_len=max_len, gdn_state_MiB=round(gdn / 2**20, 2),
               attention_kv_MiB=round((pool.bytes_per_slot() - gdn) / 2**20, 2),
               slots_in_90pct_free=int(free * 0.9) // pool.bytes_per_slot())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="1,32,128,512")
    parser.add_argument("--hf-batches", default="1,32,128")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--check-dtypes", default="bfloat16",
                        help="dtypes in which to compare greedy tokens of eager runs, graphed and overlapped decode "
                             "(e.g. float32,bfloat16)")
    parser.add_argument("--state-dtypes", default="float32",
                        help="recurrent state dtypes to run our batches with (e.g. float32,bfloat16)")
    parser.add_argument("--fold-conv", default="on", choices=["on", "off", "both"],
                        help="decode-only steps with the short conv inside the decode kernel or as its own "
                             "launch (engine/models/gdn_backend.FOLD_CONV); both: our batches once each way")
    parser.add_argument("--decode-linear", default="auto", choices=["auto", "off", "both"],
                        help="decode steps' projections through kernels/decode_linear where its TABLE says it beats "
                             "cuBLAS (auto) or all on cuBLAS (off); both: our batches once each way")
    parser.add_argument("--pdl", default="default", choices=["default", "on", "off", "both"],
                        help="programmatic dependent launch of the decode-step kernels (kernels/pdl.ENABLED); "
                             "both: our batches once each way")
    parser.add_argument("--gemv-max-m", default=str(decode_gemv.GEMV_MAX_M),
                        help="rows up to which decode projections take kernels/decode_gemv (0: never); a comma "
                             "list runs our batches once with each")
    parser.add_argument("--fold-norm", default="on", choices=["on", "off", "both"],
                        help="a decode step's add_rms_norm left to the kernels/decode_gemv projection after it "
                             "(decode_gemv.FOLD_NORM); both: our batches once each way")
    parser.add_argument("--decode-linear-table", metavar="JSON",
                        help="launch shapes for kernels/decode_linear, as bench/decode_linear.py --sweep writes them")
    args = parser.parse_args()
    if args.decode_linear_table:  # measured on this card (bench/decode_linear.py --sweep)
        decode_linear.TABLE = decode_linear.load_table(args.decode_linear_table)
        decode_linear.TABLE_ARCH = torch.cuda.get_device_capability()
    copy_bw = copy_bandwidth()
    report(what="copy", TBps=round(copy_bw / 1e12, 3), gpu=torch.cuda.get_device_name())
    folder = Path(tempfile.mkdtemp())
    hf_model = build_model(folder)
    report(what="model", params_M=round(sum(p.numel() for p in hf_model.parameters()) / 1e6, 1))
    for dtype in [d for d in args.check_dtypes.split(",") if d and d != "bfloat16"]:
        check_determinism(load_model(folder, device="cuda", dtype=dtype), args.prompt)
    loaded = load_model(folder, device="cuda", dtype="bfloat16")
    capacity(loaded, args.state_dtypes.split(","))
    if "bfloat16" in args.check_dtypes.split(","):
        check_determinism(loaded, args.prompt)
    on_off = {"on": [True], "off": [False], "both": [True, False]}
    folds = on_off[args.fold_conv]
    linears = {"auto": ["auto"], "off": ["off"], "both": ["auto", "off"]}[args.decode_linear]
    pdls = {"default": [pdl.ENABLED], "on": [True], "off": [False], "both": [False, True]}[args.pdl]
    gemvs = [int(m) for m in args.gemv_max_m.split(",")]
    norm_folds = on_off[args.fold_norm]
    variants = [(f, m, p, g, n) for f in folds for m in linears for p in pdls for g in gemvs for n in norm_folds]
    for fold, mode, use_pdl, gemv_rows, fold_norm in variants:
        # set before each engine captures its decode graphs (a graph keeps the path taken at capture)
        gdn_backend.FOLD_CONV, decode_linear.MODE, pdl.ENABLED = fold, mode, use_pdl
        decode_gemv.GEMV_MAX_M, decode_gemv.FOLD_NORM = gemv_rows, fold_norm
        if len(variants) > 1:
            report(what="variant", fold_conv=fold, decode_linear=mode, pdl=use_pdl, gemv_max_m=gemv_rows,
                   fold_norm=fold_norm)
        for state_dtype in args.state_dtypes.split(","):
            for b in [int(b) for b in args.batches.split(",") if b]:
                run_ours(loaded, b, args.prompt, args.new, copy_bw, state_dtype)
    for b in [int(b) for b in args.hf_batches.split(",") if b]:
        run_hf(hf_model, b, args.prompt, args.new)


if __name__ == "__main__":
    main()
