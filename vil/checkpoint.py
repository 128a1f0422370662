"""Loading ViL weights: the authors' released ``.th`` files (raw training-code keys), their model-side state
dicts, plain state dicts and Lightning checkpoints of this suite.

Files come from the internet, so they are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings

import torch
import torch.nn as nn

from vil.layers import resize_pos_embed

_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm|layer)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            # torch's message is many lines of advice; the line naming the object is the one that matters
            detail = next((line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()), "")
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers; refusing to unpickle it "
                f"(weights_only=True). Re-save it as a plain state dict. {detail}".rstrip()
            ) from None
        raise CheckpointError(f"{path} is not a torch checkpoint (unpickling failed: {e})") from None
    except Exception as e:  # a text file, a truncated download, another format: torch raises many kinds
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None


# Where the EMA weights of a run of this suite sit in its Lightning checkpoint (tasks.base.BackboneModule).
EMA_PREFIX = "ema.module.backbone."


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint object, with wrapper prefixes removed. Where a checkpoint holds EMA
    weights besides the live ones, the EMA weights: they are what the run evaluated."""
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    sd = dict(obj)
    if any(k.startswith(EMA_PREFIX) for k in sd):
        sd = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    for prefix in ("backbone.", "_orig_mod.", "module."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def convert_raw_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the authors' training-code keys (and their flat-block model keys) onto this model's keys."""
    raw = any(k.startswith("xlstm.") or ".xlstm." in k or k.startswith("post_blocks_norm") for k in sd)
    out = {}
    for key, value in sd.items():
        if raw:
            key = key.replace(".xlstm.", ".layer.")
            key = key[len("xlstm."):] if key.startswith("xlstm.") else key
            key = key.replace(".xlstm_norm.", ".norm.")
            if model.version != 1:
                key = key.replace(".conv1d.", ".conv.")
                key = re.sub(r"^post_blocks_norm\.", "norm.", key)
                key = re.sub(r"^head\.0\.", "legacy_norm.", key)
            else:
                key = re.sub(r"^post_blocks_norm\.", "legacy_norm.", key)
                key = re.sub(r"^head\.0\.", "norm.", key)
            key = re.sub(r"^head\.1\.", "head.", key)
        match = _FLAT_BLOCK.match(key)
        if match:  # flat block j -> pair j // 2, sub-block j % 2
            j = int(match.group(1))
            pair = j // 2
            if pair < len(model.blocks):
                name = model.blocks[pair].names[j % 2]
                key = f"blocks.{pair}.{name}." + key[len(f"blocks.{j}."):]
        out[key] = value
    return out


def load_checkpoint(model: nn.Module, path_or_state, strict: bool = True) -> nn.Module:
    """Load weights (a file path or a checkpoint object) into ``model`` (a ``vil.VisionLSTM``). The position
    embedding is resized when the checkpoint's grid differs; a classifier head of another number of classes
    is left at its fresh init with a warning. Any other missing, unexpected or misshapen key raises a
    CheckpointError naming them."""
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    sd = convert_raw_keys(extract_state_dict(obj), model)
    own = model.state_dict()

    key = "pos_embed.embed"
    if key in sd and key in own and sd[key].shape != own[key].shape and sd[key].shape[-1] == own[key].shape[-1]:
        sd[key] = resize_pos_embed(sd[key].float(), tuple(own[key].shape[1:3])).to(sd[key].dtype)

    head_keys = [k for k in ("head.weight", "head.bias") if k in sd]
    if head_keys and ("head.weight" not in own or sd["head.weight"].shape != own["head.weight"].shape):
        if "head.weight" in own and sd["head.weight"].shape[1:] == own["head.weight"].shape[1:]:
            warnings.warn(
                f"checkpoint head has {sd['head.weight'].shape[0]} classes, the model "
                f"{own['head.weight'].shape[0]}: keeping the model's freshly initialized head"
            )
            for k in head_keys:
                sd.pop(k)
        elif "head.weight" not in own:  # headless model (num_classes=0)
            for k in head_keys:
                sd.pop(k)

    missing = sorted(set(own) - set(sd) - {"head.weight", "head.bias"})
    unexpected = sorted(set(sd) - set(own))
    misshapen = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if strict and (missing or unexpected or misshapen):
        lines = []
        for title, items in (("shape mismatches", misshapen), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
                lines.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
        raise CheckpointError(_describe(sd, own) + "checkpoint does not fit the model:\n  " + "\n  ".join(lines))
    sd = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(sd, strict=False)
    return model


def _describe(sd: dict, own: dict) -> str:
    """A one-line summary of the size difference, where the patch embedding tells it."""
    key = "patch_embed.proj.weight"
    if key not in sd or key not in own or sd[key].shape == own[key].shape:
        return ""
    depth = lambda d: len({k.split(".")[1] for k in d if k.startswith("blocks.")})  # noqa: E731
    (cd, _, cp, _), (md, _, mp, _) = sd[key].shape, own[key].shape
    return (f"the checkpoint is a dim-{cd} model with patch size {cp} and {depth(sd)} block pairs, the model "
            f"dim {md}, patch size {mp}, {depth(own)} pairs; ")
