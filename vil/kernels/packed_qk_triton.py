"""The mLSTM layer's q/k projections and their gate shares, from the convolved input, as Triton kernels.

For x_conv (M, C) the layer needs one packed (M, 2C + G) tensor (the layout ``mlstm_gated_triton`` takes):

    q = x_conv @ blockdiag(wq)^T + bq     wq: (C / S, S, S), C / S blocks of S x S (S = 4 in ViL)
    k = x_conv @ blockdiag(wk)^T + bk
    g = x_conv @ wg^T + bg                wg: (G, C), the gate pre-activations' share of q and k
                                          (folded through the projections) and zero padding rows

As one dense matmul (the block-diagonal weights filled with zeros) this does C / S times the arithmetic
the blocks need. These kernels do the blocks' work on tensor-core tiles of BC channels (a BC x BC diagonal
tile holds BC / S blocks) and are bound by memory traffic instead. GPU time per layer on an H100 (bf16,
forward + backward, dense matmul -> kernels): ViL-T at 224, batch 256: 243 -> 190 us; ViL-S: 603 -> 364 us;
ViL-B, batch 128: 985 -> 373 us.

    _packed_qk_fwd_kernel  (M/BT,)           each program takes BT tokens through all channel tiles,
                                             writing q and k per tile and summing the gate columns
                                             over the tiles.
    _packed_qk_bwd_kernel  (M/(BT*T), C/BC)  dx = dq @ Wq + dk @ Wk + dg @ wg per channel tile, and from
                                             the same loads per-program partial sums of all weight and
                                             bias gradients (summed outside; the block weights'
                                             gradients kept as blocks).

Accumulation is in float32; products take the input's dtype, as autocast's matmul would.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vil.kernels.mlstm_triton import _dot, _dot_config, _pow2_block

__all__ = ["packed_qk_triton", "packed_qk_supported"]

# Launch configurations: tokens x channels per program and warps, and token tiles per backward program;
# the fastest on an H100 across ViL-T/S/B's widths at 224 (GPU time, bf16).
_CONFIGS = {"fwd": (64, 32, 8), "bwd": (64, 64, 4)}
_BWD_TILES = 8


@triton.jit
def _block_offsets(c0, BS: tl.constexpr, BC: tl.constexpr, TRANSPOSE: tl.constexpr):
    # Offsets and mask of the diagonal BC x BC tile at channel c0 of a block-diagonal weight stored as
    # (C / BS, BS, BS) blocks: W[o, i] = w[(c0 + o) // BS, (c0 + o) % BS, i % BS] inside a block, nothing
    # outside. (out, in); TRANSPOSE: (in, out).
    o = tl.arange(0, BC)[:, None]
    i = tl.arange(0, BC)[None, :]
    if TRANSPOSE:
        o, i = i, o
    return (c0 + o) * BS + i % BS, (o // BS) == (i // BS)


@triton.jit
def _block_tile(w_ptr, c0, BS: tl.constexpr, BC: tl.constexpr, TRANSPOSE: tl.constexpr):
    # The tile of _block_offsets, zero outside the blocks.
    offs, inside = _block_offsets(c0, BS, BC, TRANSPOSE)
    return tl.load(w_ptr + offs, mask=inside, other=0.0)


@triton.jit
def _packed_qk_fwd_kernel(
    x_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wg_ptr, bg_ptr, out_ptr, M, C, G, stride_xm, stride_om,
    HAS_QK_BIAS: tl.constexpr, HAS_G_BIAS: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
    BC: tl.constexpr, BG: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    t_ok = (offs_t < M)[:, None]
    offs_g = tl.arange(0, BG)
    g_ok = offs_g < G
    out_rows = out_ptr + offs_t[:, None] * stride_om
    gates = tl.zeros((BT, BG), dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xm + offs_c[None, :], mask=t_ok, other=0.0)
        q = _dot(x, _block_tile(wq_ptr, c0, BS, BC, True), tl.zeros((BT, BC), dtype=tl.float32),
                 OP_DTYPE, DOT_DTYPE, PRECISION)
        k = _dot(x, _block_tile(wk_ptr, c0, BS, BC, True), tl.zeros((BT, BC), dtype=tl.float32),
                 OP_DTYPE, DOT_DTYPE, PRECISION)
        if HAS_QK_BIAS:
            q += tl.load(bq_ptr + offs_c).to(tl.float32)[None, :]
            k += tl.load(bk_ptr + offs_c).to(tl.float32)[None, :]
        tl.store(out_rows + offs_c[None, :], q.to(out_ptr.dtype.element_ty), mask=t_ok)
        tl.store(out_rows + C + offs_c[None, :], k.to(out_ptr.dtype.element_ty), mask=t_ok)
        wg = tl.load(wg_ptr + offs_g[None, :] * C + offs_c[:, None], mask=g_ok[None, :], other=0.0)  # (BC, BG)
        gates = _dot(x, wg, gates, OP_DTYPE, DOT_DTYPE, PRECISION)
    if HAS_G_BIAS:
        gates += tl.load(bg_ptr + offs_g, mask=g_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_rows + 2 * C + offs_g[None, :], gates.to(out_ptr.dtype.element_ty), mask=t_ok & g_ok[None, :])


@triton.jit
def _packed_qk_bwd_kernel(
    d_ptr, x_ptr, wq_ptr, wk_ptr, wg_ptr, dx_ptr, pw_ptr, pb_ptr, pwg_ptr, pbg_ptr,
    M, C, G, stride_dm, stride_xm, stride_dxm,
    BS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BG: tl.constexpr, TILES: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # Partial sums, per program p: pw (P, 2, C * BS) the q and k blocks, pb (P, 2, C) their biases,
    # pwg (P, G, C) and pbg (P, G), the latter from the first channel tile's programs only.
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    c0 = pid_c * BC
    offs_c = c0 + tl.arange(0, BC)
    offs_g = tl.arange(0, BG)
    g_ok = offs_g < G
    wq = _block_tile(wq_ptr, c0, BS, BC, False)  # (out, in)
    wk = _block_tile(wk_ptr, c0, BS, BC, False)
    wg = tl.load(wg_ptr + offs_g[:, None] * C + offs_c[None, :], mask=g_ok[:, None], other=0.0)  # (BG, BC)
    dwq = tl.zeros((BC, BC), dtype=tl.float32)
    dwk = tl.zeros((BC, BC), dtype=tl.float32)
    dwg = tl.zeros((BG, BC), dtype=tl.float32)
    dbq = tl.zeros((BC,), dtype=tl.float32)
    dbk = tl.zeros((BC,), dtype=tl.float32)
    dbg = tl.zeros((BG,), dtype=tl.float32)
    for tile in range(TILES):
        offs_t = (pid_t * TILES + tile).to(tl.int64) * BT + tl.arange(0, BT)
        t_ok = (offs_t < M)[:, None]
        d_rows = d_ptr + offs_t[:, None] * stride_dm
        dq = tl.load(d_rows + offs_c[None, :], mask=t_ok, other=0.0)
        dk = tl.load(d_rows + C + offs_c[None, :], mask=t_ok, other=0.0)
        dg = tl.load(d_rows + 2 * C + offs_g[None, :], mask=t_ok & g_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xm + offs_c[None, :], mask=t_ok, other=0.0)
        dx = _dot(dq, wq, tl.zeros((BT, BC), dtype=tl.float32), OP_DTYPE, DOT_DTYPE, PRECISION)
        dx = _dot(dk, wk, dx, OP_DTYPE, DOT_DTYPE, PRECISION)
        dx = _dot(dg, wg, dx, OP_DTYPE, DOT_DTYPE, PRECISION)
        tl.store(dx_ptr + offs_t[:, None] * stride_dxm + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=t_ok)
        dwq = _dot(tl.trans(dq), x, dwq, OP_DTYPE, DOT_DTYPE, PRECISION)
        dwk = _dot(tl.trans(dk), x, dwk, OP_DTYPE, DOT_DTYPE, PRECISION)
        dwg = _dot(tl.trans(dg), x, dwg, OP_DTYPE, DOT_DTYPE, PRECISION)
        dbq += tl.sum(dq.to(tl.float32), 0)
        dbk += tl.sum(dk.to(tl.float32), 0)
        dbg += tl.sum(dg.to(tl.float32), 0)
    # Of the dense tiles' gradients only the diagonal blocks are the weights'.
    p = pid_t.to(tl.int64)
    offs, inside = _block_offsets(c0, BS, BC, False)
    blocks = pw_ptr + p * 2 * C * BS + offs
    tl.store(blocks, dwq, mask=inside)
    tl.store(blocks + C * BS, dwk, mask=inside)
    tl.store(pb_ptr + p * 2 * C + offs_c, dbq)
    tl.store(pb_ptr + p * 2 * C + C + offs_c, dbk)
    tl.store(pwg_ptr + p * G * C + offs_g[:, None] * C + offs_c[None, :], dwg, mask=g_ok[:, None])
    tl.store(pbg_ptr + p * G + offs_g, dbg, mask=g_ok & (pid_c == 0))


@triton_op("vil::packed_qk_fwd", mutates_args={})
def _packed_qk_fwd(
    x: torch.Tensor, wq: torch.Tensor, bq: Optional[torch.Tensor], wk: torch.Tensor, bk: Optional[torch.Tensor],
    wg: torch.Tensor, bg: Optional[torch.Tensor],
) -> torch.Tensor:
    M, C = x.shape
    G = wg.shape[0]
    out = torch.empty(M, 2 * C + G, device=x.device, dtype=x.dtype)
    bt, cap, warps = _CONFIGS["fwd"]
    wrap_triton(_packed_qk_fwd_kernel)[(triton.cdiv(M, bt),)](
        x, wq, wq if bq is None else bq, wk, wk if bk is None else bk, wg, wg if bg is None else bg, out,
        M, C, G, x.stride(0), out.stride(0), HAS_QK_BIAS=bq is not None, HAS_G_BIAS=bg is not None,
        BS=wq.shape[-1], BT=bt, BC=_pow2_block(C, cap), BG=max(16, triton.next_power_of_2(G)),
        num_warps=warps, **_dot_config(x.dtype),
    )
    return out


@triton_op("vil::packed_qk_bwd", mutates_args={})
def _packed_qk_bwd(
    d: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, C = x.shape
    G, BS = wg.shape[0], wq.shape[-1]
    bt, cap, warps = _CONFIGS["bwd"]
    tiles = min(_BWD_TILES, triton.cdiv(M, bt))
    P = triton.cdiv(M, bt * tiles)
    dx = torch.empty_like(x)
    pw = torch.empty(P, 2, C * BS, device=x.device, dtype=torch.float32)
    pb = torch.empty(P, 2, C, device=x.device, dtype=torch.float32)
    pwg = torch.empty(P, G, C, device=x.device, dtype=torch.float32)
    pbg = torch.empty(P, G, device=x.device, dtype=torch.float32)
    bc = _pow2_block(C, cap)
    wrap_triton(_packed_qk_bwd_kernel)[(P, C // bc)](
        d, x, wq, wk, wg, dx, pw, pb, pwg, pbg, M, C, G, d.stride(0), x.stride(0), dx.stride(0),
        BS=BS, BT=bt, BC=bc, BG=max(16, triton.next_power_of_2(G)), TILES=tiles,
        num_warps=warps, **_dot_config(x.dtype),
    )
    # Separate sums: a triton_op's outputs may not alias each other.
    dwq, dwk = (pw[:, j].sum(0).view(C // BS, BS, BS).to(w.dtype) for j, w in enumerate((wq, wk)))
    dbq, dbk = pb[:, 0].sum(0), pb[:, 1].sum(0)
    return dwq, dbq, dwk, dbk, pwg.sum(0).to(wg.dtype), pbg.sum(0), dx


def _setup_context(ctx, inputs, output):
    x, wq, bq, wk, bk, wg, bg = inputs
    ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in (bq, bk, bg))
    ctx.save_for_backward(x, wq, wk, wg)


def _backward(ctx, d):
    x, wq, wk, wg = ctx.saved_tensors
    dwq, dbq, dwk, dbk, dwg, dbg, dx = _packed_qk_bwd(d.contiguous(), x, wq, wk, wg)
    bq_dtype, bk_dtype, bg_dtype = ctx.bias_dtypes
    return (dx, dwq, None if bq_dtype is None else dbq.to(bq_dtype), dwk, None if bk_dtype is None else dbk.to(bk_dtype),
            dwg, None if bg_dtype is None else dbg.to(bg_dtype))


_packed_qk_fwd.register_autograd(_backward, setup_context=_setup_context)


def packed_qk_supported(C: int, block_size: int) -> bool:
    """Whether the kernels take this width: C a multiple of 16 and blocks of a power of two <= 16."""
    return C % 16 == 0 and block_size in (1, 2, 4, 8, 16)


def packed_qk_triton(
    x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor, bk: torch.Tensor | None,
    wg: torch.Tensor, bg: torch.Tensor | None,
) -> torch.Tensor:
    """``cat([x @ blockdiag(wq)^T + bq, x @ blockdiag(wk)^T + bk, x @ wg^T + bg], -1)`` for x (..., C),
    wq and wk (C / S, S, S) blocks, wg (G, C); differentiable in all inputs. Products round their operands
    to x's dtype (as autocast's matmul does), sums are in float32; the output has x's dtype and the
    gradients their inputs' dtypes."""
    C = x.shape[-1]
    S = wq.shape[-1]
    if wq.shape != (C // S, S, S) or wk.shape != wq.shape or C % S:
        raise ValueError(f"wq and wk must be ({C} / S, S, S) blocks for width {C}, got {tuple(wq.shape)} "
                         f"and {tuple(wk.shape)}")
    if not packed_qk_supported(C, S):
        raise ValueError(f"width {C} must be a multiple of 16 and the blocks ({S} x {S}) a power of two <= 16")
    if wg.dim() != 2 or wg.shape[1] != C:
        raise ValueError(f"wg must have shape (G, {C}), got {tuple(wg.shape)}")
    for name, b, n in (("bq", bq, C), ("bk", bk, C), ("bg", bg, wg.shape[0])):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    lead = x.shape[:-1]
    if x.numel() == 0:
        return x.new_empty(*lead, 2 * C + wg.shape[0])
    out = _packed_qk_fwd(x.reshape(-1, C).contiguous(), wq.contiguous(), bq, wk.contiguous(), bk, wg.contiguous(), bg)
    return out.view(*lead, out.shape[-1])
