"""VTAB-1K data from either source, decoded and resized once and kept in memory as uint8.

Sources (one per task):
- ``FolderSource``: the community folder format, ``<root>/<task>/{train800,val200,train800val200,test}.txt``
  with lines ``<path relative to the task folder> <label>``; the folder may carry any of the task's common
  spellings (``cifar`` / ``cifar100``, ``oxford_iiit_pet`` / ``pets``, ...).
- ``TfdsSource``: tensorflow-datasets prepared in the ArrayRecord format, read through ``tfds.data_source``
  (no TensorFlow needed), with the official split slices and label functions of ``tasks.vtab.tasks``. It opens
  the data lazily, in the process that decodes: ArrayRecord readers do not survive a fork, so processes that
  read them are started with ``spawn`` or ``forkserver``.

``decode_split`` turns a split into ``(images uint8 (N, S, S, 3), labels int64 (N,))``: PIL decode, RGB, resize
to S x S bicubic, which is what torchvision's ``Resize((S, S), bicubic)`` does to a PIL image (the authors'
``resize224bicubic_imagenetnorm``). ``VtabDataModule`` serves those arrays and normalizes on the device.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from tasks.transforms import DeviceNormalize
from tasks.vtab.tasks import SPLITS, Task, get_task, resolve_slices

PAD_LABEL = -100  # labels of the padding that fills the last evaluation batch; ignored by loss and accuracy


class VtabDataError(ValueError):
    """Data that cannot be used as given (missing files, bad lines, labels out of range, ...)."""


# -- folder format ---------------------------------------------------------------------------------------------------
def read_list_file(path: str, num_classes: int) -> list[tuple[str, int]]:
    """The lines ``<relative path> <label>`` of a split file; VtabDataError naming the file and line for a
    missing file, a malformed line or a label outside 0..num_classes-1."""
    if not os.path.isfile(path):
        raise VtabDataError(f"missing split file {path}")
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise VtabDataError(f"{path}:{number}: expected '<relative path> <label>', got {line.strip()!r}")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise VtabDataError(f"{path}:{number}: label {label} is outside 0..{num_classes - 1} "
                                    f"(the task has {num_classes} classes)")
            entries.append((parts[0], label))
    if not entries:
        raise VtabDataError(f"split file {path} lists no images")
    return entries


class FolderSource:
    """One task of the folder format under ``root``. ``found`` says which spelling of the folder was used."""

    def __init__(self, root: str, task: Task | str):
        self.task = get_task(task) if isinstance(task, str) else task
        self.root = root
        candidates = (self.task.name, *self.task.aliases)
        present = [name for name in candidates if os.path.isdir(os.path.join(root, name))]
        if not present:
            raise VtabDataError(f"no folder for task {self.task.name} in {root} (looked for {', '.join(candidates)})")
        self.found = present[0]
        self.folder = os.path.join(root, self.found)
        if not any(os.path.isfile(os.path.join(self.folder, f"{s}.txt")) for s in SPLITS):
            raise VtabDataError(f"task folder {self.folder} is empty of split files (expected "
                                f"{', '.join(s + '.txt' for s in SPLITS)})")
        self._lists: dict[str, list[tuple[str, int]]] = {}

    def describe(self) -> str:
        return f"{self.task.name}: folder {self.folder}" + (f" (spelled {self.found!r})" if self.found != self.task.name else "")

    def entries(self, split: str) -> list[tuple[str, int]]:
        if split not in self._lists:
            self._lists[split] = read_list_file(os.path.join(self.folder, f"{split}.txt"), self.task.num_classes)
        return self._lists[split]

    def check(self, splits: Sequence[str] = SPLITS) -> dict[str, int]:
        """Read the split files and check that every listed image exists; returns the count per split."""
        counts = {}
        for split in splits:
            entries = self.entries(split)
            for rel, _ in entries:
                if not os.path.isfile(os.path.join(self.folder, rel)):
                    raise VtabDataError(f"{os.path.join(self.folder, split)}.txt lists {rel}, which is not in "
                                        f"{self.folder}")
            counts[split] = len(entries)
        return counts

    def load(self, split: str, index: int) -> tuple[Image.Image, int]:
        rel, label = self.entries(split)[index]
        with Image.open(os.path.join(self.folder, rel)) as img:
            return img.convert("RGB"), label

    def size(self, split: str) -> int:
        return len(self.entries(split))


# -- tensorflow-datasets ---------------------------------------------------------------------------------------------
class TfdsSource:
    """One task from tfds data prepared in ``data_dir`` (ArrayRecord), opened on first use."""

    def __init__(self, data_dir: str | None, task: Task | str):
        self.task = get_task(task) if isinstance(task, str) else task
        self.data_dir = data_dir
        self._sources: dict[str, object] = {}
        self._slices: dict[str, list[tuple[str, int, int]]] = {}

    def describe(self) -> str:
        return f"{self.task.name}: tfds {self.task.tfds_name} in {self.data_dir}"

    def _source(self, split: str):
        if split not in self._sources:
            import tensorflow_datasets as tfds

            try:
                self._sources[split] = tfds.data_source(self.task.tfds_name, split=split, data_dir=self.data_dir)
            except Exception as e:  # tfds raises several types for missing or unprepared data
                raise VtabDataError(
                    f"cannot open tfds {self.task.tfds_name} split {split!r} in {self.data_dir}: {e}. Prepare it with "
                    f"TensorFlow in the ArrayRecord format (see tasks/vtab/README.md)") from None
        return self._sources[split]

    def _split_sizes(self, spec: str) -> dict[str, int]:
        names = {part.split("[", 1)[0].strip() for part in spec.split("+")}
        return {name: len(self._source(name)) for name in names}

    def slices(self, split: str) -> list[tuple[str, int, int]]:
        if split not in self._slices:
            spec = self.task.tfds_splits[split]
            try:
                self._slices[split] = resolve_slices(spec, self._split_sizes(spec))
            except ValueError as e:
                raise VtabDataError(f"{self.task.name} {split}: {e}") from None
        return self._slices[split]

    def check(self, splits: Sequence[str] = SPLITS) -> dict[str, int]:
        return {split: self.size(split) for split in splits}

    def size(self, split: str) -> int:
        return sum(stop - start for _, start, stop in self.slices(split))

    def example(self, split: str, index: int) -> dict:
        for name, start, stop in self.slices(split):
            if index < stop - start:
                return self._source(name)[start + index]
            index -= stop - start
        raise IndexError(index)

    def load(self, split: str, index: int) -> tuple[Image.Image, int]:
        example = self.example(split, index)
        label = self.task.label_fn(example)
        if not 0 <= label < self.task.num_classes:
            raise VtabDataError(f"{self.task.name} {split} example {index}: label {label} is outside "
                                f"0..{self.task.num_classes - 1}")
        return to_pil(self.task.image_fn(example)), label


def to_pil(array: np.ndarray) -> Image.Image:
    """A tfds image (H, W, C uint8; C = 1 or 3) as an RGB PIL image (grey tiled to 3 channels)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def open_source(task: Task | str, data_root: str | None = None, tfds_dir: str | None = None):
    if (data_root is None) == (tfds_dir is None):
        raise ValueError("give exactly one of data_root (folder format) and tfds_dir (tensorflow-datasets)")
    return FolderSource(data_root, task) if data_root is not None else TfdsSource(tfds_dir, task)


