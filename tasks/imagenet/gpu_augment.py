"""The training augmentations of ``data.train_augment`` on a whole batch at once, for the GPU decoding path.

torchvision's v2 transforms draw one set of random parameters per call, so on the GPU they run image by image
and launch dozens of small kernels per image. Here each image is cropped and resized on its own (crops differ
in size: one ``resized_crop`` per image), the crops are stacked, and every later step runs on the batch with
per-sample random parameters:

- horizontal flip, and 3-Augment's grayscale and solarization: torchvision's functionals on the sub-batch the
  draw chose for them (they are batched already);
- Gaussian blur and ColorJitter's brightness / contrast / saturation: per-sample sigma and factors, which
  torchvision's functionals take only as one number per call, so they are written here as batched tensor
  math with the same formulas (``tests/test_imagenet_gpu_augment.py`` compares them with torchvision's
  functionals applied image by image).

The parameters follow torchvision's distributions: the crop box from ``transforms.RandomResizedCrop.get_params``,
flip with probability ``hflip``, one 3-Augment branch uniformly, sigma uniform in ``blur_sigma``, jitter factors
uniform in [1 - c, 1 + c], and the jitter steps in a uniformly random order per image (ColorJitter permutes
them per call). Draws come from torch's global CPU generator, as the transforms' do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

BICUBIC = v2.InterpolationMode.BICUBIC
GRAYSCALE, SOLARIZE, BLUR = 0, 1, 2  # 3-Augment's branches, in the order of data.three_augment
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # ColorJitter's steps (its fn_idx numbering)
BLUR_SIGMA = (0.1, 2.0)  # 3-Augment's Gaussian blur sigma range (DeiT-III)


def blur_kernel_size(blur_sigma: tuple[float, float]) -> int:
    """The blur kernel of 3-Augment: it spans +-3 sigma of the largest sigma."""
    return 2 * math.ceil(3 * blur_sigma[1]) + 1


@dataclass
class AugmentParams:
    """The random draws of one batch; all per sample, on the CPU.

    boxes: (top, left, height, width) crop of each image. flip: (B,) bool. three_augment: (B,) long, one of
    GRAYSCALE / SOLARIZE / BLUR, -1 for none. sigma: (B,) float32 blur sigma (used where BLUR). jitter_order:
    (B, 3) long, a permutation of BRIGHTNESS / CONTRAST / SATURATION per sample, or None for no jitter;
    jitter_factors: (B, 3) float32 factors of brightness, contrast and saturation.
    """

    boxes: list[tuple[int, int, int, int]]
    flip: torch.Tensor
    three_augment: torch.Tensor
    sigma: torch.Tensor
    jitter_order: torch.Tensor | None
    jitter_factors: torch.Tensor | None


# -- batched operations ------------------------------------------------------------------------------------------------
def resized_crops(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """Crop each (3, H, W) image to its box and resize it to (size, size) (bicubic, antialiased, as
    v2.RandomResizedCrop does); the stacked (B, 3, size, size) batch."""
    return torch.stack([F.resized_crop(img, *box, size=[size, size], interpolation=BICUBIC, antialias=True)
                        for img, box in zip(images, boxes)])


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor of parameters on ``device``. To CUDA through pinned memory without blocking: a plain copy
    would wait for the stream's queued work and so stall the kernel launches after it."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _on_subset(x: torch.Tensor, index: list[int], fn, *args) -> None:
    """x[index] = fn(x[index], *args), in place."""
    if index:
        index = _to_device(torch.tensor(index), x.device)
        x[index] = fn(x[index], *args)


def _sample_view(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n,) per-sample numbers as a float (n, 1, 1, 1) tensor on x's device, for broadcasting over images."""
    return _to_device(values.to(torch.float32), x.device).view(-1, 1, 1, 1)


