"""Architecture registry: config.json `model_type` -> the family module that reads it.

A family module provides MODEL_TYPES, parse_config(raw) -> ModelConfig, rename(stored_name) ->
name | None, and load_weights(config, reader) -> canonical tensors for engine/models/hybrid.py.
"""

from types import ModuleType

from engine.errors import ModelLoadError
from engine.models import gated_deltanet, qwen3_5, qwen3_next

_FAMILIES: tuple[ModuleType, ...] = (gated_deltanet, qwen3_5, qwen3_next)
FAMILIES: dict[str, ModuleType] = {t: fam for fam in _FAMILIES for t in fam.MODEL_TYPES}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str | None) -> ModuleType:
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    return FAMILIES[model_type]
