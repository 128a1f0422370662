"""ADE20K (the ``ADEChallengeData2016`` release) through mmsegmentation's ``ADE20KDataset`` and transforms.

Layout (the official zip unpacked)::

    ADEChallengeData2016/
      images/training/*.jpg        annotations/training/*.png      (20,210 pairs)
      images/validation/*.jpg      annotations/validation/*.png    (2,000 pairs)

Masks hold 0 (other) and 1..150; ``reduce_zero_label`` maps 0 to the ignore index 255 and c to c - 1, giving
150 classes. Training augmentation (paper Table 12): random resize of 2048x512 by 0.5-2.0 (bicubic), random
512 crop with at most 0.75 of it one class, horizontal flip, color jitter (brightness, contrast, saturation
0.5, hue 0.25). Evaluation: resize to 2048x512 keeping the aspect ratio; the model slides 512 windows over it
and scores the prediction at the original size.

Bad samples: an image without a mask is an error in validation and skipped with a warning in training
(counted at setup); a mask of another size than its image, labels outside 0..150 or an unreadable file raise
``BadSampleError`` naming the file in validation, and are skipped with a counted warning in training.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from mmcv.transforms import BaseTransform, LoadImageFromFile
from mmengine.dataset import pseudo_collate
from mmengine.registry import DefaultScope
from mmseg.datasets import ADE20KDataset
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import TRANSFORMS
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

IGNORE_INDEX = 255
NUM_CLASSES = 150
SPLITS = {"train": "training", "val": "validation"}


class BadSampleError(ValueError):
    """An image or mask that cannot be used (unreadable, mismatched sizes, labels out of range)."""


def _load(load: BaseTransform, results: dict, what: str, key: str) -> dict:
    try:
        out = load(results)
    except Exception as e:  # decoders raise many kinds (cv2, PIL, OSError)
        raise BadSampleError(f"unreadable {what} {results[key]}: {type(e).__name__}: {e}") from None
    if out is None or (what == "image" and out.get("img") is None):
        raise BadSampleError(f"unreadable {what} {results[key]}")
    return out


@TRANSFORMS.register_module()
class LoadCheckedMask(BaseTransform):
    """mmseg's ``LoadAnnotations`` with the checks ADE20K needs: the mask decodes, has its image's original
    size (``ori_shape``) and holds only 0..num_classes; then ``reduce_zero_label`` (0 -> 255, c -> c - 1)."""

    def __init__(self, reduce_zero_label: bool = True, num_classes: int = NUM_CLASSES):
        self.load_mask = LoadAnnotations()  # no reduction here (the dataset is built with reduce_zero_label=False)
        self.reduce_zero_label, self.num_classes = reduce_zero_label, num_classes

    def transform(self, results: dict) -> dict:
        results = _load(self.load_mask, results, "mask", "seg_map_path")
        mask, (h, w) = results["gt_seg_map"], results["ori_shape"]
        if mask.shape[:2] != (h, w):
            raise BadSampleError(f"mask {results['seg_map_path']} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                 f"{results['img_path']} is {w}x{h}")
        top = int(mask.max())
        if top > self.num_classes:
            raise BadSampleError(f"mask {results['seg_map_path']} holds label {top}; ADE20K masks hold 0 (other) and "
                                 f"1..{self.num_classes}")
        if self.reduce_zero_label:
            reduced = mask.astype(np.int64) - 1
            reduced[reduced < 0] = IGNORE_INDEX
            results["gt_seg_map"] = reduced.astype(np.uint8)
        results["reduce_zero_label"] = self.reduce_zero_label
        return results


@TRANSFORMS.register_module()
class LoadCheckedImage(BaseTransform):
    """mmcv's ``LoadImageFromFile`` (BGR uint8) with a ``BadSampleError`` naming an unreadable file."""

    def __init__(self):
        self.load_image = LoadImageFromFile()

    def transform(self, results: dict) -> dict:
        return _load(self.load_image, results, "image", "img_path")


@TRANSFORMS.register_module()
class ColorJitter(BaseTransform):
    """torchvision's ColorJitter on the (BGR, HWC uint8) image of an mmseg pipeline, applied with ``prob``."""

    def __init__(self, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5, hue: float = 0.25,
                 prob: float = 1.0):
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.prob = prob

    def transform(self, results: dict) -> dict:
        if self.prob < 1.0 and np.random.rand() >= self.prob:
            return results
        rgb = torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1])).permute(2, 0, 1)
        results["img"] = np.ascontiguousarray(self.jitter(rgb).permute(1, 2, 0).numpy()[..., ::-1])
        return results


def train_pipeline(crop_size: int = 512, scale: Sequence[int] = (2048, 512), ratio_range=(0.5, 2.0),
                   cat_max_ratio: float = 0.75, jitter_prob: float = 1.0) -> list[dict]:
    return [
        dict(type="LoadCheckedImage"),
        dict(type="LoadCheckedMask"),
        dict(type="RandomResize", scale=tuple(scale), ratio_range=tuple(ratio_range), keep_ratio=True,
             interpolation="bicubic"),
        dict(type="RandomCrop", crop_size=(crop_size, crop_size), cat_max_ratio=cat_max_ratio),
        dict(type="RandomFlip", prob=0.5),
        dict(type="ColorJitter", prob=jitter_prob),
        dict(type="PackSegInputs"),
    ]


