"""Vision-LSTM (ViL): a stack of mLSTM blocks over patch tokens (Alkin et al., ICLR 2025).

One file per model family, as in timm: the mLSTM layer and blocks, the model with timm's backbone
interface (``forward_features`` / ``forward_head`` / ``forward_intermediates``, ``feature_info``,
gradient checkpointing, pruning), its pretrained configs and the registered variants, which
``timm.create_model`` builds once ``vil`` is imported. State-dict keys follow the authors' released models
(``blocks.{pair}.rowwise_from_top_left.*`` etc.), so their checkpoints load unchanged (``vil.checkpoint``).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._hub import download_cached_file
from torch.utils.checkpoint import checkpoint

from vil.checkpoint import load_checkpoint
from vil.layers import BlockDiagonalLinear, CausalConv1d, LayerNorm, MultiHeadLayerNorm, PatchEmbed, PosEmbed
from vil.mlstm import MLSTM_FORMS, kernel_dtype, mlstm, resolve_form

TRAVERSALS = {
    # Figure 4 of the paper. Blocks cycle through the directions: block j uses directions[j % len].
    "uni": ("rowwise_from_top_left",),
    "bi": ("rowwise_from_top_left", "rowwise_from_bot_right"),
    "quad": ("rowwise_from_top_left", "rowwise_from_bot_right", "colwise_from_top_left", "colwise_from_bot_right"),
    "oct": (
        "rowwise_from_top_left", "rowwise_from_bot_right", "colwise_from_top_left", "colwise_from_bot_right",
        "rowwise_from_top_right", "rowwise_from_bot_left", "colwise_from_top_right", "colwise_from_bot_left",
    ),
}
CONV_KINDS = ("none", "causal1d", "1d", "2d")
POOLINGS = ("bilateral_concat", "bilateral_mean", "avg", "center_avg", "cls")
CLS_TOKENS = ("none", "bilateral", "mid", "mid+bilateral")
CONCURRENCY = ("sequential", "parallel")


# ----------------------------------------------------------------------------------------------------------------------
# Token orders
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _traversal_order(direction: str, H: int, W: int) -> tuple[tuple[int, ...], tuple[int, int]]:
    rows = [[r * W + c for c in range(W)] for r in range(H)]
    axis, start = direction.split("_from_")
    if start in ("top_right", "bot_left"):
        rows = [row[::-1] for row in rows]
    if axis == "colwise":
        rows = [list(col) for col in zip(*rows)]
    order = [i for row in rows for i in row]
    if start in ("bot_right", "bot_left"):
        order = order[::-1]
    return tuple(order), (len(rows), len(rows[0]))


def traversal_order(direction: str, grid: tuple[int, int], device=None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Token indices (row-major numbering) in the order ``direction`` visits them, and the grid shape that
    the visited sequence forms when read back row by row (transposed for column-wise traversals).
    Computed in Python so that torch.compile sees constants."""
    order, shape = _traversal_order(direction, *grid)
    return torch.tensor(order, device=device), shape


def to_traversal(x: torch.Tensor, direction: str, grid: tuple[int, int]) -> torch.Tensor:
    """Reorder row-major tokens (B, H*W, C) into the order ``direction`` visits them (= indexing with
    ``traversal_order``), with flips and transposes: their backward passes are plain copies, where an
    index's backward is a scatter."""
    B, _, C = x.shape
    H, W = grid
    axis, start = direction.split("_from_")
    if axis == "colwise" or start in ("top_right", "bot_left"):
        g = x.view(B, H, W, C)
        if start in ("top_right", "bot_left"):
            g = g.flip(2)
        if axis == "colwise":
            g = g.transpose(1, 2)
        x = g.reshape(B, H * W, C)
    return x.flip(1) if start in ("bot_right", "bot_left") else x


