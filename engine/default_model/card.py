"""MODEL_CARD.md for the shipped model, with the comparison of every training run made for it.

    python -m engine.default_model.card --shipped runs/gdn-250 --runs runs/*-150 runs/*-250 runs/*-400 \
        --cpu-decode "130 tokens/s (deltaserve generate, 2 cores)" --quick-eval quick_eval.json \
        --out runs/gdn-250/MODEL_CARD.md

Each run folder holds train_info.json, eval.json and samples.json (train.py writes them); the
comparison table has one row per token budget and one column per architecture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.default_model.data import HELD_OUT, QUICK_HELD_OUT

NAMES = {"gdn": "Gated DeltaNet", "llama": "Llama-style transformer", "hybrid": "GDN-H1 (GDN + sliding-window attention)"}


def _read(folder: Path, name: str):
    return json.loads((Path(folder) / name).read_text())


def training_command(info: dict) -> str:
    """The exact command that made a run (every option train.py was given)."""
    cfg = info["config"]
    return (f"python -m engine.default_model.train --arch {cfg['arch']} --out DIR --steps {cfg['steps']} "
            f"--batch-tokens {cfg['batch_tokens']} --seq-len {cfg['seq_len']} --lr {cfg['lr']} "
            f"--warmup {cfg['warmup']} --weight-decay {cfg['weight_decay']} --seed {cfg['seed']} "
            f"--eval-every {cfg['eval_every']} --device {cfg['device']}")


def comparison_table(runs: list[Path]) -> list[str]:
    """Held-out bits per byte: a row per token budget, a column per architecture."""
    cells: dict[int, dict[str, str]] = {}
    params: dict[str, int] = {}
    for folder in runs:
        info, result = _read(folder, "train_info.json"), _read(folder, "eval.json")
        params[info["arch"]] = info["parameters"]
        cells.setdefault(info["tokens_seen"], {})[info["arch"]] = f"{result['bits_per_byte']:.4f}"
    archs = [a for a in NAMES if a in params]
    lines = ["| tokens seen | " + " | ".join(f"{NAMES[a]} ({params[a] / 1e6:.2f}M)" for a in archs) + " |",
             "|---|" + "---|" * len(archs)]
    for tokens in sorted(cells):
        lines.append(f"| {tokens / 1e6:.1f}M | " + " | ".join(cells[tokens].get(a, "-") for a in archs) + " |")
    return lines


def render_card(shipped: Path, runs: list[Path], cpu_decode: str | None = None, quick_eval: dict | None = None) -> str:
    info, result = _read(shipped, "train_info.json"), _read(shipped, "eval.json")
    cfg, data, spec = info["config"], info["data"], info["spec"]
    size_mb = (Path(shipped) / "model.safetensors").stat().st_size / 1e6
    tokenizers = {_read(f, "train_info.json")["tokenizer_sha256"] for f in runs}
    lines = [
        f"# deltaserve-stdlib: a {info['parameters'] / 1e6:.1f}M-parameter {NAMES[info['arch']]}",
        "",
        "deltaserve's built-in model. Trained by `engine/default_model/train.py` in this repository on the "
        "Python standard library, it completes Python code. It is tiny and saw little data: expect "
        "plausible-looking, often wrong code, and repetition under greedy decoding.",
        "",
        "## Data",
        f"- The `*.py` files of the CPython {info['python']} standard library (`{data['stdlib']}` on the "
        "training machine), without test suites, site-packages and generated files, deduplicated by content "
        "(`engine/default_model/data.py`). Licence: Python Software Foundation License; the text is "
        "© the Python Software Foundation and contributors.",
        f"- Train: {data['train_files']} files, {data['train_bytes']:,} bytes, {data['train_tokens']:,} tokens. "
        f"Held out: {data['held_out_files']} files, {data['held_out_bytes']:,} bytes (`data.HELD_OUT`, listed "
        f"below). Data fingerprint `{data['fingerprint'][:16]}`.",
        f"- Tokenizer: byte-level BPE, {spec['vocab_size']} entries, trained on the train split"
        + ("" if len(tokenizers) == 1 else " (WARNING: the runs' tokenizers differ)") + ".",
        "",
        "## Model and training",
        f"- {NAMES[info['arch']]} in the flash-linear-attention `gated_deltanet` format: {spec['num_layers']} "
        f"layers, hidden {spec['hidden_size']}, {spec['gdn_heads']} heads with K = {spec['gdn_head_dim']}, "
        f"V = {int(spec['gdn_head_dim'] * spec['expand_v'])}, short convolution {spec['conv_size']}, output gate; "
        f"SwiGLU MLP {spec['intermediate_size']}; vocabulary {spec['vocab_size']}, tied embeddings; "
        f"{info['parameters']:,} parameters, bf16 weights {size_mb:.1f} MB.",
        f"- {info['steps_done']} steps of {cfg['batch_tokens']:,} tokens (windows of {cfg['seq_len']}), "
        f"{info['tokens_seen']:,} tokens seen (~{info['tokens_seen'] / data['train_tokens']:.1f} passes over the "
        f"train split); AdamW (0.9, 0.95), peak lr {cfg['lr']}, {cfg['warmup']} warmup steps then cosine to a "
        f"tenth, weight decay {cfg['weight_decay']}, clip 1.0, bf16 autocast with the delta rule in fp32, seed "
        f"{cfg['seed']}; {info['train_seconds']:.0f} s on one {info['device']} (torch {info['torch']}), sharing it "
        "with the other runs below. The loss log is `train_log.jsonl`.",
        f"- Command: `{training_command(info)}`.",
        f"- Held-out bits per byte: **{result['bits_per_byte']:.4f}** on all {len(HELD_OUT)} held-out files, "
        f"each read whole ({result['tokens']:,} tokens, {result['bytes']:,} bytes; `eval.json`).",
    ]
    if quick_eval:
        lines.append(f"- On the {len(QUICK_HELD_OUT)} quick held-out files of CPython {quick_eval['python']}, "
                     f"float32 on CPU: {quick_eval['bits_per_byte']:.4f} bits per byte (`quick_eval.json`; "
                     "the test suite checks the shipped weights against this figure).")
    if cpu_decode:
        lines.append(f"- CPU decode: {cpu_decode}.")
    lines += [
        "",
        "## How it compares (held-out bits per byte, lower is better)",
        "",
        "Three architectures of about the same size, trained with the same data, tokenizer, "
        "hyper-parameters and seed for the same number of tokens, each with its own cosine schedule; "
        "evaluated by `engine/default_model/evaluate.py` in float32 through deltaserve's loader. Gated "
        "DeltaNet and GDN-H1 read each file whole; the transformer (full attention, trained on 1,024 "
        "positions) is scored with sliding windows of 1,024 tokens, so it sees at most that much context.",
        "",
        *comparison_table(runs),
        "",
        "The shipped model is the Gated DeltaNet run with the lowest figure above; it was chosen on these "
        "same held-out files, so its figure is slightly optimistic. This train split is small (about 2.1M "
        "tokens): the longest runs make about 12 passes over it, and there the Gated DeltaNet over-fits (its "
        "training loss keeps falling while its held-out figure rises) while the transformer still improves.",
        "",
        f"Held-out files ({len(HELD_OUT)}): " + ", ".join(f"`{p}`" for p in HELD_OUT) + ".",
        "",
        "## Sample completions (greedy, 64 tokens)",
        "",
    ]
    for sample in _read(shipped, "samples.json"):
        lines += ["```python", sample["prompt"] + sample["completion"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Write MODEL_CARD.md for the shipped model from its training runs.")
    p.add_argument("--shipped", type=Path, required=True, help="the run folder of the model that ships")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="every run folder to compare (shipped included)")
    p.add_argument("--cpu-decode", help="measured CPU decode speed, as text")
    p.add_argument("--quick-eval", type=Path, help="quick_eval.json: the quick held-out figure measured on CPU")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    quick = json.loads(a.quick_eval.read_text()) if a.quick_eval else None
    a.out.write_text(render_card(a.shipped, a.runs, a.cpu_decode, quick))


if __name__ == "__main__":
    main()
