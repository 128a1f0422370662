"""Semantic segmentation on the shared backbone module: mmseg's ``EncoderDecoder`` (ViL backbone,
``Feature2Pyramid`` neck, ``UPerHead`` with an ``FCNHead`` auxiliary head; or a linear head for the ablation
setting) trained in Lightning, scored by mmseg's IoU functions.

    vil fit --config experiments/ade20k/base.yaml --config experiments/ade20k/vil_tiny.yaml --data.init_args.root DIR
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchmetrics
import vil
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from mmseg.evaluation import IoUMetric
from mmseg.registry import MODELS
from timm.models import split_model_name_tag

from tasks.base import BackboneModule
from tasks.segmentation.backbone import TimmViT
from tasks.segmentation.data import IGNORE_INDEX
from tasks.segmentation.sync_bn import convert_sync_batchnorm

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


class SegmentationIoU(torchmetrics.Metric):
    """mmseg's IoU metric (aAcc, mIoU, mAcc in percent, classes absent from labels and predictions left out of
    the means) with its per-class areas summed in torchmetrics states, so that DDP ranks are summed too."""

    full_state_update = False

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = tuple(class_names) if class_names else tuple(str(c) for c in range(num_classes))
        for name in ("area_intersect", "area_union", "area_pred", "area_label"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds, target: (B, H, W) class indices (target: ignore_index where unlabeled)."""
        if preds.shape != target.shape:
            raise ValueError(f"prediction {tuple(preds.shape)} and label {tuple(target.shape)} differ in shape")
        for p, t in zip(preds, target):
            areas = IoUMetric.intersect_and_union(p, t, self.num_classes, self.ignore_index)
            for name, area in zip(("area_intersect", "area_union", "area_pred", "area_label"), areas):
                setattr(self, name, getattr(self, name) + area.to(torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        metric = IoUMetric(ignore_index=self.ignore_index, iou_metrics=["mIoU"])
        metric.dataset_meta = {"classes": self.class_names}
        MMLogger.get_instance("mmseg")  # compute_metrics prints its per-class table to the current logger
        areas = tuple(getattr(self, n).cpu() for n in ("area_intersect", "area_union", "area_pred", "area_label"))
        scores = metric.compute_metrics([areas])
        return {k: torch.tensor(float(scores[k])) for k in ("aAcc", "mIoU", "mAcc")}


class SegmentationModule(BackboneModule):
    """Args (besides the backbone's, see ``BackboneModule``; ``model`` may also name a timm ViT such as
    ``deit_tiny_patch16_224`` for comparison):
        num_classes: classes (ADE20K: 150).
        crop_size: training crop and slide window; the backbone's position embedding is stored at this size.
        out_indices: flat block indices of the feature taps (ViL: 7, 11, 15, 23 = pairs 4, 6, 8, 12; a ViT's
            blocks 3, 5, 7, 11).
        head: ``upernet`` (Feature2Pyramid neck, UPerHead and an FCNHead auxiliary head on the third tap) or
            ``linear`` (a 1x1 convolution on the last tap: the paper's ablation setting).
        channels / aux_channels: UPerHead and FCNHead widths (192 for ViL-T, 384 for S and B).
        aux_weight: auxiliary loss weight. dropout: dropout before the heads' classifiers.
        slide_stride: stride of the slide windows at evaluation (crop_size windows).
        test_scales / test_flip: evaluation scales of the (2048x512-resized) image and horizontal flip; their
            softmax outputs are averaged. ``val_*`` for validation, ``test_*`` for ``vil test``.
        sync_batchnorm: convert the heads' BatchNorm to SyncBatchNorm when training on more than one process.
    """

    def __init__(self, num_classes: int = 150, crop_size: int = 512, out_indices: Sequence[int] = (7, 11, 15, 23),
                 head: Literal["upernet", "linear"] = "upernet", channels: int = 192, aux_channels: int | None = None,
                 aux_weight: float = 0.4, dropout: float = 0.1, slide_stride: int = 341,
                 val_scales: Sequence[float] = (1.0,), val_flip: bool = False,
                 test_scales: Sequence[float] = (0.75, 1.0, 1.25, 1.5, 1.75), test_flip: bool = True,
                 sync_batchnorm: bool = True, class_names: Sequence[str] | None = None, **kwargs: Any):
        if head not in ("upernet", "linear"):
            raise ValueError(f"head must be 'upernet' or 'linear', got {head!r}")
        if slide_stride < 1 or slide_stride > crop_size:
            raise ValueError(f"slide_stride must be in 1..crop_size ({crop_size}), got {slide_stride}")
        for name, scales in (("val_scales", val_scales), ("test_scales", test_scales)):
            if not scales or any(s <= 0 for s in scales):
                raise ValueError(f"{name} must be a non-empty list of positive scale factors, got {scales!r}")
        kwargs["model_kwargs"] = {**(kwargs.get("model_kwargs") or {}), "img_size": crop_size}
        super().__init__(**kwargs)
        self.save_hyperparameters()
        dim = self.backbone.num_features
        norm_cfg = dict(type="BN", requires_grad=True)
        cfg: dict[str, Any] = dict(
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255,
                                   bgr_to_rgb=True, pad_val=0, seg_pad_val=IGNORE_INDEX, size=(crop_size, crop_size)),
            backbone=dict(type="ViL", model=self.backbone, out_indices=tuple(out_indices), own_model=False),
            train_cfg=dict(),
            # attribute access (test_cfg.mode) in EncoderDecoder: a ConfigDict
            test_cfg=ConfigDict(mode="slide", crop_size=(crop_size, crop_size), stride=(slide_stride, slide_stride)),
        )
        loss = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
        if head == "upernet":
            if len(out_indices) != 4:
                raise ValueError(f"the UperNet head takes 4 taps (Feature2Pyramid's 4x, 2x, 1x, 0.5x), got "
                                 f"out_indices {tuple(out_indices)}")
            cfg["neck"] = dict(type="Feature2Pyramid", embed_dim=dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg)
            cfg["decode_head"] = dict(
                type="UPerHead", in_channels=[dim] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                channels=channels, dropout_ratio=dropout, num_classes=num_classes, norm_cfg=norm_cfg,
                align_corners=False, loss_decode=loss)
            cfg["auxiliary_head"] = dict(
                type="FCNHead", in_channels=dim, in_index=2, channels=aux_channels or channels, num_convs=1,
                concat_input=False, dropout_ratio=dropout, num_classes=num_classes, norm_cfg=norm_cfg,
                align_corners=False, loss_decode={**loss, "loss_weight": aux_weight})
        else:
            cfg["decode_head"] = dict(
                type="FCNHead", in_channels=dim, in_index=len(out_indices) - 1, channels=dim, num_convs=0,
                concat_input=False, dropout_ratio=dropout, num_classes=num_classes, norm_cfg=norm_cfg,
                align_corners=False, loss_decode=loss)
        with DefaultScope.overwrite_default_scope("mmseg"):  # nested configs are looked up in mmseg's registry
            self.segmentor = MODELS.build(cfg)
        # The heads' init_cfg (the backbone keeps its weights, see ViL.init_weights); mmengine logs every
        # parameter's init at INFO level, hundreds of lines.
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel("WARNING")
        try:
            self.segmentor.init_weights()
        finally:
            logger.setLevel(level)
        if class_names is None:
            from mmseg.datasets import ADE20KDataset

            class_names = ADE20KDataset.METAINFO["classes"] if num_classes == 150 else None
        self.val_iou = SegmentationIoU(num_classes, class_names)
        self.test_iou = SegmentationIoU(num_classes, class_names)

    def create_backbone(self, model: str, checkpoint: str | None, model_kwargs: dict[str, Any]):
        model_kwargs["num_classes"] = 0
        if split_model_name_tag(model)[0] in vil.list_models():
            model_kwargs.setdefault("drop_path_schedule", "linear")  # paper Table 12: linear over depth
            return super().create_backbone(model, checkpoint, model_kwargs)
        model_kwargs.pop("num_classes")
        return TimmViT(model, checkpoint=checkpoint, **model_kwargs)

    # -- set-up --------------------------------------------------------------------------------------------------------
    def setup(self, stage: str):
        # Before BackboneModule.setup (the EMA copy) and before the strategy wraps the module in DDP.
        if self.hparams.sync_batchnorm and self.trainer.world_size > 1 and stage == "fit":
            self.segmentor = convert_sync_batchnorm(self.segmentor, self.trainer.strategy.root_device)
        super().setup(stage)

    def configure_model(self):
        if self.compiled is None and self.compile_choice() == "model":
            # The segmentor calls the backbone's forward_intermediates, which torch.compile of the backbone
            # module would not cover: compile the mmseg adapter around it instead.
            self.segmentor.backbone.compile(**(self.hparams.compile_kwargs or {}))
            self.compiled = "model"
            return
        super().configure_model()

    # -- steps ---------------------------------------------------------------------------------------------------------
    def preprocess(self, batch: dict, segmentor, training: bool) -> dict:
        # mmengine's preprocessor moves data to the device it last saw in .to(), which Lightning's module
        # transfer (nn.Module._apply) does not update.
        preprocessor = segmentor.data_preprocessor.to(self.device)
        return preprocessor(batch, training=training)

    def training_step(self, batch, batch_idx):
        data = self.preprocess(batch, self.segmentor, training=True)
        losses = self.segmentor.loss(data["inputs"], data["data_samples"])
        loss, log_vars = self.segmentor.parse_losses(losses)
        self.check_finite(loss)
        batch_size = data["inputs"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for key, value in log_vars.items():
            if key != "loss":
                self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"], batch_size=batch_size)
        return loss

    @torch.no_grad()
    def predict_probabilities(self, inputs: torch.Tensor, metas: list[dict], scales: Sequence[float] = (1.0,),
                              flip: bool = False, segmentor=None) -> torch.Tensor:
        """Class probabilities (B, C, H, W) at each image's ``ori_shape``, the mean over ``scales`` (factors of
        the input size) and, with ``flip``, their horizontal flips; each view is slide-window inferred."""
        segmentor = segmentor if segmentor is not None else self.evaluation_modules()["segmentor"]
        ori_shape = tuple(metas[0]["ori_shape"])
        if any(tuple(m["ori_shape"]) != ori_shape for m in metas):
            raise ValueError("images of one evaluation batch must share their original size (use batch size 1)")
        height, width = inputs.shape[-2:]
        probs = 0.0
        for scale in scales:
            size = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
            x = inputs if size == (height, width) else F.interpolate(inputs, size=size, mode="bilinear",
                                                                     align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                view = x.flip(-1) if flipped else x
                view_metas = [{**m, "img_shape": size, "pad_shape": size} for m in metas]
                logits = segmentor.inference(view, view_metas)
                if flipped:
                    logits = logits.flip(-1)
                logits = F.interpolate(logits.float(), size=ori_shape, mode="bilinear", align_corners=False)
                probs = probs + logits.softmax(dim=1)
        return probs / (len(scales) * (2 if flip else 1))

    def _evaluate(self, batch, metric: SegmentationIoU, scales, flip: bool):
        segmentor = self.evaluation_modules()["segmentor"]
        data = self.preprocess(batch, segmentor, training=False)
        samples = data["data_samples"]
        probs = self.predict_probabilities(data["inputs"], [s.metainfo for s in samples], scales, flip, segmentor)
        labels = torch.stack([s.gt_sem_seg.data[0] for s in samples]).to(probs.device)
        metric.update(probs.argmax(dim=1), labels)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_iou, self.hparams.val_scales, self.hparams.val_flip)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_iou, self.hparams.test_scales, self.hparams.test_flip)

    def _log_scores(self, metric: SegmentationIoU, stage: str):
        scores = metric.compute()
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items()}, prog_bar=True, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self):
        self._log_scores(self.val_iou, "val")

    def on_test_epoch_end(self):
        self._log_scores(self.test_iou, "test")
