"""The batched training augmentation of the GPU decoding path against torchvision's transforms and functionals
applied image by image (the reference), its random draws, and its use in ImageNetDataModule.gpu_batch."""
import io
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from tasks.imagenet import gpu_augment as G
from tasks.imagenet.data import ImageNetDataModule, decode_images

KERNEL = 13  # data.three_augment's kernel for sigma up to 2
JITTER_FNS = {G.BRIGHTNESS: F.adjust_brightness, G.CONTRAST: F.adjust_contrast, G.SATURATION: F.adjust_saturation}


def _images(n, seed=0, sizes=((37, 53), (64, 41), (48, 48))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *sizes[i % len(sizes)]), dtype=torch.uint8, generator=g) for i in range(n)]


def _batch(n, seed=0, dtype=torch.uint8):
    x = torch.randint(0, 256, (n, 3, 29, 35), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def _reference_pipeline(img, p, i, size):
    """One image through torchvision's functionals with sample i's parameters, in train_augment's order."""
    out = F.resized_crop(img, *p.boxes[i], size=[size, size], interpolation=v2.InterpolationMode.BICUBIC,
                         antialias=True)
    if p.flip[i]:
        out = F.horizontal_flip(out)
    branch = int(p.three_augment[i])
    if branch == G.GRAYSCALE:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    elif branch == G.SOLARIZE:
        out = F.solarize(out, threshold=128)
    elif branch == G.BLUR:
        out = F.gaussian_blur(out, [KERNEL, KERNEL], [float(p.sigma[i])] * 2)
    for op in p.jitter_order[i].tolist():
        out = JITTER_FNS[op](out, float(p.jitter_factors[i, op]))
    return out


def test_crops_follow_v2_random_resized_crop():
    """Same global seed, same boxes: the batched crops equal v2.RandomResizedCrop's outputs, image by image."""
    images = _images(6)
    torch.manual_seed(3)
    ref = [v2.RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)(img) for img in images]
    torch.manual_seed(3)
    aug = G.BatchedTrainAugment(24, hflip=0.0, three_aug=False, color_jitter=0.0)
    out = aug(images)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.uint8
    assert torch.equal(out, torch.stack(ref))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_per_sample_jitter_ops_equal_functionals(dtype):
    x = _batch(7, dtype=dtype)
    factors = torch.tensor([0.7, 0.81, 0.95, 1.0, 1.07, 1.22, 1.3])
    for op, fn in ((G.BRIGHTNESS, G.adjust_brightness), (G.CONTRAST, G.adjust_contrast),
                   (G.SATURATION, G.adjust_saturation)):
        out = fn(x, factors)
        ref = torch.stack([JITTER_FNS[op](x[i], float(factors[i])) for i in range(len(x))])
        assert out.dtype == dtype
        if dtype == torch.uint8:
            assert torch.equal(out, ref), op
        else:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_per_sample_gaussian_blur_equals_functional(dtype):
    x = _batch(5, seed=1, dtype=dtype)
    sigma = torch.tensor([0.1, 0.45, 1.0, 1.6, 2.0])
    out = G.gaussian_blur(x, KERNEL, sigma)
    ref = torch.stack([F.gaussian_blur(x[i], [KERNEL, KERNEL], [float(s)] * 2) for i, s in enumerate(sigma)])
    if dtype == torch.uint8:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # the kernels, against a float64 Gaussian normalised to sum 1 (torchvision's positions: +-(k-1)/(2 sqrt 2))
    pos = torch.linspace(-(KERNEL - 1) / (2 * math.sqrt(2)), (KERNEL - 1) / (2 * math.sqrt(2)), KERNEL,
                         dtype=torch.float64)
    gauss = torch.exp(-(pos[None] / sigma.double()[:, None]) ** 2)
    torch.testing.assert_close(G.gaussian_kernels1d(KERNEL, sigma).double(), gauss / gauss.sum(1, keepdim=True),
                               atol=1e-6, rtol=0)


