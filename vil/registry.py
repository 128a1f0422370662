"""``vil.create_model`` and ``vil.list_models``: the front door to the ViL variants in timm's registry."""
from __future__ import annotations

import difflib
import os

import timm
import torch.nn as nn
from timm.models import split_model_name_tag

from vil import vision_lstm  # noqa: F401  (registers the variants with timm)

_MODULE = vision_lstm.__name__.rsplit(".", 1)[-1]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered ViL variants (with ``pretrained``: their released weight tags, e.g. vil2_tiny.e800_in1k)."""
    return timm.list_models(pattern, module=_MODULE, pretrained=pretrained)


def create_model(name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` for a ViL variant, with a clear error for unknown names. ``checkpoint``: a local
    weight file (the authors' .th, a state dict or a Lightning checkpoint of this suite), the same as
    ``pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint)``. Other arguments are timm's and the
    model's: num_classes, img_size, drop_path_rate, mlstm_form, features_only, out_indices, pretrained, ..."""
    arch, _ = split_model_name_tag(name)
    if arch not in list_models():
        close = difflib.get_close_matches(arch, list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    if checkpoint is not None:
        if kwargs.get("pretrained") is False:
            raise ValueError("checkpoint is given but pretrained=False; drop one of them")
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": os.fspath(checkpoint)}
    return timm.create_model(name, **kwargs)
