"""The mLSTM cell (tiled parallel-form kernels) fused with the output stage of the mLSTM layer.

Per token and head, after the cell's h (B, NH, S, DH):

    out = (LayerNorm_DH(h) * (1 + w) + b + skip * x) * silu(z)        -> (B, S, NH * DH)

with the per-head norm's weight w (stored as an offset from 1) and bias b, the learnable skip, the skip
input x (the convolved q/k input) and the output gate's pre-activation z, all (NH * DH,) or (B, S, NH * DH).

Under torch.compile the same composition costs several elementwise and reduction kernels, forward and
backward, each a pass over float32 tensors of the layer's width. Here it is one pass each way:

    _norm_gate_fwd_kernel  (S/BT, NH, B)  out from h, x, z.
    _norm_gate_bwd_kernel  (S/(BT*TILES), NH, B)  dh (in the cell's input dtype, as its products round
                                          it to that anyway), the row sums dh . h in float32 that the
                                          cell's backward pass needs, dz, dx, and per-program partial
                                          sums of the weight gradients (summed over programs outside).

In a ViL-T training step at 224 (H100, bf16) the composition took about 13 ms of GPU time; these two
kernels take 6.1 ms.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vil.kernels.mlstm_parallel_triton import _tile, cell_backward, cell_forward
from vil.kernels.mlstm_triton import (
    GradDest, _cast, _check_inputs, _empty_heads_like, _offset, _strides3, _strides4, chunk_backward, chunk_forward,
)

__all__ = ["mlstm_gated_triton"]


@triton.jit
def _head_rows(h_ptr, i_b, i_h, offs_t, offs_d, stride_hb, stride_hh, stride_hs, stride_hd, t_ok, d_ok,
               DH: tl.constexpr, eps: tl.constexpr):
    # A tile of h rows of one head, normalized over the head dim: (h, hn, 1/std), padding zero.
    h = _tile(h_ptr + i_b * stride_hb + i_h * stride_hh, offs_t, offs_d, stride_hs, stride_hd, t_ok, d_ok)
    h = h.to(tl.float32)
    mean = tl.sum(h, 1) / DH
    centered = tl.where(t_ok[:, None] & d_ok[None, :], h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / DH + eps)
    return h, centered * rstd[:, None], rstd


@triton.jit
def _channel_params(w_ptr, b_ptr, skip_ptr, c, d_ok, HAS_BIAS: tl.constexpr):
    # The norm's scale 1 + w, its bias (zero without one) and the skip weight of channels c.
    w = 1.0 + tl.load(w_ptr + c, mask=d_ok, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + c, mask=d_ok & HAS_BIAS, other=0.0).to(tl.float32)
    skip = tl.load(skip_ptr + c, mask=d_ok, other=0.0).to(tl.float32)
    return w, bias, skip


@triton.jit
def _norm_gate_fwd_kernel(
    h_ptr, x_ptr, z_ptr, w_ptr, b_ptr, skip_ptr, out_ptr,
    stride_hb, stride_hh, stride_hs, stride_hd,
    stride_xb, stride_xs, stride_xc, stride_zb, stride_zs, stride_zc, stride_ob, stride_os, stride_oc,
    S, eps: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    t_ok = offs_t < S
    offs_d = tl.arange(0, DHP)
    d_ok = offs_d < DH
    _, hn, _ = _head_rows(h_ptr, i_b, i_h, offs_t, offs_d, stride_hb, stride_hh, stride_hs, stride_hd, t_ok, d_ok,
                          DH, eps)

    c = i_h * DH + offs_d  # channel in the layer's width
    w, bias, skip = _channel_params(w_ptr, b_ptr, skip_ptr, c, d_ok, HAS_BIAS)
    x = _tile(x_ptr + i_b * stride_xb, offs_t, c, stride_xs, stride_xc, t_ok, d_ok).to(tl.float32)
    z = _tile(z_ptr + i_b * stride_zb, offs_t, c, stride_zs, stride_zc, t_ok, d_ok).to(tl.float32)
    pre = hn * w[None, :] + skip[None, :] * x + bias[None, :]
    out = pre * z * tl.sigmoid(z)
    tl.store(out_ptr + i_b * stride_ob + offs_t[:, None] * stride_os + c[None, :] * stride_oc,
             _cast(out, out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _norm_gate_bwd_kernel(
    dout_ptr, h_ptr, x_ptr, z_ptr, w_ptr, b_ptr, skip_ptr,
    dh_ptr, dhh_ptr, dx_ptr, dz_ptr, part_ptr,
    stride_db, stride_ds, stride_dc,
    stride_hb, stride_hh, stride_hs, stride_hd,
    stride_xb, stride_xs, stride_xc, stride_zb, stride_zs, stride_zc,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_gxb, stride_gxs, stride_gxc, stride_gzb, stride_gzs, stride_gzc,
    NH, S, eps: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BT: tl.constexpr, TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """TILES consecutive token tiles of one head. The weight gradients' column sums are accumulated over
    them and reduced once: a reduction across the rows of every tile would cost as much as the rest."""
    pid_s = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, DHP)
    d_ok = offs_d < DH
    c = i_h * DH + offs_d  # channel in the layer's width
    w, bias, skip = _channel_params(w_ptr, b_ptr, skip_ptr, c, d_ok, HAS_BIAS)
    acc_w = tl.zeros([BT, DHP], dtype=tl.float32)
    acc_b = tl.zeros([BT, DHP], dtype=tl.float32)
    acc_s = tl.zeros([BT, DHP], dtype=tl.float32)
    for i in range(TILES):
        offs_t = (pid_s * TILES + i) * BT + tl.arange(0, BT)
        t_ok = offs_t < S
        mask = t_ok[:, None] & d_ok[None, :]
        h, hn, rstd = _head_rows(h_ptr, i_b, i_h, offs_t, offs_d, stride_hb, stride_hh, stride_hs, stride_hd,
                                 t_ok, d_ok, DH, eps)
        x = _tile(x_ptr + i_b * stride_xb, offs_t, c, stride_xs, stride_xc, t_ok, d_ok).to(tl.float32)
        z = _tile(z_ptr + i_b * stride_zb, offs_t, c, stride_zs, stride_zc, t_ok, d_ok).to(tl.float32)
        dout = _tile(dout_ptr + i_b * stride_db, offs_t, c, stride_ds, stride_dc, t_ok, d_ok).to(tl.float32)
        sig = tl.sigmoid(z)
        g = dout * z * sig  # gradient of the gate's input
        pre = hn * w[None, :] + skip[None, :] * x + bias[None, :]
        dz = dout * pre * sig * (1.0 + z * (1.0 - sig))
        dhn = g * w[None, :]
        dh = rstd[:, None] * (dhn - (tl.sum(dhn, 1) / DH)[:, None] - hn * (tl.sum(dhn * hn, 1) / DH)[:, None])
        # The cell's backward pass sees dh rounded; its row sums dh . h are formed from the same values.
        dh = _cast(tl.where(mask, dh, 0.0), dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + i_b * stride_gb + i_h * stride_gh + offs_t[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 dh, mask=mask)
        tl.store(dhh_ptr + (i_b * NH + i_h) * S + offs_t, tl.sum(dh.to(tl.float32) * h, 1), mask=t_ok)
        tl.store(dx_ptr + i_b * stride_gxb + offs_t[:, None] * stride_gxs + c[None, :] * stride_gxc,
                 _cast(g * skip[None, :], dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + i_b * stride_gzb + offs_t[:, None] * stride_gzs + c[None, :] * stride_gzc,
                 _cast(dz, dz_ptr.dtype.element_ty), mask=mask)
        acc_w += g * hn
        acc_b += g
        acc_s += g * x
    # One row of the (3, B * programs along S, NH * DH) partial sums.
    C = NH * DH
    part = part_ptr + (i_b * tl.num_programs(0) + pid_s) * C + c
    TOTAL = tl.num_programs(2).to(tl.int64) * tl.num_programs(0) * C
    tl.store(part, tl.sum(acc_w, 0), mask=d_ok)
    tl.store(part + TOTAL, tl.sum(acc_b, 0), mask=d_ok)
    tl.store(part + 2 * TOTAL, tl.sum(acc_s, 0), mask=d_ok)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------


# Elements per tile, warps, and (backward) token tiles per program: the fastest measured on an H100 for
# ViL-T heads at 196 tokens, batch 256 (forward 68 us per call, backward 187 us; a copy of x takes 32 us).
# The backward kernel keeps many tiles live: larger tiles spill registers. Heads padded to 512 features
# (ViL-B) do best with one row per tile and one warp (backward 420 instead of 494 us per call at batch
# 128, with the weight-gradient sums); ViL-S heads gain less than 4% from any other setting.
_FWD = dict(elements=4096, warps=4)
_BWD = dict(elements=1024, warps=2, tiles=4)
_BWD_WIDE = dict(elements=512, warps=1, tiles=4)


def _tile_rows(DH: int, elements: int) -> tuple[int, int]:
    # Head dim padded to a power of two, and token rows per tile.
    dhp = max(16, triton.next_power_of_2(DH))
    return dhp, max(1, elements // dhp)


def _norm_gate_forward(h, x, z, norm_weight, norm_bias, skip, norm_eps, out_dtype):
    B, NH, S, DH = h.shape
    dhp, bt = _tile_rows(DH, _FWD["elements"])
    out = torch.empty(B, S, NH * DH, device=h.device, dtype=out_dtype)
    wrap_triton(_norm_gate_fwd_kernel)[(triton.cdiv(S, bt), NH, B)](
        h, x, z, norm_weight, norm_weight if norm_bias is None else norm_bias, skip, out,
        *_strides4(h), *_strides3(x), *_strides3(z), *_strides3(out),
        S, norm_eps, DH=DH, DHP=dhp, BT=bt, HAS_BIAS=norm_bias is not None, num_warps=_FWD["warps"],
    )
    return out


def _norm_gate_backward(dout, h, x, z, norm_weight, norm_bias, skip, norm_eps, dh_like, dz):
    # dz goes into the first C columns of the given tensor (the packed gradient, passed whole, see
    # GradDest); the other gradients are returned.
    B, NH, S, DH = h.shape
    config = _BWD_WIDE if DH > 256 else _BWD
    dhp, bt = _tile_rows(DH, config["elements"])
    tiles = min(config["tiles"], triton.cdiv(S, bt))
    programs = triton.cdiv(S, bt * tiles)
    dh = _empty_heads_like(dh_like)
    dh_dot_h = torch.empty(B * NH, S, device=h.device, dtype=torch.float32)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    partials = torch.empty(3, B * programs, NH * DH, device=h.device, dtype=torch.float32)
    wrap_triton(_norm_gate_bwd_kernel)[(programs, NH, B)](
        dout, h, x, z, norm_weight, norm_weight if norm_bias is None else norm_bias, skip,
        dh, dh_dot_h, dx, dz, partials,
        *_strides3(dout), *_strides4(h), *_strides3(x), *_strides3(z),
        *_strides4(dh), *_strides3(dx), *_strides3(dz),
        NH, S, norm_eps, DH=DH, DHP=dhp, BT=bt, TILES=tiles, HAS_BIAS=norm_bias is not None,
        num_warps=config["warps"],
    )
    dw, db, dskip = (p.sum(0) for p in partials)  # three tensors: a custom op's outputs may not alias
    return dh, dh_dot_h, dx, dw, db, dskip


def _features(qk_gates: torch.Tensor, zv_gates: torch.Tensor, num_heads: int, C: int):
    """Views of the packed projections' features: q, k, v (B, NH, S, DH) and z (B, S, C)."""
    heads = lambda t: t.unflatten(-1, (num_heads, C // num_heads)).transpose(1, 2)  # noqa: E731
    return heads(qk_gates[..., :C]), heads(qk_gates[..., C : 2 * C]), heads(zv_gates[..., C : 2 * C]), zv_gates[..., :C]


def _gate_shares(packed: torch.Tensor, num_heads: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed tensor's gate columns as (B, NH, S) views: input gate, forget gate."""
    gates = packed[..., 2 * C : 2 * C + 2 * num_heads].transpose(1, 2)
    return gates[:, :num_heads], gates[:, num_heads:]


def _unpack(qk_gates: torch.Tensor, zv_gates: torch.Tensor, num_heads: int, C: int):
    """q, k, v, z and the gate pre-activations, the sums of their two shares (float32)."""
    shares = zip(_gate_shares(qk_gates, num_heads, C), _gate_shares(zv_gates, num_heads, C))
    return *_features(qk_gates, zv_gates, num_heads, C), *(a.float() + b.float() for a, b in shares)


@triton_op("vil::mlstm_gated_fwd", mutates_args={})
def _gated_fwd(
    qk_gates: torch.Tensor, zv_gates: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: Optional[torch.Tensor], skip: torch.Tensor, num_heads: int, eps: float, norm_eps: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, z, igate, fgate = _unpack(qk_gates, zv_gates, num_heads, x.shape[-1])
    if chunk_size:
        # The chunkwise kernels' states are kept too: recomputing them would cost a sequential pass
        # over the chunks in the backward pass (a seventh of the cell's time at 4096 tokens).
        h, *cell = chunk_forward(q, k, v, igate, fgate, chunk_size, eps)
        cell.append(torch.empty(0, device=q.device))
    else:
        h, *cell = cell_forward(q, k, v, igate, fgate, eps)
    out = _norm_gate_forward(h, x, z, norm_weight, norm_bias, skip, norm_eps, q.dtype)
    return out, h, *cell  # all but out kept for the backward pass


@triton_op("vil::mlstm_gated_bwd", mutates_args={})
def _gated_bwd(
    dout: torch.Tensor, qk_gates: torch.Tensor, zv_gates: torch.Tensor, x: torch.Tensor, h: torch.Tensor,
    cell0: torch.Tensor, cell1: torch.Tensor, cell2: torch.Tensor, cell3: torch.Tensor,
    norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], skip: torch.Tensor, num_heads: int,
    eps: float, norm_eps: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    q, k, v, z, igate, fgate = _unpack(qk_gates, zv_gates, num_heads, C)
    # The gradients in the packed layouts, each part written in place by the kernels: no concatenation.
    d_qk, d_zv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (qk_gates, zv_gates))
    dq, dk, dv, _ = _features(d_qk, d_zv, num_heads, C)
    dh, dh_dot_h, dx, dw, db, dskip = _norm_gate_backward(dout, h, x, z, norm_weight, norm_bias, skip, norm_eps, q, d_zv)
    dig, _ = _gate_shares(d_qk, num_heads, C)
    # Both shares of a gate get its gradient; the padding columns get zeros.
    dest = GradDest(d_qk, dq, dk, d_zv, dv, d_qk, _offset(d_qk, dig), num_heads, dig.stride(),
                    g_copy=d_zv, g_pad=qk_gates.shape[-1] - 2 * C - 2 * num_heads)
    if chunk_size:
        chunk_backward(dh, q, k, v, igate, fgate, chunk_size, eps, dest, states=(cell0, cell1, cell2))
    else:
        cell_backward(dh, dh_dot_h, q, k, v, fgate, cell0, cell1, cell2, cell3, dest)
    return d_qk, d_zv, dx, dw, db, dskip


def _setup_context(ctx, inputs, output):
    qk_gates, zv_gates, x, norm_weight, norm_bias, skip, num_heads, eps, norm_eps, chunk_size = inputs
    ctx.num_heads, ctx.eps, ctx.norm_eps, ctx.chunk_size = num_heads, eps, norm_eps, chunk_size
    ctx.has_bias = norm_bias is not None
    ctx.save_for_backward(qk_gates, zv_gates, x, *output[1:], norm_weight, norm_bias, skip)


def _backward(ctx, dout, *_):
    qk_gates, zv_gates, x, h, *cell, norm_weight, norm_bias, skip = ctx.saved_tensors
    d_qk, d_zv, dx, dw, db, dskip = _gated_bwd(dout, qk_gates, zv_gates, x, h, *cell, norm_weight, norm_bias,
                                               skip, ctx.num_heads, ctx.eps, ctx.norm_eps, ctx.chunk_size)
    return d_qk, d_zv, dx, dw, db if ctx.has_bias else None, dskip, None, None, None, None


_gated_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlstm_gated_triton(
    qk_gates: torch.Tensor, zv_gates: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None, skip: torch.Tensor, num_heads: int, eps: float = 1e-6, norm_eps: float = 1e-5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``(LayerNorm_DH(h) * (1 + norm_weight) + norm_bias + skip * x) * silu(z)`` for the mLSTM cell's
    h = mlstm(q, k, v, igate, fgate), in the cell's tiled kernels (the chunkwise kernels with chunks of
    ``chunk_size`` tokens if given) and one fused pass each way around them; differentiable w.r.t. all
    tensor inputs.

    The cell's inputs come packed as the layer's two projection matmuls give them (C = NH * DH features,
    head-major, C taken from x; then G >= 2 NH gate columns, any padding after the gates):

        qk_gates (B, S, 2 C + G): q | k | input-gate shares (NH) | forget-gate shares (NH) | padding
        zv_gates (B, S, 2 C + G): z | v | input-gate shares (NH) | forget-gate shares (NH) | padding

    Each gate pre-activation is the sum of its two shares. Their gradients come back in the same layouts
    (both shares get the gate's gradient, the padding zero), so the matmuls' backward passes take them
    without concatenating per-part gradients. x: (B, S, C), any strides; norm_weight, norm_bias (or None),
    skip: (C,). Returns (B, S, C) in qk_gates' dtype.
    """
    if qk_gates.dim() != 3 or zv_gates.shape != qk_gates.shape:
        raise ValueError(f"qk_gates and zv_gates must share a (B, S, 2 C + G) shape, got {tuple(qk_gates.shape)} "
                         f"and {tuple(zv_gates.shape)}")
    B, S, width = qk_gates.shape
    if x.dim() != 3 or x.shape[:2] != (B, S):
        raise ValueError(f"x must have shape ({B}, {S}, C), got {tuple(x.shape)}")
    C = x.shape[2]
    if C % num_heads or width < 2 * C + 2 * num_heads:
        raise ValueError(f"packed width {width} is not 2 C + G with C = {C} (from x) a multiple of "
                         f"num_heads={num_heads} and G >= {2 * num_heads}")
    if qk_gates.stride(-1) != 1 or zv_gates.stride(-1) != 1:
        raise ValueError("qk_gates and zv_gates must be contiguous in their last dim")
    q, k, v, _ = _features(qk_gates, zv_gates, num_heads, C)
    _check_inputs(q, k, v, *_gate_shares(qk_gates, num_heads, C))
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("skip", skip)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"{name} must have shape {(C,)}, got {tuple(t.shape)}")
    if S == 0:
        return torch.empty(B, 0, C, device=x.device, dtype=qk_gates.dtype)
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return _gated_fwd(qk_gates, zv_gates, x, norm_weight, norm_bias, skip, num_heads, eps, norm_eps, chunk_size or 0)[0]