def test_whole_augmentation_equals_per_image_functionals():
    """Every branch, flip and jitter order present: the batch equals torchvision's functionals image by image."""
    images = _images(12, seed=2)
    aug = G.BatchedTrainAugment(20)
    torch.manual_seed(0)
    p = aug.sample(images)
    p.three_augment = torch.tensor([0, 1, 2, -1] * 3)
    p.flip = torch.tensor([True, False] * 6)
    p.jitter_order = torch.tensor(list(itertools.permutations(range(3))) * 2)
    out = aug.apply(images, p)
    ref = torch.stack([_reference_pipeline(img, p, i, 20) for i, img in enumerate(images)])
    assert out.shape == (12, 3, 20, 20) and out.dtype == torch.uint8
    assert torch.equal(out, ref)
    # the augmentations did something: grayscale rows have equal channels, solarized ones differ from the crop
    assert torch.equal(out[0, 0], out[0, 1]) and not torch.equal(out[1, 0], out[1, 1])


def test_draws_follow_the_transforms_distributions():
    n = 3000
    images = [torch.zeros(3, 40, 60, dtype=torch.uint8)] * n
    torch.manual_seed(0)
    p = G.BatchedTrainAugment(16).sample(images)
    tol = 4 * math.sqrt(0.25 / n)  # 4 standard deviations of a frequency
    for branch in (G.GRAYSCALE, G.SOLARIZE, G.BLUR):
        assert abs(float((p.three_augment == branch).float().mean()) - 1 / 3) < tol
    assert abs(float(p.flip.float().mean()) - 0.5) < tol
    assert float(p.jitter_factors.min()) >= 0.7 and float(p.jitter_factors.max()) <= 1.3
    assert abs(float(p.jitter_factors.mean()) - 1.0) < 0.01
    assert float(p.sigma.min()) >= 0.1 and float(p.sigma.max()) <= 2.0
    assert torch.equal(p.jitter_order.sort(dim=1).values, torch.arange(3).expand(n, 3))
    orders, counts = p.jitter_order.unique(dim=0, return_counts=True)
    assert len(orders) == 6 and (counts.float() / n - 1 / 6).abs().max() < tol
    area = torch.tensor([h * w / (40 * 60) for _, _, h, w in p.boxes])
    assert float(area.min()) >= 0.07 and float(area.max()) <= 1.0
    off = G.BatchedTrainAugment(16, hflip=0.0, three_aug=False, color_jitter=0.0).sample(images[:50])
    assert not off.flip.any() and (off.three_augment == -1).all() and off.jitter_order is None


def _jpeg(h, w, seed):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_gpu_batch_uses_the_batched_augmentation(tmp_path):
    for split in ("train", "val"):
        for c in ("n0", "n1"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}.JPEG").write_bytes(_jpeg(30 + 3 * i, 40, i).numpy().tobytes())
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, img_size=16, decode="gpu")
    dm.setup("fit")
    datas, labels, _ = next(iter(dm.train_dataloader()))
    assert isinstance(dm.train_augment, G.BatchedTrainAugment)
    torch.manual_seed(5)
    x, y = dm.gpu_batch(datas, labels, torch.device("cpu"), training=True)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and torch.equal(y, labels)
    torch.manual_seed(5)
    u8 = G.BatchedTrainAugment(16)(decode_images(datas, "cpu")).double() / 255
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(x.double(), (u8 - mean) / std, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_batched_augmentation_on_cuda_matches_per_image_functionals():
    images = [img.cuda() for img in _images(12, seed=4, sizes=((375, 500), (333, 500), (500, 400)))]
    aug = G.BatchedTrainAugment(224)
    p = aug.sample(images)
    p.three_augment = torch.tensor([0, 1, 2, -1] * 3)
    out = aug.apply(images, p)
    ref = torch.stack([_reference_pipeline(img, p, i, 224) for i, img in enumerate(images)])
    diff = (out.int() - ref.int()).abs()
    # the same formulas; CUDA may round a few values differently (fused multiply-adds, conv algorithms)
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
