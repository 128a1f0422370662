"""ViL as an mmsegmentation backbone: ``dict(type='ViL', model='vil2_tiny', img_size=512, out_indices=(7, 11,
15, 23), drop_path_rate=0.0, checkpoint=None)`` in any mmseg config, once ``tasks.segmentation`` is imported.

The backbone returns the (B, dim, H/16, W/16) maps after the given flat blocks, without the final norm (the
paper's ADE20K taps: after the 4th, 6th, 8th and 12th block pair). The position embedding is stored on the
``img_size`` grid (a 224 checkpoint's 14x14 grid is bicubically resized on load) and resized again to the grid
of every input, so slide windows, whole images and the multi-scale test sizes all get the right embedding and
the right grid for the 2D q/k convolution.

``TimmViT`` gives a timm ViT (DeiT, DeiT-III) the interface the training module uses for ViL (layer ids for
layer-wise decay, ``compile_blocks``), for the same UperNet on a transformer backbone.
"""
from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmseg.registry import MODELS

import vil


@MODELS.register_module()
class ViL(BaseModule):
    """Args:
        model: a registered ViL name (``vil.list_models()``), built here with ``img_size``,
            ``drop_path_rate`` (linear over depth by default, as in the paper's Table 12), ``checkpoint`` and
            ``model_kwargs``; or an already built backbone (a ``vil.VisionLSTM`` or ``TimmViT``).
        out_indices: flat block indices whose outputs are returned (block j is sub-block j % 2 of pair j // 2).
        own_model: with a built ``model``: False keeps only a reference, for when another module (the Lightning
            task module) registers, moves, compiles and saves it; registering it here too would store its
            weights twice in every checkpoint.

    Blocks after the last tap, the final norm and the classifier are removed from the model, so that every
    remaining parameter gets a gradient (DDP needs no unused-parameter search).
    """

    def __init__(self, model: str | nn.Module = "vil2_tiny", img_size: int | Sequence[int] = 512,
                 out_indices: Sequence[int] = (7, 11, 15, 23), drop_path_rate: float = 0.0,
                 drop_path_schedule: str = "linear", checkpoint: str | None = None, own_model: bool = True,
                 model_kwargs: dict | None = None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if isinstance(model, str):
            kwargs = dict(img_size=img_size, drop_path_rate=drop_path_rate, drop_path_schedule=drop_path_schedule)
            model = vil.create_model(model, checkpoint=checkpoint, **{**kwargs, **(model_kwargs or {}), "num_classes": 0})
        elif not isinstance(model, nn.Module) or not hasattr(model, "forward_intermediates"):
            raise TypeError(f"model must be a ViL name or a backbone with forward_intermediates, got {type(model).__name__}")
        elif not own_model and checkpoint is not None:
            raise ValueError("checkpoint is given for a model owned elsewhere; load it where the model is built")
        self.out_indices = tuple(int(i) for i in out_indices)
        if not self.out_indices:
            raise ValueError("out_indices is empty: give the flat block indices to return")
        num_taps = len(getattr(model, "feature_info", None) or model.blocks)
        bad = [i for i in self.out_indices if not -num_taps <= i < num_taps]
        if bad:
            raise ValueError(f"out_indices {bad} out of range: the model has {num_taps} feature taps")
        self.out_indices = tuple(i % num_taps for i in self.out_indices)
        model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        if own_model:
            self.model = model
        else:
            self._shared_model = [model]  # a plain list: not a submodule, yet deep-copied along (EMA)

    @property
    def vil(self) -> nn.Module:
        """The wrapped backbone."""
        return self.model if "model" in self._modules else self._shared_model[0]

    def init_weights(self):
        # mmengine calls init_weights on every child with one; VisionLSTM.init_weights would replace the
        # checkpoint's weights. The weights come from vil.create_model (its init or the checkpoint).
        pass

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.vil.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True))


class TimmViT(nn.Module):
    """A timm vision transformer (e.g. ``deit_tiny_patch16_224``, ``deit3_small_patch16_224``) with the
    interface the task module uses for ViL: ``depth`` (blocks; each one layer for layer-wise decay),
    ``lr_layer_id``, ``no_weight_decay`` with this wrapper's names, ``compile_blocks``, and timm's own
    ``forward_intermediates`` / ``prune_intermediate_layers``. Built with ``dynamic_img_size`` so that the
    position embedding is resized to every input (slide windows, whole images, test scales)."""

    def __init__(self, name: str, checkpoint: str | None = None, **kwargs):
        super().__init__()
        kwargs.setdefault("dynamic_img_size", True)
        if checkpoint is not None:  # timm's loader resizes the position embedding to img_size
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
        self.vit = timm.create_model(name, num_classes=0, **kwargs)
        self.depth = len(self.vit.blocks)
        self.num_features = self.vit.num_features
        self.feature_info = self.vit.feature_info

    def lr_layer_id(self, name: str) -> int:
        name = name.removeprefix("vit.")
        if name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{k}" for k in self.vit.no_weight_decay()}

    def compile_blocks(self, **compile_kwargs) -> "TimmViT":
        for block in self.vit.blocks:
            block.compile(**compile_kwargs)
        return self

    def prune_intermediate_layers(self, indices, prune_norm: bool = False, prune_head: bool = True):
        return self.vit.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)

    def forward_intermediates(self, x, indices=None, intermediates_only: bool = False, **kwargs):
        return self.vit.forward_intermediates(x, indices=indices, intermediates_only=intermediates_only, **kwargs)

    def forward(self, x):
        return self.vit(x)
