"""MNIST and CIFAR-10 through torchvision's dataset classes: downloaded when ``download=True`` and online, else read
from the standard files under ``root`` (``MNIST/raw/*-ubyte`` and ``cifar-10-batches-py/``).

The images are small enough to live on the accelerator: each split is held as one uint8 tensor, batches are
moved as uint8 and augmented, resized and normalized there (``on_after_batch_transfer``), so a 32x32 job is
not limited by per-image PIL transforms in DataLoader workers."""
from __future__ import annotations

import os
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchvision.datasets import CIFAR10, MNIST

from tasks.transforms import DeviceNormalize


class _UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 that checks only that the files exist (for copies whose checksums differ from the
    release, e.g. re-pickled ones)."""

    train_list = [(name, None) for name, _ in CIFAR10.train_list]
    test_list = [(name, None) for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def _missing_files_error(name: str, root: str, expected: list[str], download: bool) -> FileNotFoundError:
    missing = [p for p in expected if not os.path.isfile(p)]
    hint = "" if download else "; pass --data.init_args.download true to download it (needs internet access)"
    return FileNotFoundError(f"{name} not found under {root}: missing {', '.join(missing)}{hint}")


class SmallImageDataModule(L.LightningDataModule):
    """A torchvision dataset of small images as uint8 tensors, with a validation split held out of the
    official training set (fixed by ``split_seed``) and the official test set for testing.

    Args:
        root: folder holding the dataset's standard files (or where to download them).
        download: let torchvision download the files when they are missing.
        val_size: training images held out for validation.
        img_size: resize to this size on the device (bicubic), e.g. 224 for a backbone pre-trained on ImageNet;
            None keeps the native size.
        random_crop_padding: training augmentation: random crop of the native size after zero padding by this
            many pixels (0 disables it).
        hflip: training augmentation: random horizontal flip.
        mean / std: normalization per channel, on [0, 1] pixel values (None: the dataset's usual values).
    """

    name: str = ""
    native_size: int = 0
    in_chans: int = 0
    num_classes = 10
    default_mean: tuple[float, ...] = ()
    default_std: tuple[float, ...] = ()

    def __init__(self, root: str = "data", download: bool = False, batch_size: int = 128, val_size: int = 5000,
                 split_seed: int = 0, img_size: int | None = None, random_crop_padding: int = 0, hflip: bool = False,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.mean = tuple(mean or self.default_mean)
        self.std = tuple(std or self.default_std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"{self.name}: mean and std need {self.in_chans} values, got {self.mean} and {self.std}")
        self.normalize = DeviceNormalize(self.mean, self.std)
        self.splits: dict[str, TensorDataset] = {}

    # -- subclasses ------------------------------------------------------------------------------------------------
    def load_split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, H, W[, C]) uint8, labels (N,)) of the official training or test split."""
        raise NotImplementedError

    # -- Lightning hooks ---------------------------------------------------------------------------------------------
    def prepare_data(self):
        if self.hparams.download:  # once per node, before setup runs on every rank
            self.load_split(train=True)
            self.load_split(train=False)

    def setup(self, stage: str | None = None):
        if self.splits:
            return
        images, labels = self.load_split(train=True)
        train = self._tensors(images, labels)
        if not 0 <= self.hparams.val_size < len(train):
            raise ValueError(f"val_size={self.hparams.val_size} must be in [0, {len(train)}) for {self.name}")
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        train_part, val_part = random_split(train, [len(train) - self.hparams.val_size, self.hparams.val_size],
                                            generator=generator)
        self.splits["train"] = TensorDataset(*(t[train_part.indices] for t in train.tensors))
        self.splits["val"] = TensorDataset(*(t[val_part.indices] for t in train.tensors))
        self.splits["test"] = self._tensors(*self.load_split(train=False))

    def _tensors(self, images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W) uint8
        y = torch.as_tensor(labels, dtype=torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: labels outside 0..{self.num_classes - 1} "
                             f"(found {int(y.min())}..{int(y.max())})")
        return TensorDataset(x, y)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, pin_memory=torch.cuda.is_available(),
                          drop_last=shuffle and len(self.splits[split]) > self.batch_size)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        training = self.trainer is not None and self.trainer.training
        if training and (self.hparams.random_crop_padding > 0 or self.hparams.hflip):
            x = random_crop_flip(x, self.hparams.random_crop_padding, self.hparams.hflip)
        x = x.float().div_(255)
        if self.hparams.img_size and self.hparams.img_size != x.shape[-1]:
            size = self.hparams.img_size
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
        return self.normalize(x), y


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """Per-image random crop of ``x``'s size out of ``x`` zero-padded by ``padding``, then a random horizontal
    flip of half of the images (when ``hflip``); one gather on the device for the whole batch."""
    b, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (padding,) * 4) if padding else x
    dy = torch.randint(0, 2 * padding + 1, (b,), device=device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=device)
    rows = dy[:, None] + torch.arange(h, device=device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=device)  # (B, W)
    if hflip:
        flip = torch.rand(b, device=device) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=device)[:, None, None, None]
    chan_idx = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class MNISTDataModule(SmallImageDataModule):
    """MNIST: 60,000 training and 10,000 test images of 28x28 handwritten digits (``<root>/MNIST/raw/``:
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``)."""

    name, native_size, in_chans = "MNIST", 28, 1
    default_mean, default_std = (0.1307,), (0.3081,)

    def load_split(self, train: bool):
        root = self.hparams.root
        try:
            ds = MNIST(root, train=train, download=self.hparams.download)
        except RuntimeError:
            raw = os.path.join(root, "MNIST", "raw")
            files = [os.path.join(raw, f"{p}-{k}-idx{n}-ubyte") for p in ("train", "t10k")
                     for k, n in (("images", 3), ("labels", 1))]
            raise _missing_files_error(self.name, root, files, self.hparams.download) from None
        return ds.data.numpy(), ds.targets.numpy()


class CIFAR10DataModule(SmallImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32x32 colour images of 10 classes (``<root>/cifar-10-batches-py/``:
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``, the release's pickled batches).

    Args (besides ``SmallImageDataModule``'s):
        verify_checksums: compare the files with the release's MD5 sums (torchvision's check); false accepts
            copies that differ (a warning says so).
    """

    name, native_size, in_chans = "CIFAR-10", 32, 3
    default_mean, default_std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, *args, verify_checksums: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.verify_checksums = verify_checksums

    def load_split(self, train: bool):
        root = self.hparams.root
        folder = os.path.join(root, CIFAR10.base_folder)
        files = [os.path.join(folder, name) for name, _ in CIFAR10.train_list + CIFAR10.test_list]
        files.append(os.path.join(folder, CIFAR10.meta["filename"]))
        cls = CIFAR10 if self.verify_checksums else _UncheckedCIFAR10
        try:
            ds = cls(root, train=train, download=self.hparams.download)
        except RuntimeError:
            if not all(os.path.isfile(f) for f in files):
                raise _missing_files_error(self.name, root, files, self.hparams.download) from None
            raise ValueError(f"{self.name} under {root}: the files differ from the release's checksums; pass "
                             f"--data.init_args.verify_checksums false to use them anyway") from None
        if not self.verify_checksums and train:
            warnings.warn(f"{self.name}: checksums not verified for {folder}", stacklevel=2)
        return ds.data, np.asarray(ds.targets)
