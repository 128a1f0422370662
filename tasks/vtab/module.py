"""The fine-tuning module of a VTAB-1K run: ``ClassificationModule`` whose head, metrics and learning rate are
reset for each run, so that one module (and its compiled blocks) serves many runs in a long-lived process."""
from __future__ import annotations

import torch
import torchmetrics

from tasks.classification import ClassificationModule
from tasks.vtab.data import PAD_LABEL


class VtabModule(ClassificationModule):
    """Args: those of ``ClassificationModule``; ``num_classes`` is only the first head's size, ``start_run``
    sets each run's."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The weights every run starts from (the checkpoint's); the head is replaced per run.
        self._initial_backbone = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()
                                  if not k.startswith("head.")}

    def start_run(self, num_classes: int, lr: float, seed: int) -> None:
        """Back to the checkpoint weights with a fresh head of ``num_classes`` outputs drawn from ``seed``.
        The parameters are copied into place, so a compiled backbone (and its CUDA graphs) stays valid."""
        backbone = self.backbone
        missing, unexpected = backbone.load_state_dict(self._initial_backbone, strict=False)
        if unexpected or set(missing) - {"head.weight", "head.bias"}:
            raise RuntimeError(f"initial weights do not fit the backbone: missing {missing}, unexpected {unexpected}")
        torch.manual_seed(seed)
        backbone.reset_classifier(num_classes)
        self.hparams.num_classes = num_classes
        self.hparams.lr = lr
        device = backbone.patch_embed.proj.weight.device
        accuracy = torchmetrics.Accuracy("multiclass", num_classes=num_classes, ignore_index=PAD_LABEL)
        self.val_metrics = torchmetrics.MetricCollection({"acc": accuracy}, prefix="val/").to(device)
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        for metric in self.modules():  # any other metric state (e.g. the evaluation loss means) starts empty
            if isinstance(metric, torchmetrics.Metric):
                metric.reset()
        self._all_finite, self._checked_until = None, -1
