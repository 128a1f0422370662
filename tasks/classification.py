"""Image classification on a ViL backbone: cross-entropy (with optional mixup/cutmix and label smoothing),
top-1/top-5 accuracy from torchmetrics. Shared by the classification tasks (digits, ImageNet-1K, VTAB-1K) and
run through the ``vil`` command line:

    vil fit --config experiments/digits/vil_digits.yaml
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from timm.loss import SoftTargetCrossEntropy

from tasks.base import BackboneModule


class ClassificationModule(BackboneModule):
    """Args (besides the backbone's, see ``BackboneModule``):
        num_classes: classifier outputs (sets ``model_kwargs['num_classes']``).
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha / cutmix_alpha: batch mixing strengths (timm's Mixup); 0 disables them. The mixed targets
            are soft; the loss is then timm's soft-target cross entropy.
        mixup_switch_prob: with both on, the chance of cutmix instead of mixup for a batch.
        mixup_mode: ``batch`` (one mixing per batch), ``pair`` or ``elem`` (timm's Mixup modes).

    The evaluation loss and metrics are torchmetrics states, summed over the processes: with a sampler that
    gives every image to one process (``tasks.imagenet.data.ResumableSampler``), distributed evaluation gives
    the metrics of one process over the whole set. An empty evaluation batch (every file skipped) is ignored.
    """

    def __init__(self, num_classes: int = 1000, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mixup_switch_prob: float = 0.5, mixup_mode: str = "batch", **kwargs):
        kwargs["model_kwargs"] = {**(kwargs.get("model_kwargs") or {}), "num_classes": num_classes}
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=mixup_switch_prob,
                               mode=mixup_mode, label_smoothing=label_smoothing, num_classes=num_classes)
        self.soft_target_loss = SoftTargetCrossEntropy()
        top_k = min(5, num_classes)
        metrics = {"acc": torchmetrics.Accuracy("multiclass", num_classes=num_classes)}
        if top_k > 1 and num_classes > 5:
            metrics["acc_top5"] = torchmetrics.Accuracy("multiclass", num_classes=num_classes, top_k=top_k)
        self.val_metrics = torchmetrics.MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.eval_losses = torch.nn.ModuleDict({"val": torchmetrics.MeanMetric(), "test": torchmetrics.MeanMetric()})

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            loss = self.soft_target_loss(self(x), soft)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def _evaluate(self, batch, metrics, stage):
        x, y = batch
        if len(x) == 0:
            return
        logits = self.evaluation_modules()["backbone"](x)
        loss = self.eval_losses[stage]
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(y))
        metrics.update(logits, y)
        self.log_dict(metrics, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics, "test")
