"""FLOP counting with PyTorch's own flop counter (matrix products and convolutions)."""
from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: torch.nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2 FLOPs, as torch's counter does).

    Only matrix products and convolutions are counted, as computed on the CPU; the mLSTM cell is counted
    in the form the model is set to (the quadratic ``parallel`` form counts the full S x S products).
    """
    param = next(model.parameters())
    if param.device.type != "cpu":
        # Count on the CPU: on GPUs the block-diagonal projections run as dense matmuls, whose zero
        # blocks are no part of the model's arithmetic.
        model = copy.deepcopy(model).cpu()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = in_chans or getattr(model, "in_chans", 3)
    x = torch.zeros(1, in_chans, h, w, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()