def test_pipeline(scale: Sequence[int] = (2048, 512), with_mask: bool = True) -> list[dict]:
    # The mask is loaded after the resize, so that it keeps the original size and the score is taken there
    # (mmseg's ADE20K configs do the same). Prediction of unlabeled images goes without it.
    mask = [dict(type="LoadCheckedMask")] if with_mask else []
    return [
        dict(type="LoadCheckedImage"),
        dict(type="Resize", scale=tuple(scale), keep_ratio=True),
        *mask,
        dict(type="PackSegInputs"),
    ]


class CheckedSamples(Dataset):
    """An mmseg dataset whose bad samples raise (``skip_bad=False``) or are replaced by the next good one
    with a warning that counts them (``skip_bad=True``, training)."""

    def __init__(self, dataset: Dataset, skip_bad: bool, max_skips: int = 100):
        self.dataset, self.skip_bad, self.max_skips = dataset, skip_bad, max_skips
        self.skipped = 0  # in this process (each data loader worker counts its own)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for _ in range(self.max_skips):
            try:
                return self.dataset[index]
            except BadSampleError as e:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                warnings.warn(f"skipping a training sample: {e} ({self.skipped} skipped in this process)")
                index = (index + 1) % len(self.dataset)
        raise BadSampleError(f"{self.max_skips} bad samples in a row; check the data folder")


def pair_files(root: str, split: str) -> tuple[list[str], list[str]]:
    """The image stems of ``split`` that have a mask, and those that have none. Raises for a missing folder."""
    images_dir = os.path.join(root, "images", SPLITS[split])
    masks_dir = os.path.join(root, "annotations", SPLITS[split])
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} not found: expected the ADEChallengeData2016 layout "
                                    f"(images/{{training,validation}}/*.jpg, annotations/{{training,validation}}/*.png)")
    images = sorted(f[:-4] for f in os.listdir(images_dir) if f.endswith(".jpg"))
    masks = {f[:-4] for f in os.listdir(masks_dir) if f.endswith(".png")}
    if not images:
        raise FileNotFoundError(f"no .jpg images in {images_dir}")
    paired = [s for s in images if s in masks]
    return paired, [s for s in images if s not in masks]


class ADE20KDataModule(L.LightningDataModule):
    """ADE20K through mmseg (see the module docstring).

    Args:
        root: the ``ADEChallengeData2016`` folder.
        batch_size: images per process and step in training (the paper: 16 in all); evaluation runs one
            image at a time, as mmseg does (images differ in size).
        crop_size / scale / ratio_range / cat_max_ratio: the training augmentation; ``scale`` also the test
            resize (long side, short side).
        jitter_prob: probability of the color jitter.
        test_split: the split of ``vil test`` (ADE20K's test images have no public masks: ``val``).
    """

    def __init__(self, root: str, batch_size: int = 16, num_workers: int = 8, crop_size: int = 512,
                 scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, jitter_prob: float = 1.0, test_split: str = "val"):
        super().__init__()
        if test_split not in SPLITS:
            raise ValueError(f"test_split must be one of {', '.join(SPLITS)}, got {test_split!r}")
        self.save_hyperparameters()
        self.root, self.batch_size = root, batch_size
        self.datasets: dict[str, CheckedSamples] = {}

    def _dataset(self, split: str) -> CheckedSamples:
        if split in self.datasets:
            return self.datasets[split]
        hp = self.hparams
        paired, unpaired = pair_files(self.root, split)
        folder = SPLITS[split]
        if unpaired:
            shown = ", ".join(f"{s}.jpg" for s in unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
            message = (f"{len(unpaired)} of {len(paired) + len(unpaired)} images in images/{folder} have no mask in "
                       f"annotations/{folder}: {shown}")
            if split != "train":
                raise BadSampleError(message)
            warnings.warn(message + "; training without them")
        if not paired:
            raise BadSampleError(f"no image in {self.root}/images/{folder} has a mask")
        if split == "train":
            pipeline = train_pipeline(hp.crop_size, hp.scale, hp.ratio_range, hp.cat_max_ratio, hp.jitter_prob)
        else:
            pipeline = test_pipeline(hp.scale)
        with DefaultScope.overwrite_default_scope("mmseg"):  # the pipeline's names are looked up in mmseg's registry
            dataset = ADE20KDataset(
                data_root=self.root, data_prefix=dict(img_path=f"images/{folder}", seg_map_path=f"annotations/{folder}"),
                pipeline=pipeline, test_mode=split != "train", serialize_data=False, lazy_init=True,
                reduce_zero_label=False)  # LoadCheckedMask reduces, after checking the raw labels
        dataset.full_init()
        if unpaired:
            keep = {os.path.join(self.root, "images", folder, f"{s}.jpg") for s in paired}
            dataset.data_list = [d for d in dataset.data_list if d["img_path"] in keep]
        self.datasets[split] = CheckedSamples(dataset, skip_bad=split == "train")
        return self.datasets[split]

    def setup(self, stage: str | None = None):
        if stage in ("fit", None):
            self._dataset("train")
        if stage in ("fit", "validate", None):
            self._dataset("val")
        if stage in ("test", None):
            self._dataset(self.hparams.test_split)

    def _loader(self, split: str, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self._dataset(split), batch_size=self.batch_size if train else 1, shuffle=train,
                          drop_last=train, num_workers=workers, persistent_workers=workers > 0,
                          collate_fn=pseudo_collate, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader(self.hparams.test_split, False)

    @property
    def classes(self) -> tuple[str, ...]:
        return ADE20KDataset.METAINFO["classes"]
