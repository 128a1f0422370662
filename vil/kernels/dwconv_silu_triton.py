"""Depthwise 2D convolution followed by SiLU, on token-major feature maps, as Triton kernels.

The mLSTM layer convolves its q/k input over the patch grid, per channel, and applies SiLU:

    out[b, i, j, c] = silu(bias[c] + sum_{u,v} weight[c, 0, u, v] * x[b, i + u - P, j + v - P, c])

with K x K kernels (K odd, P = K // 2, zero padding, stride 1). x comes as (B, H * W, C) tokens in
row-major grid order, straight from the up-projection matmul. Through ``F.conv2d`` this is a cuDNN
convolution on a channels-last view plus elementwise SiLU kernels each way: in a ViL-T training step
at 224 (H100, bf16, batch 256) about 6.6 ms of GPU time. These kernels take about 5.0 ms there, plus
0.8 ms for adding the output's two gradients (q/k projections and skip), which torch.compile otherwise
fuses into the SiLU backward; and the pre-activation is not stored (0.8 GiB less at that batch):

    _dwconv_fwd_kernel        (B*N/BT, C/BC)  out; the pre-activation is not kept.
    _dwconv_bwd_pre_kernel    (B*N/BT, C/BC)  recomputes the pre-activation and writes its gradient
                                              d = dout * silu'(pre) in dout's dtype.
    _dwconv_bwd_input_kernel  (B*N/BT, C/BC)  dx, the convolution of d with the flipped kernel, and from
                                              the same loads of d per-program partial sums of the weight
                                              and bias gradients (summed outside).

Accumulation is in float32; weights are read in their own dtype (float32 under autocast).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["dwconv2d_silu_triton"]

# Launch configurations per kernel: tokens x channels per program, and warps; the fastest on an H100
# at ViL-T's 224 and 1024 shapes. The input-gradient kernel reduces over its token tiles, which is cheap
# within one warp.
_CONFIGS = {"fwd": (16, 128, 4), "bwd_pre": (16, 128, 4), "bwd_input": (8, 128, 1)}
_BWD_INPUT_TILES = 4  # token tiles per program of the input-gradient kernel


@triton.jit
def _tap(x_ptr, offs_c, b, i, j, t_ok, c_ok, du, dv, H, W, stride_b, stride_n, stride_c):
    # x at grid offset (du, dv) from each token, zero outside the image: (BT, BC) float32.
    ii, jj = i + du, j + dv
    ok = t_ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
    ptrs = x_ptr + b[:, None] * stride_b + (ii * W + jj)[:, None] * stride_n + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tile_coords(pid_t, pid_c, M, N, W, C, BT: tl.constexpr, BC: tl.constexpr):
    offs_t = pid_t * BT + tl.arange(0, BT)  # token index over B * N
    offs_c = pid_c * BC + tl.arange(0, BC)
    t_ok = offs_t < M
    b = (offs_t // N).to(tl.int64)
    n = offs_t % N
    return offs_t, offs_c, t_ok, offs_c < C, b, n // W, n % W


@triton.jit
def _pre_activation(x_ptr, w_ptr, bias_ptr, offs_c, b, i, j, t_ok, c_ok, H, W,
                    stride_b, stride_n, stride_c, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    acc = tl.zeros((t_ok.shape[0], offs_c.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    for u in tl.static_range(K):
        for v in tl.static_range(K):
            w = tl.load(w_ptr + offs_c * (K * K) + u * K + v, mask=c_ok, other=0.0).to(tl.float32)
            x = _tap(x_ptr, offs_c, b, i, j, t_ok, c_ok, u - K // 2, v - K // 2, H, W,
                     stride_b, stride_n, stride_c)
            acc += x * w[None, :]
    return acc


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, H, W, C,
    stride_xb, stride_xn, stride_xc, stride_ob, stride_on, stride_oc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    offs_t, offs_c, t_ok, c_ok, b, i, j = _tile_coords(tl.program_id(0), tl.program_id(1), M, N, W, C, BT, BC)
    pre = _pre_activation(x_ptr, w_ptr, bias_ptr, offs_c, b, i, j, t_ok, c_ok, H, W,
                          stride_xb, stride_xn, stride_xc, K, HAS_BIAS)
    out = pre * tl.sigmoid(pre)
    ptrs = out_ptr + b[:, None] * stride_ob + (offs_t % N)[:, None] * stride_on + offs_c[None, :] * stride_oc
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _dwconv_bwd_pre_kernel(
    dout_ptr, x_ptr, w_ptr, bias_ptr, d_ptr, M, N, H, W, C,
    stride_gb, stride_gn, stride_gc, stride_xb, stride_xn, stride_xc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    offs_t, offs_c, t_ok, c_ok, b, i, j = _tile_coords(tl.program_id(0), tl.program_id(1), M, N, W, C, BT, BC)
    pre = _pre_activation(x_ptr, w_ptr, bias_ptr, offs_c, b, i, j, t_ok, c_ok, H, W,
                          stride_xb, stride_xn, stride_xc, K, HAS_BIAS)
    mask = t_ok[:, None] & c_ok[None, :]
    g = tl.load(dout_ptr + b[:, None] * stride_gb + (offs_t % N)[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(pre)
    d = g * s * (1.0 + pre * (1.0 - s))
    # d is stored contiguous (B * N, C).
    tl.store(d_ptr + offs_t.to(tl.int64)[:, None] * C + offs_c[None, :], d.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_bwd_input_kernel(
    d_ptr, x_ptr, w_ptr, dx_ptr, partial_ptr, M, N, H, W, C,
    stride_xb, stride_xn, stride_xc, stride_db, stride_dn, stride_dc,
    K: tl.constexpr, TAPS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, TILES: tl.constexpr,
):
    # Each program takes TILES consecutive token tiles, so that the partial sums of the weight and bias
    # gradients (rows 0..K*K-1 the taps, row K*K the bias, padded to TAPS rows) stay few: one set per
    # tile would be as large as x.
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, TAPS)
    sums = tl.zeros((TAPS, BC), dtype=tl.float32)
    for tile in range(TILES):
        offs_t, offs_c, t_ok, c_ok, b, i, j = _tile_coords(pid_t * TILES + tile, pid_c, M, N, W, C, BT, BC)
        mask = t_ok[:, None] & c_ok[None, :]
        n = offs_t % N
        x = tl.load(x_ptr + b[:, None] * stride_xb + n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                    mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        for u in tl.static_range(K):
            for v in tl.static_range(K):
                # The pre-activation gradient at the token that x fed through tap (u, v): it flows back to
                # x with weight w[u, v] and into w[u, v] times x.
                d = _tap(d_ptr, offs_c, b, i, j, t_ok, c_ok, K // 2 - u, K // 2 - v, H, W,
                         N * C, C, 1)
                w = tl.load(w_ptr + offs_c * (K * K) + u * K + v, mask=c_ok, other=0.0).to(tl.float32)
                acc += d * w[None, :]
                sums += tl.where(rows[:, None] == u * K + v, tl.sum(d * x, 0)[None, :], 0.0)
                if u * K + v == K * K // 2:  # the centre tap: d itself, summed for the bias
                    sums += tl.where(rows[:, None] == K * K, tl.sum(d, 0)[None, :], 0.0)
        ptrs = dx_ptr + b[:, None] * stride_db + n[:, None] * stride_dn + offs_c[None, :] * stride_dc
        tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)
    offs_c = pid_c * BC + tl.arange(0, BC)
    part = partial_ptr + pid_t.to(tl.int64) * (K * K + 1) * C + rows[:, None] * C + offs_c[None, :]
    tl.store(part, sums, mask=(rows[:, None] <= K * K) & (offs_c < C)[None, :])


def _launch(kernel, name: str, M: int, C: int, *args, tiles: int = 1, **meta):
    bt, bc, warps = _CONFIGS[name]
    grid = (triton.cdiv(M, bt * tiles), triton.cdiv(C, bc))
    wrap_triton(kernel)[grid](*args, BT=bt, BC=bc, num_warps=warps, **meta)


@triton_op("vil::dwconv2d_silu_fwd", mutates_args={})
def _dwconv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], H: int, W: int) -> torch.Tensor:
    B, N, C = x.shape
    K = weight.shape[-1]
    out = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    _launch(_dwconv_fwd_kernel, "fwd", B * N, C, x, weight, weight if bias is None else bias, out, B * N, N, H, W, C,
            *x.stride(), *out.stride(), K=K, HAS_BIAS=bias is not None)
    return out


@triton_op("vil::dwconv2d_silu_bwd", mutates_args={})
def _dwconv_bwd(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], H: int, W: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, C = x.shape
    K = weight.shape[-1]
    d = torch.empty(B, N, C, device=x.device, dtype=dout.dtype)
    _launch(_dwconv_bwd_pre_kernel, "bwd_pre", B * N, C, dout, x, weight, weight if bias is None else bias, d,
            B * N, N, H, W, C, *dout.stride(), *x.stride(), K=K, HAS_BIAS=bias is not None)
    dx = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    bt = _CONFIGS["bwd_input"][0]
    tiles = min(_BWD_INPUT_TILES, triton.cdiv(B * N, bt))
    partials = torch.empty(triton.cdiv(B * N, bt * tiles), K * K + 1, C, device=x.device, dtype=torch.float32)
    _launch(_dwconv_bwd_input_kernel, "bwd_input", B * N, C, d, x, weight, dx, partials, B * N, N, H, W, C,
            *x.stride(), *dx.stride(), K=K, TAPS=triton.next_power_of_2(K * K + 1), TILES=tiles, tiles=tiles)
    sums = partials.sum(0)
    dw = sums[: K * K].t().reshape(weight.shape).to(weight.dtype)
    db = sums[K * K].to(weight.dtype if bias is None else bias.dtype, copy=True)  # outputs may not alias
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, H, W = inputs
    ctx.grid, ctx.has_bias = (H, W), bias is not None
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _dwconv_bwd(dout, x, weight, bias, *ctx.grid)
    return dx, dw, db if ctx.has_bias else None, None, None


_dwconv_fwd.register_autograd(_backward, setup_context=_setup_context)


def dwconv2d_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         grid: tuple[int, int]) -> torch.Tensor:
    """``silu(conv2d(x, weight, bias, padding=K // 2, groups=C))`` on tokens x (B, H * W, C) of an
    (H, W) grid in row-major order, returning (B, H * W, C) tokens; differentiable w.r.t. x, weight and
    bias. weight: (C, 1, K, K) with K odd, bias: (C,) or None."""
    H, W = grid
    if x.dim() != 3 or x.shape[1] != H * W:
        raise ValueError(f"x must have shape (B, {H} * {W}, C) for grid {tuple(grid)}, got {tuple(x.shape)}")
    C = x.shape[2]
    if weight.dim() != 4 or weight.shape[:2] != (C, 1) or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must be a depthwise ({C}, 1, K, K) kernel with K odd, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")
    if x.numel() == 0:
        return torch.empty_like(x)
    return _dwconv_fwd(x, weight.contiguous(), bias, H, W)
