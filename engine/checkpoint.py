"""Reading tensors out of a Hugging Face safetensors folder: one file, an index of shards, or a
plain set of shards. Tensors are read lazily, one at a time, so a family map can take exactly what
it needs, and whatever it did not take is reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelLoadError(f"cannot read {index}: {err!r}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names shard(s) missing from {model_dir}: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    return files


class CheckpointReader:
    """Name -> tensor over all shards. `rename` maps stored names to the family's names (None drops
    a tensor the server never uses, such as vision towers or multi-token-prediction heads)."""

    def __init__(self, model_dir: Path, rename: Callable[[str], str | None] = lambda name: name):
        self.model_dir = model_dir
        self._where: dict[str, tuple[Path, str]] = {}
        self._handles = {}
        for path in _shard_files(model_dir):
            try:
                handle = safe_open(str(path), framework="pt")
                stored = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types for damaged files
                raise ModelLoadError(f"cannot read {path}: {err} (truncated or not a safetensors file?)") from None
            self._handles[path] = handle
            for name in stored:
                new = rename(name)
                if new is not None:
                    self._where[new] = (path, name)
        self.unused = set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor called `name`, checked against the shape the config implies."""
        if name not in self._where:
            raise ModelLoadError(f"weight {name!r} is missing from {self.model_dir}")
        path, stored = self._where[name]
        try:
            tensor = self._handles[path].get_tensor(stored)
        except Exception as err:
            raise ModelLoadError(f"cannot read weight {stored!r} from {path}: {err}") from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ModelLoadError(
                f"weight {stored!r} has shape {list(tensor.shape)} but the config implies {list(shape)}")
        self.unused.discard(name)
        return tensor
