"""Loading model folders: the formats users have, and one clear error line for what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.demo import write_gated_deltanet
from engine.errors import ModelLoadError
from engine.loader import load_model
from tiny_checkpoints import save_qwen3_5

TINY = {"model_type": "gated_deltanet", "vocab_size": 280, "hidden_size": 32, "num_hidden_layers": 2,
        "num_heads": 2, "head_dim": 8, "expand_v": 2.0, "hidden_ratio": 2, "tie_word_embeddings": False}


@pytest.fixture
def folder(tmp_path):
    return write_gated_deltanet(tmp_path / "model", TINY, seed=1)


def _logits(loaded, ids=(3, 1, 4, 1, 5, 9, 2, 6)):
    ids = torch.tensor(ids)
    return loaded.model.logits(loaded.model.run(ids, loaded.model.new_state()))


def _load_error(path) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(path, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_folder_is_named(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    assert "config.json" in _load_error(tmp_path)


def test_unknown_model_type_lists_supported(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    message = _load_error(folder)
    assert "'llama'" in message and "gated_deltanet" in message and "qwen3_next" in message


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json" in _load_error(folder)


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "model.safetensors" in _load_error(folder)


def test_missing_weight_is_named(folder):
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.attn.b_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    assert "model.layers.1.attn.b_proj.weight" in _load_error(folder)


def test_misshaped_weight_is_named_with_both_shapes(folder):
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.attn.o_proj.weight"] = torch.randn(32, 17)
    save_file(weights, str(folder / "model.safetensors"))
    message = _load_error(folder)
    assert "model.layers.0.attn.o_proj.weight" in message and "[32, 17]" in message and "[32, 32]" in message


def test_sharded_checkpoint_with_index_loads_the_same(folder, tmp_path):
    whole = _logits(load_model(folder, device="cpu"))
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(_logits(load_model(folder, device="cpu")), whole)


def test_index_naming_a_missing_shard(folder):
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}))
    assert "model-00009-of-00009.safetensors" in _load_error(folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_close_to_fp32(tmp_path, dtype):
    full = _logits(load_model(write_gated_deltanet(tmp_path / "f32", TINY, seed=2), device="cpu"))
    half_folder = write_gated_deltanet(tmp_path / "half", TINY, seed=2, dtype=dtype)
    half = _logits(load_model(half_folder, device="cpu"))  # upcast to fp32 on CPU
    assert (half - full).norm() / full.norm() < 2e-2


def test_multimodal_qwen3_5_folder_serves_its_text_model(tmp_path):
    # Qwen3.5 releases nest the text model under model.language_model. beside vision and MTP weights.
    text = tmp_path / "text"
    save_qwen3_5(text)
    nested = tmp_path / "multimodal"
    shutil.copytree(text, nested)
    weights = load_file(str(text / "model.safetensors"))
    renamed = {n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n: w
               for n, w in weights.items()}
    renamed["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(8, 8)
    renamed["mtp.fc.weight"] = torch.randn(8, 8)
    (nested / "model.safetensors").unlink()
    save_file(renamed, str(nested / "model.safetensors"))
    text_config = json.loads((text / "config.json").read_text())
    (nested / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_5", "text_config": text_config, "vision_config": {"depth": 1}}))
    torch.testing.assert_close(_logits(load_model(nested, device="cpu")), _logits(load_model(text, device="cpu")))


def test_tied_checkpoint_needs_no_lm_head(tmp_path):
    folder = write_gated_deltanet(tmp_path / "tied", {**TINY, "tie_word_embeddings": True}, seed=4)
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    loaded = load_model(folder, device="cpu")
    assert loaded.model.head_weight is loaded.model.embed
