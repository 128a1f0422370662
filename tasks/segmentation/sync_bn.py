"""Batch norm with statistics over all processes: the heads' BatchNorm under DDP, so that 8 GPUs x batch 2
normalize like 1 GPU x batch 16.

On CUDA this is ``torch.nn.SyncBatchNorm``. Its kernels (``batch_norm_stats`` and friends) exist only for
GPUs, and DDP refuses it on CPU modules, so on other devices (CPU runs with the gloo backend)
``AllReduceBatchNorm`` computes the same statistics with two differentiable all-reduces: the batch mean, then
the mean squared deviation, over all processes' elements. Their backward passes sum the gradients of every
process's loss, as torch's kernels do.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class AllReduceBatchNorm(_BatchNorm):
    """Batch norm over the batches of all processes of ``process_group`` (default: all), on any device."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.ndim))
        shape = (1, -1, *[1] * (x.ndim - 2))
        count = dist_fn.all_reduce(torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device),
                                   group=group)
        mean = dist_fn.all_reduce(x.sum(dims, dtype=torch.float64), group=group) / count
        centered = x - mean.to(x.dtype).view(shape)
        var = dist_fn.all_reduce((centered.double() ** 2).sum(dims), group=group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centered * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """Every BatchNorm*d in ``module`` replaced by a synchronized one (torch's conversion, keeping weights,
    running statistics and requires_grad): ``torch.nn.SyncBatchNorm`` on CUDA, ``AllReduceBatchNorm``
    elsewhere."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if torch.device(device).type != "cuda":
        for m in module.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = AllReduceBatchNorm  # the same attributes; only forward differs
    return module
