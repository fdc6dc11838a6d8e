"""The default-model pipeline on CPU: data split, tokenizer, the three models' training, export to
the fla format, and the agreement of the exported folders with the training model under
deltaserve's own loader (the check that training and serving compute the same thing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.default_model import card, data, evaluate, models, train
from engine.default_model.export import export_folder
from engine.default_model.tokenizer import encode_documents, save_tokenizer, train_tokenizer
from engine.loader import load_model
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.load_corpus()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each architecture trained for 20 tiny steps by the real CLI path, exported and evaluated."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for arch in models.ARCHS:
        out[arch] = root / arch
        train.main(["--arch", arch, "--out", str(out[arch]), "--steps", "20", "--batch-tokens", "512",
                    "--seq-len", "64", "--warmup", "5", "--log-every", "1", "--eval-every", "20", "--tiny"])
    return out


def test_split_is_deterministic_and_held_out_files_never_reach_train(corpus):
    again = data.load_corpus()
    assert again.fingerprint() == corpus.fingerprint()
    assert list(corpus.train) == sorted(corpus.train)
    assert set(corpus.held_out) == set(data.HELD_OUT) and set(data.QUICK_HELD_OUT) <= set(data.HELD_OUT)
    assert not set(corpus.train) & set(corpus.held_out)
    held_texts = set(corpus.held_out.values())
    assert not any(text in held_texts for text in corpus.train.values())
    assert len(set(corpus.train.values())) == len(corpus.train)  # deduplicated
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for path in corpus.train
                   for part in path.split("/"))
    counts = corpus.byte_counts()
    assert counts["train_bytes"] > 20 * counts["held_out_bytes"] > 0


def test_tokenizer_round_trips_stdlib_text_exactly_and_is_deterministic(corpus, tmp_path):
    texts = corpus.train_texts()[:40]
    tok = train_tokenizer(texts, vocab_size=512)
    assert tok.to_str() == train_tokenizer(texts, vocab_size=512).to_str()
    samples = corpus.held_out_texts() + texts[:5] + ["naïve café — ∑ 😀\ttabs\r\nand  spaces  "]
    for text, ids in zip(samples, encode_documents(tok, samples)):
        assert tok.decode(ids, skip_special_tokens=False) == text

    save_tokenizer(tok, tmp_path)
    served = Tokenizer.from_dir(tmp_path)
    assert served.encode("<|endoftext|>") == [0] and {0, 2} == set(served.eos_token_ids)
    chat = served.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_shipped_sizes_share_width_and_parameter_budget():
    specs = {arch: models.default_spec(arch) for arch in models.ARCHS}
    params = {arch: models.count_parameters(spec) for arch, spec in specs.items()}
    assert len({spec.hidden_size for spec in specs.values()}) == 1
    assert max(params.values()) <= 1.05 * params["gdn"] and min(params.values()) >= 0.95 * params["gdn"]
    assert 2 * params["gdn"] <= 25_000_000  # bf16 safetensors of the shipped model


def test_gradients_reach_every_parameter_through_the_reference_delta_rule():
    model = models.build_model(models.tiny_spec("hybrid", 300), seed=0)
    ids = torch.randint(0, 300, (2, 70))  # more than one 64-token chunk
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", models.ARCHS)
def test_each_model_trains_and_its_loss_goes_down(runs, arch):
    log = [json.loads(line) for line in (runs[arch] / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    info = json.loads((runs[arch] / "train_info.json").read_text())
    assert info["steps_done"] == 20 and info["tokens_seen"] == 20 * 512


@pytest.mark.parametrize("arch", models.ARCHS)
def test_exported_folder_gives_the_training_models_logits_in_deltaserve(runs, arch):
    info = json.loads((runs[arch] / "train_info.json").read_text())
    spec = models.ModelSpec(**{**info["spec"], "attn_layers": tuple(info["spec"]["attn_layers"])})
    trained = models.CausalLM(spec).eval()
    weights = load_file(str(runs[arch] / "model.safetensors"))
    trained.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    ids = torch.randint(0, spec.vocab_size, (100,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(ids[None])[0]

    loaded = load_model(runs[arch], device="cpu", dtype="float32")
    state = loaded.model.new_state()
    got = torch.cat([loaded.model.logits(loaded.model.run(ids[:70], state)),  # prefill in two chunks
                     loaded.model.logits(loaded.model.run(ids[70:], state))])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_evaluate_gives_finite_bits_per_byte_lower_after_training(runs, tmp_path):
    info = json.loads((runs["gdn"] / "train_info.json").read_text())
    spec = models.ModelSpec(**{**info["spec"], "attn_layers": ()})
    from tokenizers import Tokenizer as Backend
    untrained = export_folder(models.build_model(spec, seed=0), Backend.from_file(str(runs["gdn"] / "tokenizer.json")),
                              tmp_path / "untrained")
    files = data.QUICK_HELD_OUT[:2]
    with torch.inference_mode():
        before = evaluate.evaluate_folder(untrained, files).bits_per_byte
        after = evaluate.evaluate_folder(runs["gdn"], files).bits_per_byte
    assert math.isfinite(after) and 0 < after < before - 0.2
    recorded = json.loads((runs["gdn"] / "eval.json").read_text())
    assert recorded["bits_per_byte"] == pytest.approx(after, rel=1e-5)  # train.py records this same figure


def test_sliding_window_scoring_charges_every_token_once():
    class Uniform(torch.nn.Module):  # p = 1/8 for every token: 3 bits each, whatever the context
        device = torch.device("cpu")

        def new_state(self):
            return None

        def run(self, ids, state):
            return torch.zeros(ids.shape[0], 1)

        def logits(self, hidden):
            return torch.zeros(hidden.shape[0], 8)

    ids = list(range(8)) * 5  # 40 tokens: 39 charged
    for window in (None, 4, 7, 64):
        assert evaluate.score_document(Uniform(), ids, window) == pytest.approx(39 * 3)


def test_model_card_reports_every_run(runs, tmp_path):
    text = card.render_card(runs["gdn"], list(runs.values()), cpu_decode="42 tokens/s")
    for arch in models.ARCHS:
        figure = json.loads((runs[arch] / "eval.json").read_text())["bits_per_byte"]
        assert f"{figure:.4f}" in text
    assert "Python Software Foundation License" in text and "42 tokens/s" in text
