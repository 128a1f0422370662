"""scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes): shipped with scikit-learn, so it
trains anywhere without downloads. Used by the embedded default job and in tests."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(L.LightningDataModule):
    """Stratified train / val / test split of the digits (fixed by ``split_seed``); pixel values 0..16
    are scaled to [0, 1] and standardized with the training split's mean and std.

    Args:
        test_fraction / val_fraction: shares of all images held out for testing and validation.
        shift_augment: random translation by up to this many pixels during training (zero-padded).
    """

    num_classes = 10
    in_chans = 1
    img_size = 8

    def __init__(self, batch_size: int = 64, test_fraction: float = 0.2, val_fraction: float = 0.1,
                 split_seed: int = 0, shift_augment: int = 1, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None):
        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        y = digits.target.astype(np.int64)
        idx = np.arange(len(y))
        hp = self.hparams
        rest, test = train_test_split(idx, test_size=hp.test_fraction, stratify=y, random_state=hp.split_seed)
        val_share = hp.val_fraction / (1 - hp.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=hp.split_seed)
        mean, std = x[train].mean(), x[train].std()
        images = torch.from_numpy((x - mean) / std).unsqueeze(1)  # (N, 1, 8, 8)
        labels = torch.from_numpy(y)
        self.splits = {name: TensorDataset(images[ids], labels[ids]) for name, ids in
                       (("train", train), ("val", val), ("test", test))}

    def on_after_batch_transfer(self, batch, dataloader_idx):
        s = self.hparams.shift_augment
        if self.trainer is not None and self.trainer.training and s > 0:
            x, y = batch
            padded = torch.nn.functional.pad(x, (s, s, s, s))
            dx, dy = torch.randint(0, 2 * s + 1, (2,)).tolist()
            batch = padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]], y
        return batch

    def _loader(self, split: str, shuffle: bool):
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)
