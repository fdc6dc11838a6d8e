"""Train one of the three models on the standard library and export it.

    python -m engine.default_model.train --arch gdn --out runs/gdn --steps 600 --device cuda

Seeded end to end (data order, initialisation); AdamW with linear warmup then cosine decay to a
tenth of the peak, gradient clipping at 1.0, bf16 autocast on CUDA (the delta rule itself runs in
fp32 inside the reference kernel). Batches are `batch_tokens / seq_len` windows at random offsets
of the train stream ([EOS] doc [EOS] doc ...). Writes into --out:
  log.jsonl          one line per logged step (step, loss, lr, tokens, elapsed_s, tokens_per_s)
                     and per evaluation (step, heldout_bpb_windows)
  config.json, model.safetensors, tokenizer files   the fla-format folder engine.loader loads
  train_info.json    the run: arguments, sizes, steps and tokens done, time, card, data fingerprint
  eval.json          held-out bits per byte of the exported folder (evaluate.py, the final figure)
  samples.json       greedy completions of a few prompts by the exported folder
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.default_model import evaluate, samples
from engine.default_model.data import load_corpus
from engine.default_model.export import export_folder
from engine.default_model.models import ARCHS, GDN_KERNELS, CausalLM, build_model, count_parameters, default_spec, tiny_spec
from engine.default_model.tokenizer import VOCAB_SIZE, encode_documents, token_byte_lengths, train_tokenizer
from engine.demo import EOS


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    out: Path
    steps: int
    batch_tokens: int = 65536
    seq_len: int = 1024
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    gdn_kernel: str = "reference"
    eval_every: int = 100
    log_every: int = 10
    max_minutes: float | None = None  # stop early (and still export) past this wall time
    tiny: bool = False  # the test-sized model and tokenizer, few evaluation tokens (CPU smoke runs)
    vocab_size: int = VOCAB_SIZE
    stdlib: Path | None = None  # default: this interpreter's standard library

    @property
    def batch_size(self) -> int:
        return max(1, self.batch_tokens // self.seq_len)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr * min_lr_ratio at `steps`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def token_stream(docs: list[list[int]], eos_id: int) -> torch.Tensor:
    """[EOS] doc [EOS] doc ... [EOS] as one int64 tensor."""
    ids = [eos_id]
    for doc in docs:
        ids += doc + [eos_id]
    return torch.tensor(ids, dtype=torch.int64)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets: [batch, seq_len] from random offsets (drawn on the CPU generator)."""
    offsets = torch.randint(0, stream.shape[0] - seq_len - 1, (batch,), generator=gen)
    idx = offsets[:, None] + torch.arange(seq_len + 1)
    windows = stream[idx.to(stream.device)]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def heldout_windows_bpb(model: CausalLM, stream: torch.Tensor, byte_len: torch.Tensor, config: TrainConfig) -> float:
    """Bits per byte of the held-out stream cut into non-overlapping seq_len windows, each read
    from a fresh state (the cheap during-training figure; evaluate.py gives the final one)."""
    model.eval()
    n = (stream.shape[0] - 1) // config.seq_len
    if config.tiny:
        n = min(n, 2 * config.batch_size)
    windows = stream[: n * config.seq_len + 1]
    inputs = windows[:-1].view(n, config.seq_len)
    targets = windows[1:].view(n, config.seq_len)
    bits = 0.0
    for i in range(0, n, config.batch_size):
        with _autocast(config):
            logits = model(inputs[i:i + config.batch_size])
        bits += F.cross_entropy(logits.float().flatten(0, 1), targets[i:i + config.batch_size].flatten(),
                                reduction="sum").item() / math.log(2)
    model.train()
    return bits / byte_len[targets].sum().item()


def _autocast(config: TrainConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.device.startswith("cuda"))


