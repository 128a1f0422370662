"""ImageNet-1K in the standard folder layout, ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``
(class index = position of the wnid in the sorted list, torchvision's ImageFolder convention), with the
augmentations of the paper's Table 10 in torchvision transforms v2:

- train: RandomResizedCrop(scale 0.08-1, bicubic), horizontal flip, 3-Augment (one of grayscale, solarize,
  Gaussian blur sigma 0.1-2, chosen uniformly, as in DeiT-III), ColorJitter(0.3, 0.3, 0.3), ImageNet mean/std;
  mixup/cutmix run on the batch in the module (timm's Mixup).
- eval: resize the shorter side to img_size / crop_pct (bicubic), center crop img_size (crop ratio 1.0).

Files that do not decode are skipped with a warning and counted (``ImageNetDataModule.skipped_files``): in
training the next file of the split takes their place (the batch keeps its size, which batch mixing needs), in
evaluation they are left out of the batch (no image is counted twice).

The training sampler is resumable: its order is fixed by (seed, epoch), every sample's augmentation by
(seed, epoch, index), and the data module's state in a checkpoint holds the position in the epoch, so a run
resumed from a mid-epoch checkpoint sees the rest of that epoch exactly as an unbroken run would. Evaluation
shards the split over the processes without padding: every image is evaluated exactly once.

``decode="gpu"`` reads the files' bytes in the workers and decodes the JPEGs on the GPU in batches
(``torchvision.io.decode_jpeg(device="cuda")``), then runs the same augmentations there: in training on the
whole batch with per-sample parameters (``gpu_augment.BatchedTrainAugment``), in evaluation image by image.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence

import lightning as L
import torch
import torchvision
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import v2

from tasks.imagenet.gpu_augment import BLUR_SIGMA, BatchedTrainAugment, blur_kernel_size

BICUBIC = v2.InterpolationMode.BICUBIC
# Errors PIL raises for files that are not (whole) images: truncated or garbage data, unknown formats.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DatasetLayoutError(ValueError):
    """An ImageNet folder that does not have the expected layout or classes."""


# -- folders -------------------------------------------------------------------------------------------------------------
def list_classes(split_dir: str) -> list[str]:
    """The sorted class folder names of a split; DatasetLayoutError for a missing split or one without classes."""
    if not os.path.isdir(split_dir):
        parent = os.path.dirname(os.path.normpath(split_dir))
        present = sorted(d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))) \
            if os.path.isdir(parent) else None
        found = f"; {parent} holds {present}" if present is not None else f"; {parent} does not exist either"
        raise DatasetLayoutError(f"split folder {split_dir} not found (expected <root>/<split>/<wnid>/*.JPEG{found})")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DatasetLayoutError(f"{split_dir} has no class folders (expected {split_dir}/<wnid>/*.JPEG)")
    return classes


def scan_split(root: str, split: str, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image of ``<root>/<split>`` and the split's sorted classes. With ``classes``
    given, the split must have exactly those (the index of a class is its position there)."""
    split_dir = os.path.join(root, split)
    found = list_classes(split_dir)
    if classes is not None and list(classes) != found:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DatasetLayoutError(
            f"the classes of {split_dir} differ from the training classes: {len(extra)} not in training "
            f"{_few(extra)}, {len(missing)} training classes missing {_few(missing)}")
    try:
        samples = make_dataset(split_dir, {c: i for i, c in enumerate(found)}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision names the class folders without images
        raise DatasetLayoutError(f"{split_dir}: {e}") from None
    return samples, found


def _few(items: Sequence[str], n: int = 5) -> str:
    return "[" + ", ".join(items[:n]) + (", ..." if len(items) > n else "") + "]"


# -- transforms ----------------------------------------------------------------------------------------------------------
def three_augment(blur_sigma: tuple[float, float] = BLUR_SIGMA) -> v2.RandomChoice:
    """DeiT-III's 3-Augment: one of grayscale, solarization (threshold 128 of 255) and Gaussian blur, each with
    probability 1/3. The blur kernel spans +-3 sigma of the largest sigma."""
    kernel = blur_kernel_size(blur_sigma)
    return v2.RandomChoice([
        v2.Grayscale(num_output_channels=3),
        v2.RandomSolarize(threshold=128, p=1.0),
        v2.GaussianBlur(kernel_size=kernel, sigma=blur_sigma),
    ])


def train_augment(img_size: int, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                  three_aug: bool = True, color_jitter: float = 0.3) -> v2.Compose:
    """The geometric and photometric training augmentations of Table 10 on an RGB PIL image or uint8 tensor."""
    steps = [v2.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=BICUBIC, antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if three_aug:
        steps.append(three_augment())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps)


def eval_resize(img_size: int, crop_pct: float = 1.0) -> v2.Compose:
    """Resize the shorter side to img_size / crop_pct (bicubic), then center crop img_size."""
    return v2.Compose([v2.Resize(int(math.floor(img_size / crop_pct)), interpolation=BICUBIC, antialias=True),
                       v2.CenterCrop(img_size)])


def to_normalized(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


# -- datasets ------------------------------------------------------------------------------------------------------------
class ImageFolderSplit(Dataset):
    """One split's images. An item is ``(image, label, skipped)``; ``skipped`` names a file that did not decode
    ("" when none did). Keys are indices or ``(index, seed)`` pairs from ``ResumableSampler``: with a seed, the
    transform's random draws come from it alone.

    Args:
        samples: (path, label) pairs.
        transform: applied to the RGB PIL image (``raw=False``).
        raw: return the file's bytes as a uint8 tensor instead of decoding it (GPU decoding).
        replace_corrupt: in place of a file that does not decode, take the next one (training); else the item
            is None and the collate function leaves it out.
    """

    def __init__(self, samples: list[tuple[str, int]], transform=None, raw: bool = False,
                 replace_corrupt: bool = False):
        self.samples, self.transform, self.raw, self.replace_corrupt = samples, transform, raw, replace_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        if self.raw:
            with open(path, "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), label, ""
        skipped = ""
        for attempt in range(min(len(self.samples), 100)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")  # grayscale, CMYK, palette and PNG files alike
                break
            except DECODE_ERRORS as e:
                warnings.warn(f"skipping {path}: not a decodable image ({type(e).__name__}: {e})", stacklevel=2)
                skipped = skipped or path
                if not self.replace_corrupt:
                    return None, label, path
        else:
            raise RuntimeError(f"{len(self.samples)} files from {self.samples[index][0]} on do not decode")
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image = self.transform(image)
        return image, label, skipped


def collate_skipping(items):
    """default_collate of (image, label, skipped) items, leaving out those without an image. Returns
    (images, labels, skipped paths)."""
    skipped = [s for _, _, s in items if s]
    kept = [(x, y) for x, y, _ in items if x is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    x, y = default_collate(kept)
    return x, y, skipped


def collate_raw(items):
    """Raw file bytes stay a list (they differ in length); labels are stacked."""
    return [x for x, _, _ in items], torch.tensor([y for _, y, _ in items]), []


# -- sampling ------------------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (SplitMix-style mixing of the three numbers)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (so Lightning keeps it under DDP) that yields ``(index, sample seed)`` keys.

    The order of an epoch is a permutation fixed by (seed, epoch), dealt to the ranks round-robin. Training pads
    the permutation to a multiple of the world size with its first samples, as torch's sampler does; evaluation
    (``pad=False``) does not, so that each sample is seen exactly once (ranks then differ by at most one sample).
    ``resume(epoch, start)`` skips this rank's first ``start`` samples of that epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, pad: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad = pad
        n = len(dataset)
        if not pad:
            self.num_samples = len(range(rank, n, num_replicas))
            self.total_size = n
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, start: int) -> None:
        self._resume = (epoch, start)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.pad and len(order) < self.total_size:
            repeats = math.ceil((self.total_size - len(order)) / len(order))
            order += (order * repeats)[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        for index in mine[start:]:
            yield index, sample_seed(self.seed, self.epoch, index)


# -- GPU decoding --------------------------------------------------------------------------------------------------------
def decode_images(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode file bytes to RGB uint8 (3, H, W) tensors on ``device``: all JPEGs in one batched
    ``decode_jpeg`` call; when that fails, file by file, with torchvision's generic decoder and then PIL for
    what the JPEG decoder does not take (PNG, CMYK). None for a file nothing decodes."""
    mode = torchvision.io.ImageReadMode.RGB
    try:
        return list(torchvision.io.decode_jpeg(datas, mode=mode, device=device))
    except RuntimeError:
        pass
    out = []
    for data in datas:
        try:
            out.append(torchvision.io.decode_jpeg(data, mode=mode, device=device))
            continue
        except RuntimeError:
            pass
        try:
            out.append(torchvision.io.decode_image(data, mode=mode).to(device))
            continue
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                out.append(v2.functional.pil_to_tensor(img.convert("RGB")).to(device))
        except DECODE_ERRORS:
            out.append(None)
    return out


# -- data module ---------------------------------------------------------------------------------------------------------
class ImageNetDataModule(L.LightningDataModule):
    """ImageNet-1K (or any ImageFolder tree with train/val splits) with the recipe of Table 10.

    Args:
        root: the folder holding ``train/`` and ``val/`` (each with one folder per class).
        batch_size: per process; the global batch is batch_size x devices x nodes x accumulate_grad_batches.
        img_size: training crop (192 in pre-training, 224 in fine-tuning); eval_img_size: evaluation crop
            (default: img_size).
        crop_pct: evaluation center-crop ratio (1.0: resize the shorter side to the crop size).
        scale / hflip / three_augment / color_jitter: the training augmentations (Table 10's values by default).
        seed: fixes the training order and augmentations (independent of the global seed).
        decode: ``cpu`` (PIL in the workers) or ``gpu`` (file bytes from the workers, decoded and augmented on
            the GPU; for hosts whose cores cannot decode as fast as the model trains).
        train_split / val_split / test_split: folder names under root (ImageNet's test labels are not public:
            ``test`` evaluates the val split by default).
    """

    def __init__(self, root: str, batch_size: int = 256, num_workers: int = 8, img_size: int = 192,
                 eval_img_size: int | None = None, crop_pct: float = 1.0, scale: tuple[float, float] = (0.08, 1.0),
                 hflip: float = 0.5, three_augment: bool = True, color_jitter: float = 0.3, seed: int = 0,
                 decode: str = "cpu", train_split: str = "train", val_split: str = "val", test_split: str = "val",
                 pin_memory: bool = True, persistent_workers: bool = True, prefetch_factor: int | None = None):
        super().__init__()
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode={decode!r}: expected 'cpu' or 'gpu'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.classes: list[str] | None = None
        self.samples: dict[str, list[tuple[str, int]]] = {}
        self.skipped_files: list[str] = []
        self._train_sampler: ResumableSampler | None = None
        self._resume: dict | None = None

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    # -- setup ---------------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None):
        hp = self.hparams
        if not os.path.isdir(hp.root):
            raise DatasetLayoutError(f"data root {hp.root} not found (expected <root>/train/<wnid>/*.JPEG and "
                                     f"<root>/val/<wnid>/*.JPEG)")
        splits = {"fit": [hp.train_split, hp.val_split], "validate": [hp.val_split], "test": [hp.test_split],
                  "predict": [hp.val_split]}.get(stage, [hp.train_split, hp.val_split])
        for split in splits:
            if split not in self.samples:
                self.samples[split], classes = scan_split(hp.root, split, self.classes)
                self.classes = self.classes or classes

    def _eval_size(self) -> int:
        return self.hparams.eval_img_size or self.hparams.img_size

    def _dist(self) -> tuple[int, int]:
        kwargs = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)

    def _loader(self, dataset: Dataset, sampler, collate, drop_last: bool) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers
        generator = torch.Generator().manual_seed(hp.seed)  # worker seeds without drawing from the global RNG
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate, drop_last=drop_last, generator=generator,
                          pin_memory=hp.pin_memory and torch.cuda.is_available(),
                          persistent_workers=hp.persistent_workers and workers > 0,
                          prefetch_factor=hp.prefetch_factor if workers > 0 else None)

    def train_dataloader(self):
        hp = self.hparams
        gpu = hp.decode == "gpu"
        make_augment = BatchedTrainAugment if gpu else train_augment
        augment = make_augment(hp.img_size, hp.scale, hp.hflip, hp.three_augment, hp.color_jitter)
        self.train_augment = augment
        dataset = ImageFolderSplit(self.samples[hp.train_split], None if gpu else v2.Compose([augment, to_normalized()]),
                                   raw=gpu, replace_corrupt=True)
        replicas, rank = self._dist()
        sampler = ResumableSampler(dataset, replicas, rank, shuffle=True, seed=hp.seed, pad=True)
        if self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            # Lightning creates the first iterator before it sets the resumed epoch; with workers that iterator
            # already draws indices, so the sampler must be in that epoch from the start.
            sampler.set_epoch(self._resume["epoch"])
            self._resume = None
        self._train_sampler = sampler
        if len(sampler) < self.batch_size:
            raise DatasetLayoutError(f"{hp.train_split} gives {len(sampler)} images per process, fewer than one "
                                     f"batch of {self.batch_size} (training drops incomplete batches)")
        return self._loader(dataset, sampler, collate_raw if gpu else collate_skipping, drop_last=True)

    def _eval_dataloader(self, split: str):
        gpu = self.hparams.decode == "gpu"
        resize = eval_resize(self._eval_size(), self.hparams.crop_pct)
        self.eval_resize = resize
        dataset = ImageFolderSplit(self.samples[split], None if gpu else v2.Compose([resize, to_normalized()]), raw=gpu)
        replicas, rank = self._dist()
        sampler = ResumableSampler(dataset, replicas, rank, shuffle=False, seed=self.hparams.seed, pad=False)
        return self._loader(dataset, sampler, collate_raw if gpu else collate_skipping, drop_last=False)

    def val_dataloader(self):
        return self._eval_dataloader(self.hparams.val_split)

    def test_dataloader(self):
        return self._eval_dataloader(self.hparams.test_split)

    def predict_dataloader(self):
        return self._eval_dataloader(self.hparams.val_split)

    # -- batches -------------------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y, skipped = batch
        if skipped:
            self.skipped_files.extend(skipped)
        if self.hparams.decode == "gpu":
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            x, y = self.gpu_batch(x, y, device, training=self.trainer is not None and self.trainer.training)
        return x, y

    def gpu_batch(self, datas: list[torch.Tensor], labels: torch.Tensor, device, training: bool):
        """Decode a batch of file bytes on ``device`` and augment it there. A file that does not decode is
        counted and, in training, replaced by a copy of another image of the batch (the batch keeps its size)."""
        images = decode_images(datas, device)
        bad = [i for i, img in enumerate(images) if img is None]
        if bad:
            self.skipped_files.extend(f"<batch item {i}>" for i in bad)
            warnings.warn(f"skipping {len(bad)} files of a batch that do not decode", stacklevel=2)
        keep = [i for i, img in enumerate(images) if img is not None]
        if not keep:
            return torch.empty(0, device=device), labels[:0].to(device)
        if training:
            index = [i if images[i] is not None else keep[0] for i in range(len(images))]
            x = self.train_augment([images[i] for i in index])
        else:
            index = keep
            x = torch.stack([self.eval_resize(images[i]) for i in index])
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        x = v2.functional.normalize(x, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
        return x, labels[index].to(device)

    # -- resumable state -----------------------------------------------------------------------------------------------
    def state_dict(self):
        """Where the training epoch stands: the epoch and the batches of it whose steps the checkpoint holds."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {"skipped_files": len(self.skipped_files)}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed, "seed": self.hparams.seed,
                "skipped_files": len(self.skipped_files)}

    def load_state_dict(self, state):
        if "epoch" in state:
            if state.get("seed") != self.hparams.seed:
                warnings.warn(f"the checkpoint's data seed {state.get('seed')} differs from this run's "
                              f"{self.hparams.seed}: the resumed epoch's order differs from the interrupted one")
            self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
            # Lightning warns that a mid-epoch resume repeats data unless the loader is resumable; this one is.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
