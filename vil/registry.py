"""Model registry: ``create_model`` builds a registered ViL configuration, optionally from a checkpoint."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, dict] = {}


def register_model(name: str, builder: Callable[..., nn.Module], default_config: dict | None = None) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = builder
    _CONFIGS[name] = dict(default_config or {})


def list_models(pattern: str = "*") -> list[str]:
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def model_config(name: str) -> dict:
    _check_name(name)
    return dict(_CONFIGS[name])


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")


def create_model(name: str, checkpoint: str | None = None, **overrides) -> nn.Module:
    """Build model ``name`` with config ``overrides`` (e.g. num_classes, img_size, drop_path_rate,
    mlstm_form) and load ``checkpoint`` (authors' .th file, state dict or Lightning checkpoint) if given."""
    _check_name(name)
    model = _MODELS[name](**overrides)
    if checkpoint is not None:
        from vil.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model
