"""MNIST and CIFAR-10 data modules on fixture files in torchvision's on-disk formats (idx-ubyte files, pickled
CIFAR batches), and their configs end to end through the `vil` command."""
from __future__ import annotations

import csv
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.cli import main as vil_main
from tasks.mnist_cifar.data import CIFAR10DataModule, MNISTDataModule, random_crop_flip

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "mnist_cifar"


def write_mnist(root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> None:
    """The four uncompressed idx files torchvision's MNIST reads from ``root/MNIST/raw``."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):  # a bright bar whose row encodes the label: learnable
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 10, seed: int = 0) -> np.ndarray:
    """The pickled batches of the CIFAR-10 python release under ``root/cifar-10-batches-py``; returns the
    first training batch's images as (N, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    first = None
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data}, f)
        if first is None:
            first = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return first


def test_random_crop_flip_matches_a_per_image_loop():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    state = torch.get_rng_state()
    out = random_crop_flip(x, padding=2, hflip=True)
    torch.set_rng_state(state)
    dy = torch.randint(0, 5, (6,))
    dx = torch.randint(0, 5, (6,))
    flip = torch.rand(6) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        expected = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 7]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected), i
    assert flip.any() and not flip.all()  # both branches exercised with this seed


def test_mnist_reads_the_idx_files(tmp_path):
    write_mnist(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path), val_size=10, batch_size=8)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [30, 10, 12]
    x, y = dm.splits["test"][3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8 and int(y) == 3
    assert x[0, 8:10, 4:24].eq(255).all()  # label 3's bar, read back from the file


def test_cifar10_reads_the_pickled_batches_and_checks_checksums(tmp_path):
    first = write_cifar10(tmp_path)
    # The fixture files are not the release's: torchvision's MD5 check refuses them, with a way out.
    with pytest.raises(ValueError, match="verify_checksums false"):
        CIFAR10DataModule(root=str(tmp_path), val_size=4).setup("fit")
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=4, verify_checksums=False, split_seed=0)
    with pytest.warns(UserWarning, match="checksums not verified"):
        dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [36, 4, 10]
    all_train = torch.cat([dm.splits["train"].tensors[0], dm.splits["val"].tensors[0]])
    # Image 0 of data_batch_1 is in one of the two splits, as (C, H, W) uint8 of the stored HWC pixels.
    target = torch.from_numpy(first[0]).permute(2, 0, 1)
    assert any(torch.equal(img, target) for img in all_train)


def test_missing_files_name_the_files_and_the_download_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*download true"):
        MNISTDataModule(root=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*download true"):
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")


def _fit(config: Path, data_root: Path, run_dir: Path, *extra: str) -> list[dict]:
    args = ["fit", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--data.init_args.root", str(data_root), "--data.init_args.batch_size", "8", *extra]
    assert vil_main(args) == 0
    with open(run_dir / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_mnist_config_trains_end_to_end(tmp_path):
    write_mnist(tmp_path / "data")
    rows = _fit(CONFIGS / "vil_mnist.yaml", tmp_path / "data", tmp_path / "runs",
                "--data.init_args.val_size", "10", "--model.init_args.model_kwargs",
                '{"dim": 32, "depth": 1, "patch_size": 7, "img_size": 28, "in_chans": 1}')
    val = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val) == 2 and all(0.0 <= v <= 1.0 for v in val)
    assert (tmp_path / "runs" / "version_0" / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("config", ["vil_cifar10.yaml", "vil_cifar10_transfer.yaml"])
def test_cifar10_configs_train_end_to_end(tmp_path, config):
    write_cifar10(tmp_path / "data")
    extra = ["--data.init_args.val_size", "8", "--data.init_args.verify_checksums", "false",
             "--model.init_args.model", "vil2_nano", "--model.init_args.model_kwargs",
             '{"dim": 32, "depth": 1, "patch_size": 8, "img_size": 32}']
    if "transfer" in config:  # resizing on the device to the backbone's size: 32 -> 48 here instead of 224
        extra += ["--data.init_args.img_size", "48", "--model.init_args.model_kwargs",
                  '{"dim": 32, "depth": 1, "patch_size": 8, "img_size": 48}']
    rows = _fit(CONFIGS / config, tmp_path / "data", tmp_path / "runs", *extra)
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert losses and all(np.isfinite(losses))
    assert os.path.isfile(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
