"""The shared backbone LightningModule: model construction, AdamW with layer-wise lr decay, warmup + cosine
schedule by step, optional EMA. Tasks subclass it and add only their heads, losses, data and metrics."""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import vil


class BackboneModule(L.LightningModule):
    """Args:
        model: registered model name (``vil.list_models()``).
        model_kwargs: overrides for ``vil.create_model`` (num_classes, img_size, drop_path_rate, mlstm_form, ...).
        checkpoint: weights to start from (authors' .th, state dict or a Lightning checkpoint of this suite).
        lr: peak learning rate; multiplied by global_batch / lr_scale_divisor when the divisor is set.
        layer_decay: layer-wise lr decay factor; pairs of blocks form one layer, the patch and position
            embeddings are the deepest layer and everything after the blocks is undecayed. None disables it.
        warmup_epochs / warmup_steps: linear warmup length (steps win when both are given).
        min_lr: final learning rate of the cosine schedule (scaled along with ``lr``).
        ema_decay: keep an exponential moving average of all weights; evaluation then uses the EMA.
        compile: torch.compile the backbone.
    """

    def __init__(
        self,
        model: str = "vil2_tiny",
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        lr: float = 1e-3,
        lr_scale_divisor: int | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        min_lr: float = 1e-6,
        ema_decay: float | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = vil.create_model(model, checkpoint=checkpoint, **(model_kwargs or {}))
        self.ema: AveragedModel | None = None

    # -- model hooks for subclasses ------------------------------------------------------------------------------------
    def configure_model(self):
        if self.hparams.compile and not isinstance(self.backbone, torch._dynamo.eval_frame.OptimizedModule):
            self.backbone = torch.compile(self.backbone)

    def setup(self, stage: str):
        if self.hparams.ema_decay is not None and self.ema is None:
            self.ema = AveragedModel(self._task_modules(), multi_avg_fn=get_ema_multi_avg_fn(self.hparams.ema_decay))
            self.ema.requires_grad_(False)

    def _task_modules(self) -> nn.Module:
        """Everything that trains (the backbone and any task heads), for EMA."""
        return nn.ModuleDict({name: m for name, m in self.named_children() if name != "ema"})

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self._task_modules())

    def evaluation_modules(self) -> nn.ModuleDict:
        """The modules evaluation should use: the EMA copy when EMA is on, else the live ones."""
        return self.ema.module if self.ema is not None else self._task_modules()

    @staticmethod
    def check_finite(loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step}: training diverged (lower the learning rate, "
                f"enable gradient clipping or check the inputs for NaN/inf)"
            )

    # -- optimizer -----------------------------------------------------------------------------------------------------
    def _global_batch_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            return None
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def peak_lr(self) -> float:
        lr = self.hparams.lr
        if self.hparams.lr_scale_divisor:
            batch = self._global_batch_size()
            if batch is None:
                raise ValueError("lr_scale_divisor is set but the datamodule has no batch_size attribute")
            lr = lr * batch / self.hparams.lr_scale_divisor
        return lr

    def param_groups(self, lr: float) -> list[dict]:
        backbone = getattr(self.backbone, "_orig_mod", self.backbone)
        no_decay_keys = backbone.no_weight_decay_keys()
        num_layers = backbone.depth + 2
        decay = self.hparams.layer_decay
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad or name.startswith("ema."):
                continue
            if name.startswith("backbone."):
                inner = name.split(".", 1)[1].removeprefix("_orig_mod.")
                layer_id = backbone.lr_layer_id(inner)
                skip_wd = param.ndim <= 1 or inner in no_decay_keys
            else:  # task heads sit above the backbone
                layer_id = num_layers - 1
                skip_wd = param.ndim <= 1
            scale = decay ** (num_layers - 1 - layer_id) if decay is not None else 1.0
            group = groups.setdefault(
                (layer_id, skip_wd),
                {"params": [], "lr": lr * scale, "weight_decay": 0.0 if skip_wd else self.hparams.weight_decay,
                 "lr_scale": scale, "name": f"layer{layer_id}_{'no_wd' if skip_wd else 'wd'}"},
            )
            group["params"].append(param)
        return [groups[k] for k in sorted(groups)]

    def configure_optimizers(self):
        lr = self.peak_lr()
        groups = self.param_groups(lr)
        # The fused kernel updates all tensors in a few launches: a ViL-T step on an H100 takes 2.1 ms instead
        # of 7.1 ms, mostly launch overhead. It needs every parameter on the GPU.
        fused = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(self.hparams.betas), fused=fused or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.hparams.warmup_steps is not None:
            warmup = self.hparams.warmup_steps
        else:
            warmup = int(round(self.hparams.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1)))
        schedule = WarmupCosine(warmup, total, min_ratio=self.hparams.min_lr / lr if lr > 0 else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WarmupCosine:
    """Multiplier of the peak lr at a step: linear warmup from 0, then cosine decay to ``min_ratio``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
