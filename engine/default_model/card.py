"""MODEL_CARD.md from the three training runs' folders (train_info.json, eval.json, samples.json).

    python -m engine.default_model.card --gdn runs/gdn --llama runs/llama --hybrid runs/hybrid \
        --cpu-decode "NN tokens/s (deltaserve generate, 2 cores)" --out runs/gdn/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.default_model.data import HELD_OUT

NAMES = {"gdn": "Gated DeltaNet", "llama": "Llama-style transformer", "hybrid": "GDN-H1 (GDN + sliding-window attention)"}


def _read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def render_card(runs: dict[str, Path], cpu_decode: str | None = None) -> str:
    """The card of the first run (the shipped model), with the comparison of all runs."""
    infos = {arch: _read(folder, "train_info.json") for arch, folder in runs.items()}
    evals = {arch: _read(folder, "eval.json") for arch, folder in runs.items()}
    shipped = next(iter(runs))
    info, cfg, data = infos[shipped], infos[shipped]["config"], infos[shipped]["data"]
    size_mb = (runs[shipped] / "model.safetensors").stat().st_size / 1e6
    tokenizers = {i["tokenizer_sha256"] for i in infos.values()}
    lines = [
        f"# deltaserve default model: a {info['parameters'] / 1e6:.1f}M-parameter {NAMES[shipped]}",
        "",
        "Trained by `engine/default_model/train.py` in this repository on the Python standard library; "
        "it completes Python code. It is small: expect plausible-looking, often wrong code.",
        "",
        "## Data",
        f"- The `*.py` files of the CPython {info['python']} standard library (`{data['stdlib']}`), "
        "without test suites, site-packages and generated files, deduplicated by content "
        "(`engine/default_model/data.py`). Licence: Python Software Foundation License; the text is "
        "© the Python Software Foundation and contributors.",
        f"- Train: {data['train_files']} files, {data['train_bytes']:,} bytes, {data['train_tokens']:,} tokens. "
        f"Held out: {data['held_out_files']} files, {data['held_out_bytes']:,} bytes "
        f"(listed in `data.HELD_OUT`). Data fingerprint `{data['fingerprint'][:16]}`.",
        f"- Tokenizer: byte-level BPE, {info['spec']['vocab_size']} entries, trained on the train split"
        + ("" if len(tokenizers) == 1 else " (WARNING: the runs' tokenizers differ)") + ".",
        "",
        "## Model and training",
        f"- {NAMES[shipped]}, fla `gated_deltanet` format, {info['spec']['num_layers']} layers, hidden "
        f"{info['spec']['hidden_size']}, {info['parameters']:,} parameters (tied embeddings), "
        f"bf16 weights {size_mb:.1f} MB.",
        f"- {info['steps_done']} steps of {cfg['batch_tokens']:,} tokens (sequences of {cfg['seq_len']}), "
        f"{info['tokens_seen']:,} tokens seen; AdamW, peak lr {cfg['lr']}, warmup {cfg['warmup']}, cosine, "
        f"weight decay {cfg['weight_decay']}, seed {cfg['seed']}; {info['train_seconds']:.0f} s on "
        f"{info['device']} (torch {info['torch']}).",
        f"- Command: `python -m engine.default_model.train --arch {shipped} --out DIR --steps {cfg['steps']} "
        f"--batch-tokens {cfg['batch_tokens']} --lr {cfg['lr']} --seed {cfg['seed']} --device {cfg['device']}`.",
    ]
    if cpu_decode:
        lines.append(f"- CPU decode: {cpu_decode}.")
    lines += [
        "",
        "## Held-out bits per byte (lower is better)",
        "",
        "Same data, tokenizer and token budget; parameters within 5%. Evaluated by "
        "`engine/default_model/evaluate.py` in float32 with deltaserve's loader.",
        "",
        "| model | parameters | layers | tokens seen | train time | held-out bits/byte | context |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in runs:
        i, e = infos[arch], evals[arch]
        lines.append(f"| {NAMES[arch]} | {i['parameters']:,} | {i['spec']['num_layers']} | {i['tokens_seen']:,} | "
                     f"{i['train_seconds']:.0f} s | {e['bits_per_byte']:.4f} | {e['context']} |")
    lines += ["", f"Held-out files ({len(HELD_OUT)}): " + ", ".join(f"`{p}`" for p in HELD_OUT) + ".", "",
              "## Sample completions (greedy, 64 tokens)", ""]
    for sample in _read(runs[shipped], "samples.json"):
        lines += ["```python", sample["prompt"] + sample["completion"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Write MODEL_CARD.md from training runs.")
    for arch in NAMES:
        p.add_argument(f"--{arch}", type=Path, help=f"the {arch} run folder")
    p.add_argument("--cpu-decode", help="measured CPU decode speed, as text")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    runs = {arch: getattr(a, arch) for arch in NAMES if getattr(a, arch) is not None}
    a.out.write_text(render_card(runs, a.cpu_decode))


if __name__ == "__main__":
    main()