def _blend(image1: torch.Tensor, image2: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` (ratio * image1 + (1 - ratio) * image2, clamped, back to the integer dtype) with
    one ratio per sample. addcmul rounds like torchvision's ``mul(ratio).add_(image2, alpha=1 - ratio)``."""
    r = _sample_view(ratio, image1)
    out = torch.addcmul(image1 * r, image2, 1 - r).clamp_(0, 1.0 if image1.is_floating_point() else 255)
    return out if image1.is_floating_point() else out.to(image1.dtype)


def _float_gray(x: torch.Tensor) -> torch.Tensor:
    """The (n, 1, H, W) float luminance the jitter blends with: for uint8 images torchvision floors it, which
    is what rgb_to_grayscale's cast to uint8 does to these non-negative values."""
    return F.rgb_to_grayscale(x).to(torch.float32)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional.adjust_brightness of each image of (n, 3, H, W) x with its own factor (n,)."""
    out = (x * _sample_view(factor, x)).clamp_(0, 1.0 if x.is_floating_point() else 255)
    return out if x.is_floating_point() else out.to(x.dtype)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional.adjust_contrast per image: blend with the image's mean luminance."""
    return _blend(x, _float_gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional.adjust_saturation per image: blend with the image's luminance."""
    return _blend(x, _float_gray(x), factor)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> None:
    """ColorJitter's brightness, contrast and saturation steps, in place, each image in its own order: at step t,
    every image whose t-th operation is k gets operation k, with its factor."""
    adjust = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation}
    for step in range(order.shape[1]):
        for op, fn in adjust.items():
            index = (order[:, step] == op).nonzero().flatten().tolist()
            _on_subset(x, index, fn, factors[index, op])


def gaussian_kernels1d(kernel_size: int, sigma: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, kernel_size) float32 Gaussian kernels, one per sigma, by torchvision's formula (a softmax over the
    kernel's positions; its 2-D kernel is the outer product of two of these)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    pos = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=device)
    sigma = _to_device(sigma.to(torch.float32), pos.device)
    return torch.softmax(pos.div(sigma[:, None]).pow(2).neg(), dim=-1)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """v2.functional.gaussian_blur(image, kernel_size, [s, s]) of each image of (n, C, H, W) x with its own
    sigma s: reflect padding, then the separable kernel as two depthwise convolutions over the n * C channels
    (one group per channel of each image; the same sum as torchvision's 2-D kernel, in fewer products)."""
    n, c, h, w = x.shape
    k = gaussian_kernels1d(kernel_size, sigma, x.device).repeat_interleave(c, dim=0)  # (n * C, k)
    pad = kernel_size // 2
    out = x.to(torch.float32) if not x.is_floating_point() else x
    out = torch.nn.functional.pad(out.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
    out = torch.nn.functional.conv2d(out, k.view(n * c, 1, kernel_size, 1).to(out.dtype), groups=n * c)
    out = torch.nn.functional.conv2d(out, k.view(n * c, 1, 1, kernel_size).to(out.dtype), groups=n * c)
    out = out.view(n, c, h, w)
    return out if x.is_floating_point() else out.round_().to(x.dtype)


def three_augment(x: torch.Tensor, choice: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> None:
    """3-Augment in place on a uint8 batch: grayscale (3 channels), solarize at 128 or Gaussian blur, per
    sample by ``choice``."""
    gray, solar, blur = ((choice == branch).nonzero().flatten().tolist() for branch in (GRAYSCALE, SOLARIZE, BLUR))
    _on_subset(x, gray, F.rgb_to_grayscale, 3)
    _on_subset(x, solar, F.solarize, 128)
    _on_subset(x, blur, gaussian_blur, kernel_size, sigma[blur])


def horizontal_flip(x: torch.Tensor, flip: torch.Tensor) -> None:
    """Flip the images where ``flip`` is True, in place."""
    _on_subset(x, flip.nonzero().flatten().tolist(), F.horizontal_flip)


# -- the training augmentation ---------------------------------------------------------------------------------------
class BatchedTrainAugment:
    """``data.train_augment`` for a list of decoded (3, H, W) uint8 images on one device: returns the
    (B, 3, img_size, img_size) uint8 batch. Same arguments as train_augment."""

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                 three_aug: bool = True, color_jitter: float = 0.3, blur_sigma: tuple[float, float] = BLUR_SIGMA,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.img_size, self.scale, self.ratio = img_size, list(scale), list(ratio)
        self.hflip, self.three_aug, self.color_jitter = hflip, three_aug, color_jitter
        self.blur_sigma = blur_sigma
        self.kernel_size = blur_kernel_size(blur_sigma)

    def sample(self, images: list[torch.Tensor]) -> AugmentParams:
        n = len(images)
        boxes = [tuple(torchvision.transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio))
                 for img in images]
        flip = torch.rand(n) < self.hflip  # v2.RandomHorizontalFlip flips when rand < p
        choice = torch.randint(3, (n,)) if self.three_aug else torch.full((n,), -1)
        sigma = torch.empty(n).uniform_(*self.blur_sigma)
        order = factors = None
        if self.color_jitter > 0:
            c = self.color_jitter
            factors = torch.empty(n, 3).uniform_(max(0.0, 1 - c), 1 + c)
            order = torch.rand(n, 3).argsort(dim=1)  # a uniformly random permutation per row
        return AugmentParams(boxes, flip, choice, sigma, order, factors)

    def apply(self, images: list[torch.Tensor], params: AugmentParams) -> torch.Tensor:
        x = resized_crops(images, params.boxes, self.img_size)
        horizontal_flip(x, params.flip)
        three_augment(x, params.three_augment, params.sigma, self.kernel_size)
        if params.jitter_order is not None:
            color_jitter(x, params.jitter_order, params.jitter_factors)
        return x

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.apply(images, self.sample(images))