def decode_split(source, split: str, img_size: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split, resized to img_size x img_size (bicubic), as uint8 (N, S, S, 3), and labels."""
    n = source.size(split)
    images = np.empty((n, img_size, img_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)

    def one(i: int) -> None:
        img, labels[i] = source.load(split, i)
        images[i] = np.asarray(img.resize((img_size, img_size), Image.BICUBIC))

    # PIL releases the GIL while decoding and resizing; the tfds readers are not shared across threads safely
    # for every backend, so tfds sources decode in one thread.
    workers = 1 if isinstance(source, TfdsSource) else (threads or min(8, os.cpu_count() or 1))
    if workers == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(n)))
    return images, labels


# -- serving ---------------------------------------------------------------------------------------------------------
class BatchArrays(Dataset):
    """Whole batches from in-memory arrays: indexed by a list of indices (with ``batch_size=None`` and a
    BatchSampler). Indices past the end are padding: zero images with PAD_LABEL, so that every evaluation batch
    has the same shape (one compiled graph) and the padding counts for nothing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padded_len: int | None = None):
        self.images, self.labels = images, labels
        self.padded_len = padded_len or len(labels)

    def __len__(self):
        return self.padded_len

    def __getitem__(self, indices):
        indices = torch.as_tensor(indices)
        real = indices[indices < len(self.labels)]
        x, y = self.images[real], self.labels[real]
        pad = len(indices) - len(real)
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            y = torch.cat([y, y.new_full((pad,), PAD_LABEL)])
        return x, y


