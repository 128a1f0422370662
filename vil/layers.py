"""Generic layers of the ViL backbone: offset-from-1 LayerNorms, block-diagonal linear maps, the patch and
position embeddings. Nothing here knows about token traversals or the mLSTM cell."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

class LayerNorm(nn.Module):
    """LayerNorm whose weight is stored as an offset from 1 (a stored zero means scale 1)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), 1.0 + self.weight, self.bias, self.eps)


class MultiHeadLayerNorm(LayerNorm):
    """Normalizes each head's features separately: input (B, NH, S, DH), output (B, S, NH * DH)."""

    def forward(self, h):
        B, NH, S, DH = h.shape
        h = F.layer_norm(h, (DH,), eps=self.eps).transpose(1, 2).reshape(B, S, NH * DH)
        return h * (1.0 + self.weight) + (self.bias if self.bias is not None else 0.0)


class BlockDiagonalLinear(nn.Module):
    """A linear map whose weight is block-diagonal with ``dim // block_size`` blocks of block_size^2."""

    def __init__(self, dim: int, block_size: int = 4, bias: bool = True):
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        """The (dim, dim) weight with zeros off the diagonal blocks.

        On GPUs a dense matmul with it does dim / block_size times the arithmetic of the blocks, yet runs
        far faster than the PyTorch alternatives: batched 4x4 matmuls leave tensor cores idle, and a
        broadcast multiply-and-sum makes the weight gradient a reduction over all tokens that compiles
        badly. The layer's Triton path computes q and k with kernels of their own instead
        (vil.kernels.packed_qk_triton); v's weight is folded into the up-projection.
        """
        nb, bs, _ = self.weight.shape
        eye = torch.eye(nb, device=self.weight.device, dtype=self.weight.dtype)
        return torch.einsum("boi,bc->boci", self.weight, eye).reshape(nb * bs, nb * bs)

    def forward(self, x):
        if x.is_cuda:
            return F.linear(x, self.dense_weight(), self.bias)
        # Elsewhere the block-wise product: a batched matmul over the blocks on a strided view of x.
        # The weight follows x's dtype, as autocast does not cover einsum on every device.
        out = torch.einsum("...ni,noi->...no", x.unflatten(-1, (-1, self.block_size)), self.weight.to(x.dtype))
        return out.flatten(-2) + self.bias.to(x.dtype) if self.bias is not None else out.flatten(-2)


class CausalConv1d(nn.Module):
    """Depthwise causal 1D convolution over the token sequence (xLSTM's original q/k convolution)."""

    def __init__(self, dim: int, kernel_size: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size - 1, groups=dim)

    def forward(self, x):  # (B, N, C)
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly embedded. The weight is a Conv2d's (the checkpoints' layout), applied
    as a matmul on token-major patches: on GPUs the strided convolution reads and writes channel-major
    memory and runs through layout conversions and a slow weight gradient (H100, ViL-T at 224: about
    1.3 ms of a training step, against 0.2 ms for the patch copy and the matmuls)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        B, C = x.shape[:2]
        patches = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, C * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, H/p, W/p, dim)


class PosEmbed(nn.Module):
    """Learnable absolute position embedding on a (H, W) grid, bicubically resized to other grids."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, *grid, dim))
        trunc_normal_(self.embed, std=0.02)

    def forward(self, x):  # (B, H, W, dim)
        return x + resize_pos_embed(self.embed, tuple(x.shape[1:3]))


def resize_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic (align_corners=False) resize of a (1, H, W, dim) position embedding to ``grid``."""
    if tuple(embed.shape[1:3]) == tuple(grid):
        return embed
    out = F.interpolate(embed.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1)