def _optimizer(model: CausalLM, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (embedding included), none on norms, gate constants and convs."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "conv1d" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "conv1d" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=config.device.startswith("cuda"))


def train(config: TrainConfig) -> dict:
    """Train, export, evaluate; returns train_info (also written to out/train_info.json)."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)

    corpus = load_corpus(config.stdlib)
    train_texts = corpus.train_texts()[:40] if config.tiny else corpus.train_texts()
    tok = train_tokenizer(train_texts, config.vocab_size)
    eos_id = tok.token_to_id(EOS)
    train_stream = token_stream(encode_documents(tok, train_texts), eos_id).to(device)
    heldout_stream = token_stream(encode_documents(tok, corpus.held_out_texts()), eos_id).to(device)
    byte_len = torch.tensor(token_byte_lengths(tok), device=device)

    spec = tiny_spec(config.arch, tok.get_vocab_size()) if config.tiny else default_spec(config.arch, config.seq_len)
    model = build_model(spec, config.seed, config.gdn_kernel).to(device)
    optimizer = _optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    log = (out / "log.jsonl").open("w")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    tokens_per_step = config.batch_size * config.seq_len
    step, loss_value, stopped_early = 0, float("nan"), False
    train_start = time.perf_counter()
    for step in range(1, config.steps + 1):
        lr = lr_at(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(train_stream, config.batch_size, config.seq_len, gen)
        with _autocast(config):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        elapsed = time.perf_counter() - train_start
        if step % config.log_every == 0 or step == 1 or step == config.steps:
            loss_value = loss.item()
            write({"step": step, "loss": loss_value, "lr": lr, "tokens": step * tokens_per_step,
                   "elapsed_s": round(elapsed, 2), "tokens_per_s": round(step * tokens_per_step / elapsed)})
        if step % config.eval_every == 0 or step == config.steps:
            write({"step": step, "heldout_bpb_windows": heldout_windows_bpb(model, heldout_stream, byte_len, config),
                   "elapsed_s": round(time.perf_counter() - train_start, 2)})
        if config.max_minutes is not None and elapsed > 60 * config.max_minutes:
            stopped_early = step < config.steps
            write({"step": step, "stopped_early": True, "elapsed_s": round(elapsed, 2)})
            break
    train_seconds = time.perf_counter() - train_start
    log.close()

    export_folder(model, tok, out)
    info = {
        "arch": config.arch, "spec": dataclasses.asdict(spec), "parameters": count_parameters(spec),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "steps_done": step, "stopped_early": stopped_early, "tokens_seen": step * tokens_per_step,
        "final_train_loss": loss_value, "train_seconds": round(train_seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "data": {**corpus.byte_counts(), "train_tokens": int(train_stream.shape[0]),
                 "fingerprint": corpus.fingerprint(), "stdlib": str(corpus.root)},
        "tokenizer_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
    }
    with torch.inference_mode():
        result = evaluate.evaluate_folder(out, device=config.device, stdlib=config.stdlib,
                                          paths=evaluate.QUICK_HELD_OUT[:2] if config.tiny else evaluate.HELD_OUT)
        (out / "eval.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        (out / "samples.json").write_text(json.dumps(samples.greedy_samples(out, config.device, max_tokens=8 if config.tiny else 64), indent=1) + "\n")
    info["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig(arch="gdn", out=Path("."), steps=0)
    p = argparse.ArgumentParser(description="Train a default-model candidate on the Python standard library.")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True, type=Path, help="output folder (the exported model and logs)")
    p.add_argument("--steps", required=True, type=int)
    p.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens, help="tokens per optimizer step")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="cuda or cpu")
    p.add_argument("--gdn-kernel", default=defaults.gdn_kernel, choices=GDN_KERNELS,
                   help="delta rule for training: the PyTorch reference, or fla-core's Triton kernel if installed")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--max-minutes", type=float, default=None, help="stop training past this, then export")
    p.add_argument("--tiny", action="store_true", help="test-sized model and tokenizer (CPU smoke run)")
    p.add_argument("--stdlib", type=Path, default=None, help="standard library folder (default: this Python's)")
    a = p.parse_args(argv)
    return TrainConfig(arch=a.arch, out=a.out, steps=a.steps, batch_tokens=a.batch_tokens, seq_len=a.seq_len,
                       lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay, seed=a.seed, device=a.device,
                       gdn_kernel=a.gdn_kernel, eval_every=a.eval_every, log_every=a.log_every,
                       max_minutes=a.max_minutes, tiny=a.tiny, vocab_size=512 if a.tiny else VOCAB_SIZE,
                       stdlib=a.stdlib)


def main(argv: list[str] | None = None) -> None:
    info = train(parse_args(argv))
    print(json.dumps({k: info[k] for k in ("arch", "parameters", "steps_done", "tokens_seen", "train_seconds")}))


if __name__ == "__main__":
    main()