class VtabDataModule(L.LightningDataModule):
    """One VTAB-1K run's data: training on ``train_split``, evaluation on ``eval_split`` (val200 while the lr
    is chosen, test for the final runs). Images stay uint8 until they reach the device, where they become
    float and are normalized with the ImageNet mean and std.

    Args:
        task: task name (any folder spelling).
        data_root / tfds_dir: the folder-format root or the tfds data dir (exactly one).
        train_split / eval_split: splits of ``tasks.vtab.tasks.SPLITS``.
        img_size: resize target (224 in the paper).
        batch_size / eval_batch_size: training and evaluation batch sizes.
        seed: seeds the order of the training batches.
        arrays: ``{split: (images, labels)}`` already decoded (``decode_split``), which skips the source.
    """

    def __init__(self, task: str, data_root: str | None = None, tfds_dir: str | None = None,
                 train_split: str = "train800", eval_split: str = "val200", img_size: int = 224,
                 batch_size: int = 64, eval_batch_size: int = 256, seed: int = 0,
                 arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        for split in (train_split, eval_split):
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; the VTAB-1K splits are {', '.join(SPLITS)}")
        self.task = get_task(task)
        self.data_root, self.tfds_dir = data_root, tfds_dir
        self.train_split, self.eval_split = train_split, eval_split
        self.img_size, self.batch_size, self.eval_batch_size, self.seed = img_size, batch_size, eval_batch_size, seed
        self.arrays = dict(arrays or {})
        self.normalize = DeviceNormalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, scale=255)  # of uint8 pixels

    def setup(self, stage: str | None = None):
        missing = [s for s in (self.train_split, self.eval_split) if s not in self.arrays]
        if missing:
            source = open_source(self.task, self.data_root, self.tfds_dir)
            for split in missing:
                self.arrays[split] = decode_split(source, split, self.img_size)

    def _dataset(self, split: str, padded_to: int | None = None) -> BatchArrays:
        images, labels = self.arrays[split]
        n = len(labels)
        padded = math.ceil(n / padded_to) * padded_to if padded_to else None
        return BatchArrays(torch.from_numpy(images), torch.from_numpy(labels), padded)

    def _pin(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self):
        data = self._dataset(self.train_split)
        order = RandomSampler(range(len(data)), generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(data, sampler=BatchSampler(order, self.batch_size, drop_last=False), batch_size=None,
                          pin_memory=self._pin())

    def val_dataloader(self):
        batch = min(self.eval_batch_size, len(self.arrays[self.eval_split][1]))  # val200 fits in one batch
        data = self._dataset(self.eval_split, padded_to=batch)
        batches = BatchSampler(SequentialSampler(range(len(data))), batch, drop_last=False)
        return DataLoader(data, sampler=batches, batch_size=None, pin_memory=self._pin())

    def test_dataloader(self):
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        x = self.normalize(x.permute(0, 3, 1, 2).float())
        return x.contiguous(), y