def from_traversal(x: torch.Tensor, direction: str, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``to_traversal``."""
    B, _, C = x.shape
    H, W = grid
    axis, start = direction.split("_from_")
    if start in ("bot_right", "bot_left"):
        x = x.flip(1)
    if axis == "colwise" or start in ("top_right", "bot_left"):
        g = x.view(B, W, H, C).transpose(1, 2) if axis == "colwise" else x.view(B, H, W, C)
        if start in ("top_right", "bot_left"):
            g = g.flip(2)
        x = g.reshape(B, H * W, C)
    return x


def _fused_linear(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """Several linear layers on the same input as one matmul (one kernel, one read of x)."""
    weights = [layer.weight for layer in layers]
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, torch.cat(weights), bias).split([w.shape[0] for w in weights], dim=-1)


class MLSTMLayer(nn.Module):
    """The gated-MLP mLSTM layer: up-projection, q/k convolution, mLSTM cell, head norm, skip and SiLU gate."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        expansion: int = 2,
        conv_kind: str = "2d",
        conv_kernel_size: int = 3,
        proj_bias: bool = True,
        norm_bias: bool = True,
        mlstm_form: str = "auto",
        chunk_size: int = 64,
    ):
        super().__init__()
        inner = expansion * dim
        if inner % num_heads:
            raise ValueError(f"inner dim {inner} is not divisible by num_heads={num_heads}")
        self.inner, self.num_heads, self.conv_kind = inner, num_heads, conv_kind
        self.mlstm_form, self.chunk_size = mlstm_form, chunk_size
        self.proj_up = nn.Linear(dim, 2 * inner, bias=proj_bias)
        self.q_proj = BlockDiagonalLinear(inner, bias=proj_bias)
        self.k_proj = BlockDiagonalLinear(inner, bias=proj_bias)
        self.v_proj = BlockDiagonalLinear(inner, bias=proj_bias)
        if conv_kind == "2d":
            self.conv = nn.Conv2d(inner, inner, conv_kernel_size, padding=conv_kernel_size // 2, groups=inner)
        elif conv_kind == "1d":
            self.conv = nn.Conv1d(inner, inner, conv_kernel_size, padding=conv_kernel_size // 2, groups=inner)
        elif conv_kind == "causal1d":
            self.conv1d = CausalConv1d(inner, conv_kernel_size)  # xLSTM's name, kept for checkpoint keys
        elif conv_kind != "none":
            raise ValueError(f"unknown conv_kind {conv_kind!r}; choose one of {CONV_KINDS}")
        self.mlstm_cell = nn.Module()  # holds the gate and head-norm weights under the checkpoint's names
        self.mlstm_cell.igate = nn.Linear(3 * inner, num_heads)
        self.mlstm_cell.fgate = nn.Linear(3 * inner, num_heads)
        self.mlstm_cell.outnorm = MultiHeadLayerNorm(inner, eps=1e-5, bias=norm_bias)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=proj_bias)

    def _conv_silu(self, x, grid, patch_index, fused: bool):
        """silu of the q/k convolution; ``fused``: in one Triton kernel each way where it applies (a 2D
        convolution over patch tokens only)."""
        if fused and self.conv_kind == "2d" and patch_index is None and self.conv.kernel_size[0] % 2:
            from vil.kernels.dwconv_silu_triton import dwconv2d_silu_triton

            return dwconv2d_silu_triton(x, self.conv.weight, self.conv.bias, grid)
        return F.silu(self._conv(x, grid, patch_index))

    def _conv(self, x, grid, patch_index):
        if self.conv_kind == "none":
            return x
        if self.conv_kind == "causal1d":
            return self.conv1d(x)
        if self.conv_kind == "1d":
            return self.conv(x.transpose(1, 2)).transpose(1, 2)
        # 2d: the patch tokens, in this block's traversal order, form a (possibly flipped or transposed) grid.
        B, N, C = x.shape
        patches = x if patch_index is None else x[:, patch_index]
        y = self.conv(patches.transpose(1, 2).reshape(B, C, *grid)).flatten(2).transpose(1, 2)
        if patch_index is None:
            return y
        # [CLS] tokens have no grid neighbours: the convolution sees them as an isolated pixel.
        center = self.conv.weight[:, 0, self.conv.kernel_size[0] // 2, self.conv.kernel_size[1] // 2]
        out = x * center + self.conv.bias
        return out.index_copy(1, patch_index, y)

    def _packed_projections(self, x, x_conv, fused_qk: bool = False):
        """z, q, k, v and the gate pre-activations in two dense matmuls (the GPU path), from the layer's
        input x and the convolved x_conv: (B, N, 2 inner + G) each, ``q | k | gate shares | padding``
        from x_conv and ``z | v | gate shares | padding`` from x, the gates being the sums of their two
        shares (the layout ``mlstm_gated_triton`` takes).

        Dense block-diagonal weights (see BlockDiagonalLinear.dense_weight). Two folds spare matmuls:
        v and its share of the gates are linear in x_mlstm, itself linear in x, so they come from x with
        the composed weights, beside z (a matmul over the model width instead of the twice wider inner
        width); and the gates, linear in q, k and v, come out of the projections instead of a matmul of
        their own over the concatenated q, k, v. The gate columns are zero-padded so that the outputs' rows
        stay 16-aligned, which the fast matmul kernels need, and rows wider than 1024 are 64-aligned (128
        bytes in half precision): torch.compile pads wider intermediate buffers to that alignment and
        would then copy them for the kernels, which take the unpadded layout they were traced with.

        ``fused_qk``: the x_conv half from Triton kernels that work on the q/k blocks themselves (see
        vil.kernels.packed_qk_triton); the same layout.
        """
        inner, nh = self.inner, self.num_heads
        pad = -(2 * inner + 2 * nh) % (64 if 2 * inner + 2 * nh > 1024 else 16)
        wq, wk, wv = (p.dense_weight() for p in (self.q_proj, self.k_proj, self.v_proj))
        gate_w = F.pad(torch.cat([self.mlstm_cell.igate.weight, self.mlstm_cell.fgate.weight]), (0, 0, 0, pad))
        gate_b = F.pad(torch.cat([self.mlstm_cell.igate.bias, self.mlstm_cell.fgate.bias]), (0, pad))
        gq, gk, gv = gate_w.split(inner, dim=1)  # (2 NH + pad, inner) each
        w_mlstm, w_z = self.proj_up.weight.chunk(2)
        w_v = torch.cat([wv, gv @ wv])  # v and its gate share, from x_mlstm
        w_gates = gq @ wq + gk @ wk
        w_x = torch.cat([w_z, w_v @ w_mlstm])
        bq, bk = self.q_proj.bias, self.k_proj.bias
        if bq is None:
            b_gates, b_x = gate_b, None
        else:
            bv = self.v_proj.bias
            b_mlstm, b_z = self.proj_up.bias.chunk(2)
            b_gates = gq @ bq + gk @ bk + gate_b
            b_x = torch.cat([b_z, w_v @ b_mlstm + torch.cat([bv, gv @ bv])])
        zv_gates = F.linear(x, w_x, b_x)
        if fused_qk:
            from vil.kernels.packed_qk_triton import packed_qk_triton

            return packed_qk_triton(x_conv, self.q_proj.weight, bq, self.k_proj.weight, bk, w_gates, b_gates), zv_gates
        b_conv = F.pad(b_gates, (2 * inner, 0)) if bq is None else torch.cat([bq, bk, b_gates])
        return F.linear(x_conv, torch.cat([wq, wk, w_gates]), b_conv), zv_gates

    def _projections_dense(self, x, x_conv):
        """z, q, k, v, igate, fgate (B, N, NH) of the packed projections."""
        inner, nh = self.inner, self.num_heads
        qk_gates, zv_gates = self._packed_projections(x, x_conv)
        q, k, gates_conv = qk_gates.split([inner, inner, qk_gates.shape[-1] - 2 * inner], dim=-1)
        z, v, gates_x = zv_gates.split([inner, inner, zv_gates.shape[-1] - 2 * inner], dim=-1)
        igate, fgate = (gates_conv + gates_x)[..., : 2 * nh].split(nh, dim=-1)
        return z, q, k, v, igate, fgate

    def forward(self, x, grid: tuple[int, int], patch_index: torch.Tensor | None = None):
        B, N, _ = x.shape
        # x_mlstm from a matmul of its own: the convolution needs a dense input (it copies a strided one to
        # a dense layout, forward and backward).
        w_mlstm, w_z = self.proj_up.weight.chunk(2)
        b_mlstm, b_z = (None, None) if self.proj_up.bias is None else self.proj_up.bias.chunk(2)
        x_mlstm = F.linear(x, w_mlstm, b_mlstm)
        form = resolve_form(self.mlstm_form, x.device, N)
        x_conv = self._conv_silu(x_mlstm, grid, patch_index, fused=form in ("tiled", "chunkwise_triton"))
        outnorm = self.mlstm_cell.outnorm
        if form in ("tiled", "chunkwise_triton"):
            # The cell's kernels with the head norm, skip and output gate fused around them, on the packed
            # projections (whose gradients they return packed too).
            from vil.kernels.mlstm_gated_triton import mlstm_gated_triton
            from vil.kernels.packed_qk_triton import packed_qk_supported

            dtype = kernel_dtype(x_conv)
            x_conv = x_conv.to(dtype)
            fused_qk = packed_qk_supported(self.inner, self.q_proj.block_size)
            qk_gates, zv_gates = (t.to(dtype) for t in self._packed_projections(x, x_conv, fused_qk))
            h = mlstm_gated_triton(qk_gates, zv_gates, x_conv, outnorm.weight, outnorm.bias,
                                   self.learnable_skip, self.num_heads, norm_eps=outnorm.eps,
                                   chunk_size=self.chunk_size if form == "chunkwise_triton" else None)
            return self.proj_down(h)
        if x_conv.is_cuda:
            z, q, k, v, igate, fgate = self._projections_dense(x, x_conv)
        else:
            z = F.linear(x, w_z, b_z)
            q, k, v = self.q_proj(x_conv), self.k_proj(x_conv), self.v_proj(x_mlstm)
            igate, fgate = _fused_linear(torch.cat([q, k, v], dim=-1), self.mlstm_cell.igate, self.mlstm_cell.fgate)
        igate, fgate = igate.transpose(1, 2), fgate.transpose(1, 2)  # (B, NH, N)
        q, k, v = (t.view(B, N, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        h = mlstm(q, k, v, igate, fgate, form=self.mlstm_form, chunk_size=self.chunk_size)
        h = outnorm(h) + self.learnable_skip * x_conv
        return self.proj_down(h * F.silu(z))


class MLSTMBlock(nn.Module):
    """Pre-norm residual block ``x + drop_path(layer(norm(x)))`` that visits tokens in one direction."""

    def __init__(self, dim: int, direction: str, drop_path: float = 0.0, norm_bias: bool = True, **layer_kwargs):
        super().__init__()
        self.direction = direction
        self.norm = LayerNorm(dim, eps=1e-5, bias=norm_bias)
        self.layer = MLSTMLayer(dim, norm_bias=norm_bias, **layer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def branch(self, x, layout):
        """The residual branch in original token order; ``layout`` maps directions to token orders."""
        order, inverse, grid, patch_index, image_grid = layout[self.direction]
        if order is None:  # patch tokens only: reorder by flips and transposes
            x = from_traversal(self.layer(self.norm(to_traversal(x, self.direction, image_grid)), grid),
                               self.direction, image_grid)
        else:
            x = self.layer(self.norm(x)[:, order], grid, patch_index)[:, inverse]
        return self.drop_path(x)

    def forward(self, x, layout):
        order, _, grid, _, image_grid = layout[self.direction]
        if order is None:
            # The whole residual step in traversal order: norm and residual add act per token, so this equals
            # x + branch(x), and under torch.compile the reorderings fuse into the residual adds' stores
            # instead of into the norm's reductions, where they are slow.
            x = to_traversal(x, self.direction, image_grid)
            x = x + self.drop_path(self.layer(self.norm(x), grid))
            # contiguous: the next block (or compiled graph) then sees the same layout after any direction
            return from_traversal(x, self.direction, image_grid).contiguous()
        return x + self.branch(x, layout)


class MLSTMBlockPair(nn.Module):
    """Two blocks; applied one after the other (the paper's eq. 13-14) or both on the same input (eq. 15)."""

    def __init__(self, directions: tuple[str, str], drop_paths: tuple[float, float], concurrency: str, **kwargs):
        super().__init__()
        names = list(directions)
        if names[0] == names[1]:
            names[1] = names[1] + "_2"
        self.names = names
        self.concurrency = concurrency
        for name, direction, dp in zip(names, directions, drop_paths):
            self.add_module(name, MLSTMBlock(direction=direction, drop_path=dp, **kwargs))

    def sub_blocks(self):
        return [getattr(self, name) for name in self.names]

    def forward(self, x, layout, taps: bool = False):
        """The pair's output; with ``taps`` the list of outputs at its feature taps: after each sub-block
        (sequential), or the pair's output once (parallel, where the sub-blocks have no output of their own)."""
        if self.concurrency == "parallel":
            a, b = self.sub_blocks()
            x = x + a.branch(x, layout) + b.branch(x, layout)
            return [x] if taps else x
        outs = []
        for block in self.sub_blocks():  # one block after pruning (VisionLSTM.prune_intermediate_layers)
            x = block(x, layout)
            outs.append(x)
        return outs if taps else x



# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------
def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier head), got {num_classes!r}")


def _pooled_width(pooling: str, dim: int, num_cls: int) -> int:
    return {"bilateral_concat": 2 * dim, "cls": max(num_cls, 1) * dim}.get(pooling, dim)


class VisionLSTM(nn.Module):
    """Vision-LSTM.

    Args mirror the paper's ablations: ``traversal`` (Table 4a), ``conv_kind`` (4b), ``pos_embed`` (4c),
    ``concurrency`` (4d), ``pooling`` and ``cls_tokens`` (Table 5). ``depth`` counts block pairs.
    ``version=1`` builds the first release's layout (bias-free projections and norms, causal conv1d,
    bilateral mean pooling, token norm named ``legacy_norm`` and head norm named ``norm``).

    Feature taps (``feature_info``, ``forward_intermediates``' indices): the output of every mLSTM block,
    0 .. 2 * depth - 1, so tap j is sub-block j % 2 of pair j // 2. With ``concurrency='parallel'`` the two
    blocks of a pair share one output and the taps are the pairs' outputs, 0 .. depth - 1.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        depth: int = 12,
        num_heads: int = 4,
        traversal: str = "bi",
        conv_kind: str = "2d",
        conv_kernel_size: int = 3,
        pos_embed: bool = True,
        concurrency: str = "sequential",
        pooling: str = "bilateral_concat",
        cls_tokens: str = "none",
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "constant",
        mlstm_form: str = "auto",
        chunk_size: int = 64,
        proj_bias: bool = True,
        norm_bias: bool = True,
        version: int = 2,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for name, value, allowed in [
            ("traversal", traversal, tuple(TRAVERSALS)), ("conv_kind", conv_kind, CONV_KINDS),
            ("pooling", pooling, POOLINGS), ("cls_tokens", cls_tokens, CLS_TOKENS),
            ("concurrency", concurrency, CONCURRENCY), ("mlstm_form", mlstm_form, MLSTM_FORMS),
            ("drop_path_schedule", drop_path_schedule, ("constant", "linear")), ("version", version, (1, 2)),
        ]:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        for name, value in (("patch_size", patch_size), ("in_chans", in_chans), ("dim", dim), ("depth", depth),
                            ("num_heads", num_heads), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_num_classes(num_classes)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1) (the probability of dropping a block's branch), "
                             f"got {drop_path_rate!r}")
        if len(img_size) != 2 or img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if pooling == "cls" and cls_tokens == "none":
            raise ValueError("pooling='cls' needs cls_tokens")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_classes, self.dim, self.depth, self.version = num_classes, dim, depth, version
        self.traversal, self.pooling, self.cls_tokens, self.concurrency = traversal, pooling, cls_tokens, concurrency
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.pos_embed = PosEmbed(self.grid, dim) if pos_embed else None
        num_cls = {"none": 0, "bilateral": 2, "mid": 1, "mid+bilateral": 3}[cls_tokens]
        self.num_prefix_tokens = num_cls  # timm's name; ViL's [CLS] tokens need not come first
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls, dim)) if num_cls else None
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)

        num_blocks = 2 * depth
        if drop_path_schedule == "linear":
            rates = [drop_path_rate * j / max(num_blocks - 1, 1) for j in range(num_blocks)]
        else:
            rates = [drop_path_rate] * num_blocks
        directions = TRAVERSALS[traversal]
        layer_kwargs = dict(
            dim=dim, num_heads=num_heads, conv_kind=conv_kind, conv_kernel_size=conv_kernel_size,
            proj_bias=proj_bias, norm_bias=norm_bias, mlstm_form=mlstm_form, chunk_size=chunk_size,
        )
        self.blocks = nn.ModuleList(
            MLSTMBlockPair(
                directions=(directions[(2 * i) % len(directions)], directions[(2 * i + 1) % len(directions)]),
                drop_paths=(rates[2 * i], rates[2 * i + 1]),
                concurrency=concurrency,
                **layer_kwargs,
            )
            for i in range(depth)
        )
        self.grad_checkpointing = False
        head_in = _pooled_width(pooling, dim, num_cls)
        if version == 1:
            self.legacy_norm = LayerNorm(dim, eps=1e-5, bias=False)
            self.norm = nn.LayerNorm(head_in, eps=1e-6)
        else:
            self.norm = LayerNorm(dim, eps=1e-6, bias=norm_bias)
            self.legacy_norm = nn.LayerNorm(head_in, eps=1e-5)
        # timm's names: tokens and feature maps have num_features channels, the pooled vector before the
        # classifier head_hidden_size (2 * dim for the bilateral concat pooling).
        self.num_features, self.head_hidden_size = dim, head_in
        self.head = nn.Linear(head_in, num_classes) if num_classes > 0 else nn.Identity()
        if concurrency == "parallel":
            modules = [f"blocks.{i}" for i in range(depth)]
        else:
            modules = [f"blocks.{i}.{name}" for i, pair in enumerate(self.blocks) for name in pair.names]
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=m) for m in modules]
        self.init_weights()

    # -- init ----------------------------------------------------------------------------------------------------------
    def init_weights(self):
        num_blocks = 2 * self.depth
        for block in self.iter_blocks():
            layer = block.layer
            small = math.sqrt(2 / (5 * layer.proj_up.in_features))
            nn.init.normal_(layer.proj_up.weight, std=small)
            for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
                nn.init.normal_(proj.weight, std=math.sqrt(2 / (5 * layer.inner)))
            nn.init.normal_(layer.proj_down.weight, std=2 / num_blocks / math.sqrt(layer.proj_down.out_features))
            for lin in (layer.proj_up, layer.proj_down):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            cell = layer.mlstm_cell
            nn.init.zeros_(cell.igate.weight)
            nn.init.normal_(cell.igate.bias, std=0.1)
            nn.init.zeros_(cell.fgate.weight)
            with torch.no_grad():
                cell.fgate.bias.copy_(torch.linspace(3.0, 6.0, cell.fgate.bias.numel()))
        self._init_head()

    def _init_head(self):
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Weights from a file: the authors' .th, a state dict or a Lightning checkpoint of this suite (what
        timm calls for this model's pretrained configs, which all set ``custom_load``)."""
        load_checkpoint(self, path)

    # -- helpers -------------------------------------------------------------------------------------------------------
    def iter_blocks(self):
        """The mLSTM blocks in flat order (block j is sub-block j % 2 of pair j // 2)."""
        for pair in self.blocks:
            yield from pair.sub_blocks()

    def set_mlstm_form(self, form: str, chunk_size: int | None = None):
        if form not in MLSTM_FORMS:
            raise ValueError(f"unknown mlstm form {form!r}; choose one of {MLSTM_FORMS}")
        for block in self.iter_blocks():
            block.layer.mlstm_form = form
            if chunk_size is not None:
                block.layer.chunk_size = chunk_size

    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block pair in the backward pass instead of keeping its activations (training
        only; the outputs and gradients are the same)."""
        self.grad_checkpointing = enable

    def _cls_slots(self, num_patches: int) -> list[int]:
        """Positions of the [CLS] tokens in the canonical (row-major) sequence."""
        mid = num_patches // 2
        return {
            "none": [], "bilateral": [0, num_patches + 1], "mid": [mid], "mid+bilateral": [0, mid + 1, num_patches + 2],
        }[self.cls_tokens]

    def _layout(self, grid: tuple[int, int], device) -> dict:
        """For every direction in use: token order and its inverse (None when only patch tokens are reordered,
        by flips and transposes), the traversal's grid, the patch positions and the image's token grid."""
        layout = {}
        num_patches = grid[0] * grid[1]
        slots = self._cls_slots(num_patches)
        for block in self.iter_blocks():
            d = block.direction
            if d in layout:
                continue
            perm_list, dgrid = _traversal_order(d, *grid)
            if not slots:
                layout[d] = (None, None, dgrid, None, grid)
                continue
            # Keep [CLS] tokens at their slots of the forward traversal; reversed traversals mirror all.
            # Index lists are built in Python so that torch.compile sees constants, not data-dependent ops.
            reverse = d.endswith(("bot_right", "bot_left"))
            fwd = perm_list[::-1] if reverse else perm_list
            n = num_patches + len(slots)
            slot_set = set(slots)
            canon_patches = [i for i in range(n) if i not in slot_set]
            patches = iter(canon_patches[p] for p in fwd)
            order = [i if i in slot_set else next(patches) for i in range(n)]
            if reverse:
                order = order[::-1]
            patch_index = torch.tensor([t for t, i in enumerate(order) if i not in slot_set], device=device)
            order = torch.tensor(order, device=device)
            layout[d] = (order, torch.argsort(order), dgrid, patch_index, grid)
        return layout

    def compile_blocks(self, **compile_kwargs) -> "VisionLSTM":
        """torch.compile each block pair on its own (in place). All pairs run the same code, so they share
        one compiled graph per traversal pattern: compile time stays that of one pair at any depth, where
        compiling the whole model compiles every block anew."""
        for pair in self.blocks:
            pair.compile(**compile_kwargs)
        return self

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor of images, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"empty batch: got images of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images are {x.dtype}; the model takes float images normalized with the mean and std "
                            f"of its pretrained_cfg (e.g. x.float() / 255, then normalize)")
        weight = self.patch_embed.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"images are {x.dtype} but the model's weights are {weight.dtype}: convert one to the "
                            f"other (x.to({weight.dtype}) or model.to({x.dtype})), or run under torch.autocast")

    # -- forward -------------------------------------------------------------------------------------------------------
    def _embed(self, x):
        self._check_input(x)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        grid = tuple(x.shape[1:3])
        x = x.flatten(1, 2)  # token-major: the blocks' norms and matmuls want rows of contiguous features
        if self.cls_token is not None:
            slots = self._cls_slots(x.shape[1])
            parts, prev = [], 0
            for n, slot in enumerate(slots):
                patch_pos = slot - n  # patches placed before this slot
                parts += [x[:, prev:patch_pos], self.cls_token[:, n : n + 1].expand(x.shape[0], -1, -1)]
                prev = patch_pos
            x = torch.cat(parts + [x[:, prev:]], dim=1)
        return x, grid

    def _token_norm(self):
        return self.legacy_norm if self.version == 1 else self.norm

    def _head_norm(self):
        return self.norm if self.version == 1 else self.legacy_norm

    def _run_pair(self, pair, x, layout, taps: bool = False):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(pair, x, layout, taps, use_reentrant=False)
        return pair(x, layout, taps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, shape (B, N, dim) (N includes [CLS] tokens if any)."""
        x, grid = self._embed(x)
        layout = self._layout(grid, x.device)
        for pair in self.blocks:
            x = self._run_pair(pair, x, layout)
        return self._token_norm()(x)

    def _take_indices(self, indices) -> tuple[list[int], int]:
        if indices is not None and not isinstance(indices, int) and len(indices) == 0:
            raise ValueError("indices is empty: give tap indices, the number of last taps, or None for all")
        try:
            return feature_take_indices(len(self.feature_info), indices)
        except AssertionError as e:  # timm asserts; name the model's tap count
            raise ValueError(f"{e} (this model has {len(self.feature_info)} feature taps, see feature_info)") from None

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Features at the taps ``indices`` (a list, negative counting from the end; an int n for the last n;
        None for all), as timm's backbones return them: ``(final tokens after the final norm,
        intermediates)``, or only the intermediates with ``intermediates_only``.

        Intermediates are the patch tokens as maps (B, dim, H/p, W/p) (``output_fmt='NCHW'``) or as
        row-major sequences (B, H/p * W/p, dim) (``'NLC'``), without the final norm unless ``norm``; with
        ``return_prefix_tokens`` each is a (patch tokens, [CLS] tokens) tuple. ``stop_early`` runs the blocks
        only up to the last tap, so the final tokens are those of that block.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = self._take_indices(indices)
        take = set(take)
        x, grid = self._embed(x)
        layout = self._layout(grid, x.device)
        tapped, j = [], 0
        for pair in self.blocks:
            if (intermediates_only or stop_early) and j > last:
                break
            if any(t in take for t in range(j, j + len(pair.sub_blocks()))):
                outs = self._run_pair(pair, x, layout, taps=True)
                tapped += [y for t, y in enumerate(outs, start=j) if t in take]
                # stop_early at a pair's first block: the final tokens are that block's
                x = outs[last - j] if stop_early and last < j + len(outs) else outs[-1]
            else:
                x = self._run_pair(pair, x, layout)
            j += 1 if self.concurrency == "parallel" else len(pair.sub_blocks())
        patch_pos = self._patch_positions(x.shape[1], x.device)
        intermediates = []
        for y in tapped:
            y = self._token_norm()(y) if norm else y
            patches = y if patch_pos is None else y[:, patch_pos]
            if output_fmt == "NCHW":
                patches = patches.transpose(1, 2).reshape(y.shape[0], y.shape[2], *grid)
            if return_prefix_tokens:
                prefix = y[:, self._cls_slots(grid[0] * grid[1])]
                patches = (patches, prefix)
            intermediates.append(patches)
        if intermediates_only:
            return intermediates
        return self._token_norm()(x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last tap of ``indices`` (and with ``prune_head`` the pooling norm and the
        classifier, with ``prune_norm`` the final token norm). Returns the taps as absolute indices, which
        the pruned model's ``forward_intermediates`` gives unchanged."""
        take, last = self._take_indices(indices)
        if self.concurrency == "parallel":
            self.blocks = self.blocks[: last + 1]
        else:
            self.blocks = self.blocks[: last // 2 + 1]
            pair = self.blocks[-1]
            if last % 2 == 0 and len(pair.names) == 2:  # the tap is the pair's first block
                delattr(pair, pair.names[1])
                pair.names = pair.names[:1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm:
            setattr(self, "legacy_norm" if self.version == 1 else "norm", nn.Identity())
        if prune_head:
            setattr(self, "norm" if self.version == 1 else "legacy_norm", nn.Identity())
            self.reset_classifier(0)
        return take

    def _patch_positions(self, num_tokens, device):
        if self.cls_token is None:
            return None
        slots = set(self._cls_slots(num_tokens - self.cls_token.shape[1]))
        return torch.tensor([i for i in range(num_tokens) if i not in slots], device=device)

    def forward_feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Final patch tokens after the final norm as a (B, dim, H/p, W/p) map."""
        tokens = self.forward_features(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        patch_pos = self._patch_positions(tokens.shape[1], tokens.device)
        patches = tokens if patch_pos is None else tokens[:, patch_pos]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def pool(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The pooled (B, head_hidden_size) vector of the tokens ``x``; ``grid`` (the token grid) is needed
        only by ``center_avg`` pooling of non-square inputs."""
        num_patches = x.shape[1] - self.num_prefix_tokens
        if self.pooling == "cls":
            return x[:, self._cls_slots(num_patches)].flatten(1)
        patches = x if self.cls_token is None else x[:, self._patch_positions(x.shape[1], x.device)]
        if self.pooling == "bilateral_concat":
            return torch.cat([patches[:, 0], patches[:, -1]], dim=1)
        if self.pooling == "bilateral_mean":
            return (patches[:, 0] + patches[:, -1]) / 2
        if self.pooling == "avg":
            return patches.mean(1)
        if grid is None:  # center_avg needs the grid's shape
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"center_avg pooling of {num_patches} patch tokens needs the token grid: "
                                 f"forward_head(x, grid=(H / patch_size, W / patch_size))")
            grid = (side, side)
        H, W = grid  # center_avg: the 2x2 (or smaller, for odd sides) center patches
        rows, cols = slice((H - 1) // 2, H // 2 + 1), slice((W - 1) // 2, W // 2 + 1)
        return patches.view(x.shape[0], H, W, -1)[:, rows, cols].flatten(1, 2).mean(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, grid: tuple[int, int] | None = None):
        """Classifier on ``forward_features``' tokens; ``pre_logits``: the normalized pooled vector instead."""
        x = self._head_norm()(self.pool(x, grid))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        return self.forward_head(tokens, grid=(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A fresh head for ``num_classes`` (0: none); ``global_pool`` switches the pooling (one of POOLINGS),
        which sets the head's input width."""
        if global_pool is not None and global_pool != self.pooling:
            if global_pool not in POOLINGS or (global_pool == "cls" and self.cls_token is None):
                raise ValueError(f"global_pool {global_pool!r} is not available; choose one of {POOLINGS} "
                                 f"('cls' needs cls_tokens)")
            if _pooled_width(global_pool, self.dim, self.num_prefix_tokens) != self.head_hidden_size:
                raise ValueError(f"global_pool {global_pool!r} changes the pooled width, which the pooling norm "
                                 f"of this model does not have")
            self.pooling = global_pool
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        device = self.patch_embed.proj.weight.device
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self._init_head()

    # -- optimizer groups (timm's names) ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameters besides biases and norm weights (1-D) that take no weight decay."""
        keys = {"pos_embed.embed", "cls_token"}
        for name, _ in self.named_parameters():
            if name.endswith(("igate.bias", "fgate.bias")):
                keys.add(name)
        return keys

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise decay helpers: the embeddings, then one group per block pair
        (the paper's layer decay counts pairs), then the final norms and head."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm|^legacy_norm|^head", (99999,))])

    def lr_layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, pair i -> i + 1, everything after -> depth + 1."""
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def default_out_indices(self) -> tuple[int, ...]:
        return segmentation_taps(self.depth, self.concurrency)


def segmentation_taps(depth: int, concurrency: str = "sequential") -> tuple[int, ...]:
    """The default feature taps (``features_only``' out_indices): after the pairs at 1/3, 1/2, 2/3 and all of
    the depth. For 12 pairs (ViL-T/S/B) these are flat blocks 7, 11, 15, 23, the 4th, 6th, 8th and 12th pair:
    the paper's ADE20K setting."""
    pairs = sorted({max(1, round(depth * f)) for f in (1 / 3, 1 / 2, 2 / 3, 1)})
    return tuple(p - 1 if concurrency == "parallel" else 2 * p - 1 for p in pairs)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained configs and registered variants
# ----------------------------------------------------------------------------------------------------------------------
RELEASE_URL = "https://ml.jku.at/research/vision_lstm/download/"


def _cfg(file: str | None = None, top1: float | None = None, **kwargs) -> dict:
    """A pretrained config: the authors' evaluation transform (resize 224 bicubic, center crop ratio 1.0,
    ImageNet mean/std). ``custom_load``: timm hands the file to ``VisionLSTM.load_pretrained``, which reads
    the authors' raw training-code keys with ``torch.load(weights_only=True)``."""
    cfg = dict(
        url=RELEASE_URL + file if file else None, num_classes=1000, input_size=(3, 224, 224), pool_size=None,
        crop_pct=1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj", classifier="head", custom_load=True, license="mit",
        paper_ids="arXiv:2406.04303", paper_name="Vision-LSTM: xLSTM as Generic Vision Backbone",
        origin_url="https://github.com/NX-AI/vision-lstm",
    )
    if top1 is not None:
        cfg["notes"] = (f"ImageNet-1K top-1 {top1} (224, crop ratio 1.0)",)
    return {**cfg, **kwargs}


# The released checkpoints (../shared/reference: file names and top-1). The first tag of a model is its default.
default_cfgs = generate_default_cfgs({
    "vil2_tiny.e800_in1k": _cfg("vil2_tiny16_e800_in1k.th", 78.3),
    "vil2_tiny.e400_in1k": _cfg("vil2_tiny16_e400_in1k.th", 77.2),
    "vil2_small.e400_in1k": _cfg("vil2_small16_e400_in1k.th", 81.5),
    "vil2_base.e400_in1k": _cfg("vil2_base16_e400_in1k.th", 82.4),
    "vil_tiny.e800_in1k": _cfg("vil_tiny16_e800_in1k.th", 78.1),
    "vil_small.e400_in1k": _cfg("vil_small16_e400_in1k.th", 80.7),
    "vil_base.e400_in1k": _cfg("vil_base16_e400_in1k.th", 81.6),
    # Small configurations for CPU work and tests (not from the paper; no released weights).
    "vil2_nano": _cfg(input_size=(3, 32, 32)),
    "vil2_digits": _cfg(input_size=(1, 8, 8), num_classes=10, mean=(0.0,), std=(1.0,)),
})


def _create_vil(variant: str, pretrained: bool = False, **kwargs) -> VisionLSTM:
    """Build ``variant`` through timm (pretrained config, weights, ``features_only``). Weights come from the
    release URL through torch.hub's cache, or from ``pretrained_cfg_overlay=dict(file=PATH)``."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=overlay)
        if not cfg.file and not cfg.state_dict:
            name = f"{variant}.{cfg.tag}" if cfg.tag else variant
            if not cfg.url:
                raise RuntimeError(f"{name} has no released weights; load your own with "
                                   f"pretrained_cfg_overlay=dict(file=PATH) (vil.create_model: checkpoint=PATH)")
            try:
                overlay["file"] = download_cached_file(cfg.url, progress=True)
            except OSError as e:  # URLError, HTTPError, socket errors
                raise RuntimeError(
                    f"could not download the {name} weights from {cfg.url} ({e}). Without internet access, fetch "
                    f"that file elsewhere and pass it: timm.create_model({variant!r}, pretrained=True, "
                    f"pretrained_cfg_overlay=dict(file='/path/to/{os.path.basename(cfg.url)}')) or "
                    f"vil.create_model({variant!r}, checkpoint='/path/to/{os.path.basename(cfg.url)}')"
                ) from None
        overlay["custom_load"] = True  # a file given in the overlay is in the same formats
    return build_model_with_cfg(
        VisionLSTM, variant, pretrained, pretrained_cfg_overlay=overlay,
        feature_cfg=dict(feature_cls="getter", out_indices=segmentation_taps(kwargs.get("depth", 12),
                                                                            kwargs.get("concurrency", "sequential"))),
        **kwargs,
    )


_V1 = dict(version=1, conv_kind="causal1d", conv_kernel_size=4, proj_bias=False, norm_bias=False, pooling="bilateral_mean")


@register_model
def vil2_tiny(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """ViL-T (paper Table 1): dim 192, 12 block pairs, patch 16, 6.4M parameters."""
    return _create_vil("vil2_tiny", pretrained, **{"dim": 192, **kwargs})


@register_model
def vil2_small(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """ViL-S: dim 384, 12 block pairs, patch 16, 23.4M parameters."""
    return _create_vil("vil2_small", pretrained, **{"dim": 384, **kwargs})


@register_model
def vil2_base(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """ViL-B: dim 768, 12 block pairs, patch 16, 89.3M parameters."""
    return _create_vil("vil2_base", pretrained, **{"dim": 768, **kwargs})


@register_model
def vil_tiny(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """ViL-T of the first release (v1 layout)."""
    return _create_vil("vil_tiny", pretrained, **{"dim": 192, **_V1, **kwargs})


@register_model
def vil_small(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """ViL-S of the first release (v1 layout)."""
    return _create_vil("vil_small", pretrained, **{"dim": 384, **_V1, **kwargs})


@register_model
def vil_base(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """ViL-B of the first release (v1 layout)."""
    return _create_vil("vil_base", pretrained, **{"dim": 768, **_V1, **kwargs})


@register_model
def vil2_nano(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """A small v2 model for CPU work and tests: dim 64, 2 block pairs, patch 4 at 32x32."""
    return _create_vil("vil2_nano", pretrained, **{"dim": 64, "depth": 2, "patch_size": 4, "img_size": 32, **kwargs})


@register_model
def vil2_digits(pretrained: bool = False, **kwargs) -> VisionLSTM:
    """The digits demo's model: dim 64, 2 block pairs, patch 2 on 8x8 grey images, 10 classes."""
    return _create_vil("vil2_digits", pretrained, **{"dim": 64, "depth": 2, "patch_size": 2, "img_size": 8,
                                                     "in_chans": 1, "num_classes": 10, **kwargs})
