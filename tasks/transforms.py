"""Batch transforms that run on the accelerator after the transfer (``on_after_batch_transfer``)."""
from __future__ import annotations

import torch


class DeviceNormalize:
    """``(x - mean * scale) / (std * scale)`` per channel of an (B, C, H, W) float batch, with the mean and std
    tensors made once per device and kept: a tensor made from Python numbers on a CUDA device at every batch is
    a blocking host-to-device copy, which stalls the CPU until the GPU has finished the queued steps.

    Args:
        mean / std: per channel, for pixel values in [0, 1].
        scale: the pixel range of the input (255 for uint8 values converted to float, 1 for [0, 1]).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1.0):
        self.mean, self.std, self.scale = tuple(mean), tuple(std), scale
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._tensors:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * self.scale
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * self.scale
            self._tensors[x.device] = mean, std
        mean, std = self._tensors[x.device]
        return (x - mean) / std
