"""FLOP counting with PyTorch's own flop counter (matrix products and convolutions)."""
from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(
    model: torch.nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None, train: bool = False,
) -> int:
    """FLOPs for one image (a multiply-add counts as 2 FLOPs, as torch's counter does): the forward pass,
    or with ``train`` the forward and backward passes.

    Only matrix products and convolutions are counted, as computed on the CPU; the mLSTM cell is counted
    in the form the model is set to (the quadratic ``parallel`` form counts the full S x S products).
    torch's counter prices a grouped convolution's backward pass as if it were dense; it is counted here
    as twice the forward pass (input and weight gradients), which is exact for the depthwise q/k
    convolutions and, for convolutions on the image, counts an input gradient that is never computed.
    """
    param = next(model.parameters())
    if param.device.type != "cpu" or train:
        # Count on the CPU: on GPUs the block-diagonal projections run as dense matmuls, whose zero
        # blocks are no part of the model's arithmetic. A copy also keeps the caller's gradients.
        model = copy.deepcopy(model).cpu()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = in_chans or getattr(model, "in_chans", 3)
    x = torch.zeros(1, in_chans, h, w, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.set_grad_enabled(train), FlopCounterMode(display=False) as counter:
        out = model(x)
        if train:
            out.float().sum().backward()
    model.train(was_training)
    flops = counter.get_flop_counts()["Global"]
    aten = torch.ops.aten
    return counter.get_total_flops() - flops.get(aten.convolution_backward, 0) + (
        2 * flops.get(aten.convolution, 0) if train else 0)
