"""Chunkwise mLSTM cell as fused Triton kernels, forward and backward.

Computes, per batch and head (all gate math in float32 or float64, ``k`` scaled by 1/sqrt(DH)):

    log D_ij = sum_{l=j+1..i} logsigmoid(fgate_l) + igate_j   (j <= i)
    m_i      = max_j log D_ij
    C_ij     = (q_i . k_j / sqrt(DH)) * exp(log D_ij - m_i)
    h_i      = sum_j C_ij v_j / (max(|sum_j C_ij|, exp(-m_i)) + eps)

The sequence is split into chunks of L tokens. Inside a chunk the quadratic form is evaluated
directly; earlier chunks enter through a DH x DH matrix state (and a DH normalizer state) carried
across chunk boundaries. Every exponential is taken of a non-positive number: log-forget sums are
chunk-local (``b``, the cumulative sum from the chunk start) and each boundary state is stabilized by
the exact ``m`` at the chunk's last token. Global cumulative sums are never differenced, because they
reach 1e4-1e5 for long sequences with strongly negative forget gates and would lose float32 accuracy.

Kernels (grid axes in launch order, BH = batch * heads, NC = number of chunks, NT = DH / BD):

forward
    _fwd_states_kernel  (NT, NT, BH)    walks the chunks in order per (k-tile, v-tile) of the state;
                                        computes the gate prefix sums (b, m) and writes the state at
                                        every chunk start: (BH, NC, DH, DH) + (BH, NC, DH).
    _fwd_output_kernel  (DH/BV, NC, BH) one output tile per chunk, all chunks in parallel.
backward (only q, k, v and the gates are kept from the forward pass; the rest is recomputed)
    _fwd_states_kernel                  as above.
    _bwd_norm_kernel    (NC, BH)        per token: 1/n and the gradient reaching den through n.
    _bwd_states_kernel  (NT, NT, BH)    walks the chunks in reverse and writes the gradient of the
                                        state at every chunk end.
    _bwd_grads_kernel   (NT, NC, BH)    dq, dk, dv of one DH tile of one chunk and that tile's share
                                        of the per-token gate-gradient sums, (NT, BH, S).
    _bwd_gates_kernel   (S/BT, BH)      sums the shares, applies d logsigmoid.

Memory is linear in the sequence length: one DH x DH state per chunk, no S x S matrices.
The stabilizer m is treated as a constant in the backward pass: it cancels from h except through
eps, which the gradient ignores.

Precision: half-precision inputs use half-precision tensor-core operands with float32 accumulation;
float32 inputs use exact float32 products (no tf32). Rows with |den| much smaller than sum_j |C_ij|
amplify rounding errors, the gradients by the square of that ratio. So the states stay in float32,
the backward pass does not reuse the forward's rounded h but recomputes den and dh . num, and every
product with a float32 operand (decay-weighted scores, states, state gradients) is split into two
half-precision products (about 16 mantissa bits) instead of one; products of two inputs (q k^T, the
gradients' products with dh) are exact in one.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["mlstm_chunkwise_triton"]

_INTERPRET = bool(triton.knobs.runtime.interpret)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# The CPU interpreter truncates float32 -> bfloat16; GPUs round to nearest even. Emulating the GPU
# rounding keeps interpreter runs representative of GPU accuracy.
_EMULATE_BF16_RNE = tl.constexpr(_INTERPRET)


# VIL_TRITON_AUTOTUNE=0 skips the search over launch configurations (it compiles every candidate once
# per shape, which takes a while): each kernel then runs with 4 warps and its first pipeline depth.
_AUTOTUNE = os.environ.get("VIL_TRITON_AUTOTUNE", "1") != "0"


def _autotune_configs(warps: tuple[int, ...], stages: tuple[int, ...]) -> list[triton.Config]:
    if _INTERPRET or not _AUTOTUNE:  # the interpreter would run every candidate once per call signature
        return [triton.Config({}, num_warps=4, num_stages=1 if _INTERPRET else stages[0])]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _logsigmoid(x):
    # log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), without overflow.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _split_hi_lo(x):
    # A float64 value as a float32 pair: its rounding and the float32 remainder.
    hi = x.to(tl.float32)
    return hi, (x - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    if _EMULATE_BF16_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # Operands are rounded to the input dtype (bf16/fp16/fp32) as on the GPU. DOT_DTYPE differs from
    # OP_DTYPE only under the CPU interpreter, whose half-precision tl.dot is unreliable.
    # acc is cast because under torch.compile a Python-float argument (the key scale) can arrive as
    # float64 and promote the accumulator with it.
    return tl.dot(
        _cast(a, OP_DTYPE).to(DOT_DTYPE), _cast(b, OP_DTYPE).to(DOT_DTYPE), acc.to(tl.float32),
        input_precision=PRECISION,
    )


@triton.jit
def _dot_split(a, b, acc, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # a @ b for a float32 b that must keep ~16 mantissa bits with half-precision operands: b is
    # split into a rounded part and its remainder, two tensor-core products instead of one.
    acc = _dot(a, b, acc, OP_DTYPE, DOT_DTYPE, PRECISION)
    if OP_DTYPE != tl.float32:
        acc = _dot(a, b - _cast(b, OP_DTYPE).to(tl.float32), acc, OP_DTYPE, DOT_DTYPE, PRECISION)
    return acc


@triton.jit
def _dot_split_lhs(a, b, acc, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # As _dot_split, for a float32 a.
    acc = _dot(a, b, acc, OP_DTYPE, DOT_DTYPE, PRECISION)
    if OP_DTYPE != tl.float32:
        acc = _dot(a - _cast(a, OP_DTYPE).to(tl.float32), b, acc, OP_DTYPE, DOT_DTYPE, PRECISION)
    return acc


@triton.jit
def _store_gate_grads(dg_ptr, copy_ptr, at, dig, dfg, ok, stride_gg, COPY: tl.constexpr):
    # d igate at element offsets `at` of dg, d fgate one gate stride further, in dg's dtype (and the same
    # into copy_ptr if COPY: the second share of a packed layout).
    dig = _cast(dig, dg_ptr.dtype.element_ty)
    dfg = _cast(dfg, dg_ptr.dtype.element_ty)
    tl.store(dg_ptr + at, dig, mask=ok)
    tl.store(dg_ptr + at + stride_gg, dfg, mask=ok)
    if COPY:
        tl.store(copy_ptr + at, dig, mask=ok)
        tl.store(copy_ptr + at + stride_gg, dfg, mask=ok)


@triton.jit
def _zero_gate_padding(dg_ptr, copy_ptr, start, offs_t, t_ok, stride_gh, stride_gs,
                       BT: tl.constexpr, PAD: tl.constexpr, PADP: tl.constexpr, COPY: tl.constexpr):
    # PAD zeros from element `start` on along the head stride, for tokens offs_t: the padding columns
    # after the gates of a packed layout (and of its copy if COPY).
    cols = tl.arange(0, PADP)
    pad = start + cols[None, :] * stride_gh + offs_t[:, None] * stride_gs
    zeros = tl.zeros([BT, PADP], dtype=dg_ptr.dtype.element_ty)
    pad_ok = t_ok[:, None] & (cols[None, :] < PAD)
    tl.store(dg_ptr + pad, zeros, mask=pad_ok)
    if COPY:
        tl.store(copy_ptr + pad, zeros, mask=pad_ok)


@triton.jit
def _load_rows(base, offs_t, offs_d, stride_s, stride_d, valid):
    # A (tokens, features) tile of a (S, DH) matrix; rows past the sequence end read as zeros.
    return tl.load(base + offs_t[:, None] * stride_s + offs_d[None, :] * stride_d, mask=valid[:, None], other=0.0)


@triton.jit
def _intra_decay(b_hi, b_lo, ig, m, causal):
    # exp(b_i - b_j + ig_j - m_i) for j <= i. b = b_hi + b_lo: the difference of the large b_hi
    # parts is (nearly) exact, so the exponent stays accurate when |b| is large but b_i - b_j small.
    # The exponent is <= 0 up to rounding for j <= i; above the diagonal it can be large, so it is
    # clamped before exp to keep inf out of later products.
    log_decay = (b_hi[:, None] - b_hi[None, :]) + (b_lo[:, None] - b_lo[None, :])
    log_decay += ig[None, :] - m[:, None]
    return tl.where(causal, tl.exp(tl.minimum(log_decay, 0.0)), 0.0)


@triton.jit
def _load_chunk_gates(gate_ptr, gate_row, BHS, ig_row, stride_is, offs_t, valid, c, S, L: tl.constexpr):
    """Per-token gate quantities of chunk ``c`` (tokens ``offs_t``, ``valid`` = offs_t < S).

    ``gate_ptr`` holds three (BH, S) float32 planes: b_hi, b_lo (the chunk-local log-forget cumsum
    b = b_hi + b_lo) and the stabilizer m. Returns b_hi, b_lo, m, the input gate (-inf on padding,
    so padded keys get zero weight), m_prev (m at the last token of the previous chunk, -inf for
    the first chunk) and b_hi, b_lo, m at the chunk's last token.

    Token offsets are computed by the caller: store addresses must not derive from this call's
    results, or torch.compile's kernel analysis counts the pointers passed here as written.
    """
    bh_row = gate_ptr + gate_row
    bl_row = bh_row + BHS
    m_row = bl_row + BHS
    b_hi = tl.load(bh_row + offs_t, mask=valid, other=0.0)
    b_lo = tl.load(bl_row + offs_t, mask=valid, other=0.0)
    m = tl.load(m_row + offs_t, mask=valid, other=0.0)
    ig = tl.load(ig_row + offs_t * stride_is, mask=valid, other=float("-inf")).to(tl.float32)
    m_prev = tl.load(m_row + c * L - 1, mask=c > 0, other=float("-inf"))
    last = tl.minimum(c * L + L, S) - 1
    bh_last = tl.load(bh_row + last)
    bl_last = tl.load(bl_row + last)
    m_last = tl.load(m_row + last)
    return b_hi, b_lo, m, ig, m_prev, bh_last, bl_last, m_last


@triton.jit
def _state_weights(b_hi, b_lo, m, ig, valid, m_prev, bh_last, bl_last, m_last):
    """a_i: weight of the chunk-start state in row i's output, w_j: weight of key j in the state at
    the chunk end, decay: factor from the chunk-start state to the chunk-end state. All <= 1."""
    a = tl.where(valid, tl.exp((b_hi + (m_prev - m)) + b_lo), 0.0)
    w = tl.where(valid, tl.exp(((bh_last - b_hi) + (bl_last - b_lo)) + (ig - m_last)), 0.0)
    decay = tl.exp((bh_last + (m_prev - m_last)) + bl_last)
    return a, w, decay


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.autotune(configs=_autotune_configs((2, 4, 8), (1, 2)), key=["S", "DH", "L"])
@triton.jit
def _fwd_states_kernel(
    k_ptr, v_ptr, ig_ptr, fg_ptr, gate_ptr, cst_ptr, nst_ptr,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ib, stride_ih, stride_is,
    stride_fb, stride_fh, stride_fs,
    NH, S, NC,
    DH: tl.constexpr, L: tl.constexpr, BD: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Walks the chunks in order and writes the (BD x BD tile of the) state at every chunk start.

    Also computes the gate planes (b_hi, b_lo, m) read by all other kernels; every program computes
    them (a few scans per chunk), the first program of each head writes them.
    """
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    ig_base = ig_ptr + i_b * stride_ib + i_h * stride_ih
    fg_base = fg_ptr + i_b * stride_fb + i_h * stride_fh
    BHS = tl.num_programs(2).to(tl.int64) * S
    bh_row = gate_ptr + pid_bh.to(tl.int64) * S
    cst_base = cst_ptr + pid_bh.to(tl.int64) * NC * DH * DH
    nst_base = nst_ptr + pid_bh.to(tl.int64) * NC * DH

    offs_l = tl.arange(0, L)
    offs_k = pid_k * BD + tl.arange(0, BD)
    offs_v = pid_v * BD + tl.arange(0, BD)

    cst = tl.zeros([BD, BD], dtype=tl.float32)
    nst = tl.zeros([BD], dtype=tl.float32)
    m_prev = tl.full([], float("-inf"), tl.float64)
    for c in range(NC):
        offs_t = c * L + offs_l
        valid = offs_t < S
        # Gate prefix math in float64: cheap (L values per chunk) and exact to float32 afterwards.
        fg = tl.load(fg_base + offs_t * stride_fs, mask=valid, other=0.0).to(tl.float64)
        ig = tl.load(ig_base + offs_t * stride_is, mask=valid, other=float("-inf")).to(tl.float64)
        log_f = tl.where(valid, _logsigmoid(fg), 0.0)
        b = tl.cumsum(log_f, 0)
        # m_i = b_i + max(m_prev, max_{j<=i} (ig_j - b_j)). Padding (log f = 0, ig = -inf) repeats
        # the last real token, so position L-1 holds the chunk's last b and m.
        m = b + tl.maximum(tl.associative_scan(ig - b, 0, _max_combine), m_prev)
        b_last = tl.sum(tl.where(offs_l == L - 1, b, 0.0))
        m_last = tl.sum(tl.where(offs_l == L - 1, m, 0.0))
        if (pid_k == 0) & (pid_v == 0):
            b_hi, b_lo = _split_hi_lo(b)
            tl.store(bh_row + offs_t, b_hi, mask=valid)
            tl.store(bh_row + BHS + offs_t, b_lo, mask=valid)
            tl.store(bh_row + 2 * BHS + offs_t, m.to(tl.float32), mask=valid)

        c_ptrs = cst_base + c * DH * DH + offs_k[:, None] * DH + offs_v[None, :]
        tl.store(c_ptrs, _cast(cst, cst_ptr.dtype.element_ty))
        if pid_v == 0:
            tl.store(nst_base + c * DH + offs_k, nst)

        # Carry the state to the end of chunk c, stabilized by m_last.
        decay = tl.exp(b_last + m_prev - m_last).to(tl.float32)
        w = tl.exp(b_last - b + ig - m_last).to(tl.float32)  # 0 on padding (ig = -inf)
        k_c = _load_rows(k_base, offs_t, offs_k, stride_ks, stride_kd, valid)
        v_c = _load_rows(v_base, offs_t, offs_v, stride_vs, stride_vd, valid)
        kw = k_c.to(tl.float32) * w[:, None]
        cst = _dot_split_lhs(tl.trans(kw), v_c, cst * decay, OP_DTYPE, DOT_DTYPE, PRECISION)
        nst = nst * decay + tl.sum(kw, 0)
        m_prev = m_last


@triton.autotune(configs=_autotune_configs((4, 8), (1, 2, 3)), key=["S", "DH", "L"])
@triton.jit
def _fwd_output_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, gate_ptr, cst_ptr, nst_ptr, h_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_hb, stride_hh, stride_hs, stride_hd,
    stride_ib, stride_ih, stride_is,
    NH, S, NC, scale: tl.constexpr, eps: tl.constexpr,
    DH: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output tile (chunk c, DH columns of tile pid_v)."""
    pid_v = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    h_base = h_ptr + i_b * stride_hb + i_h * stride_hh
    gate_row = pid_bh.to(tl.int64) * S
    cst_base = cst_ptr + (pid_bh.to(tl.int64) * NC + c) * DH * DH
    nst_base = nst_ptr + (pid_bh.to(tl.int64) * NC + c) * DH

    offs_l = tl.arange(0, L)
    offs_t = c * L + offs_l
    valid = offs_t < S
    b_hi, b_lo, m, ig, m_prev, _, _, _ = _load_chunk_gates(
        gate_ptr, gate_row, tl.num_programs(2).to(tl.int64) * S,
        ig_ptr + i_b * stride_ib + i_h * stride_ih, stride_is, offs_t, valid, c, S, L,
    )
    offs_v = pid_v * BV + tl.arange(0, BV)

    scores = tl.zeros([L, L], dtype=tl.float32)
    q_cst = tl.zeros([L, BV], dtype=tl.float32)
    q_nst = tl.zeros([L], dtype=tl.float32)
    for u in range(0, DH, BK):
        offs_u = u + tl.arange(0, BK)
        q_u = _load_rows(q_base, offs_t, offs_u, stride_qs, stride_qd, valid)
        k_u = _load_rows(k_base, offs_t, offs_u, stride_ks, stride_kd, valid)
        cst_u = tl.load(cst_base + offs_u[:, None] * DH + offs_v[None, :])
        nst_u = tl.load(nst_base + offs_u)
        scores = _dot(q_u, tl.trans(k_u), scores, OP_DTYPE, DOT_DTYPE, PRECISION)
        q_cst = _dot_split(q_u, cst_u, q_cst, OP_DTYPE, DOT_DTYPE, PRECISION)
        q_nst += tl.sum(q_u.to(tl.float32) * nst_u[None, :], 1)

    a = tl.where(valid, tl.exp((b_hi + (m_prev - m)) + b_lo), 0.0)
    causal = (offs_l[:, None] >= offs_l[None, :]) & valid[:, None]
    p = scores * scale * _intra_decay(b_hi, b_lo, ig, m, causal)

    den = scale * a * q_nst + tl.sum(p, 1)
    v_c = _load_rows(v_base, offs_t, offs_v, stride_vs, stride_vd, valid)
    num = _dot_split_lhs(p, v_c, q_cst * (scale * a)[:, None], OP_DTYPE, DOT_DTYPE, PRECISION)
    norm = tl.maximum(tl.abs(den), tl.exp(-m)) + eps
    h = num / norm[:, None]
    tl.store(
        h_base + offs_t[:, None] * stride_hs + offs_v[None, :] * stride_hd,
        _cast(h, h_ptr.dtype.element_ty), mask=valid[:, None],
    )


# ----------------------------------------------------------------------------------------------------
# Backward
#
# With dnum_i = dh_i / n_i, n_i = max(|den_i|, exp(-m_i)) + eps and dden_i the gradient reaching
# den_i through n_i, the gradient of C_ij is dC_ij = dnum_i . v_j + dden_i and that of log D_ij is
# G_ij = dC_ij C_ij. The input gate gets column sums, d igate_j = sum_i G_ij, and log f_l gets the
# sum over the pairs that span it, d logf_l = sum_{i >= l > j} G_ij. The latter is summed pair by
# pair rather than as a suffix sum of (row sum - column sum): that difference cancels almost
# completely for strongly forgetting tokens, where the true gradient is tiny.
#
# For l in chunk c (tokens s..e), the spanning pairs split into
#   i, j both in c                      -> from G inside the chunk,
#   i in c (i >= l), j < s              -> suffix sum over the chunk of q_i . dq_i(inter),
#   i > e, j in c (j < l)               -> prefix sum over the chunk of k_j . dk_j(inter),
#   i > e, j < s                        -> <dCst_end, decay * Cst_start>, the same for the whole chunk,
# where dq(inter) and dk(inter) are the parts of dq, dk that flow through the chunk-start and
# chunk-end states.
# ----------------------------------------------------------------------------------------------------


@triton.autotune(configs=_autotune_configs((4, 8), (1, 2)), key=["S", "DH", "L"])
@triton.jit
def _bwd_norm_kernel(
    q_ptr, k_ptr, v_ptr, dh_ptr, ig_ptr, gate_ptr, cst_ptr, nst_ptr,
    inv_norm_ptr, dden_ptr, row_inter_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_ib, stride_ih, stride_is,
    NH, S, NC, scale: tl.constexpr, eps: tl.constexpr,
    DH: tl.constexpr, L: tl.constexpr, BD: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per token of chunk c: 1/n, dden = -(dh . num) / n^2 * d|den|/dden (0 where the max picks
    exp(-m)) and row_inter_i = sum_{j before the chunk} G_ij = q_i . dq_i(inter), which needs the
    same products.

    den and dh . num are recomputed from the same float32 quantities the other backward kernels
    use, rather than taken from the rounded forward output: rows with |den| much smaller than the
    sum of |C_ij| amplify any mismatch between the two. The chunk-start states are float32 here.
    """
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    dh_base = dh_ptr + i_b * stride_db + i_h * stride_dh
    gate_row = pid_bh.to(tl.int64) * S
    cst_base = cst_ptr + (pid_bh.to(tl.int64) * NC + c) * DH * DH
    nst_base = nst_ptr + (pid_bh.to(tl.int64) * NC + c) * DH

    offs_l = tl.arange(0, L)
    offs_t = c * L + offs_l
    valid = offs_t < S
    b_hi, b_lo, m, ig, m_prev, _, _, _ = _load_chunk_gates(
        gate_ptr, gate_row, tl.num_programs(1).to(tl.int64) * S,
        ig_ptr + i_b * stride_ib + i_h * stride_ih, stride_is, offs_t, valid, c, S, L,
    )

    scores = tl.zeros([L, L], dtype=tl.float32)  # q_i . k_j
    dh_v = tl.zeros([L, L], dtype=tl.float32)  # dh_i . v_j
    q_nst = tl.zeros([L], dtype=tl.float32)
    for u in range(0, DH, BD):
        offs_u = u + tl.arange(0, BD)
        q_u = _load_rows(q_base, offs_t, offs_u, stride_qs, stride_qd, valid)
        k_u = _load_rows(k_base, offs_t, offs_u, stride_ks, stride_kd, valid)
        v_u = _load_rows(v_base, offs_t, offs_u, stride_vs, stride_vd, valid)
        dh_u = _load_rows(dh_base, offs_t, offs_u, stride_ds, stride_dd, valid)
        scores = _dot(q_u, tl.trans(k_u), scores, OP_DTYPE, DOT_DTYPE, PRECISION)
        dh_v = _dot(dh_u, tl.trans(v_u), dh_v, OP_DTYPE, DOT_DTYPE, PRECISION)
        q_nst += tl.sum(q_u.to(tl.float32) * tl.load(nst_base + offs_u)[None, :], 1)

    # dh_i . (q_i^T Cst), one DH column tile of the state at a time.
    dh_q_cst = tl.zeros([L], dtype=tl.float32)
    for w in range(0, DH, BD):
        offs_w = w + tl.arange(0, BD)
        q_cst = tl.zeros([L, BD], dtype=tl.float32)
        for u in range(0, DH, BD):
            offs_u = u + tl.arange(0, BD)
            q_u = _load_rows(q_base, offs_t, offs_u, stride_qs, stride_qd, valid)
            cst_uw = tl.load(cst_base + offs_u[:, None] * DH + offs_w[None, :])
            # Split product: dden ~ 1/n^2 amplifies the error of dh . num in rows with small |den|.
            q_cst = _dot_split(q_u, cst_uw, q_cst, OP_DTYPE, DOT_DTYPE, PRECISION)
        dh_w = _load_rows(dh_base, offs_t, offs_w, stride_ds, stride_dd, valid)
        dh_q_cst += tl.sum(q_cst * dh_w.to(tl.float32), 1)

    a = tl.where(valid, tl.exp((b_hi + (m_prev - m)) + b_lo), 0.0)
    causal = (offs_l[:, None] >= offs_l[None, :]) & valid[:, None]
    cmat = scores * scale * _intra_decay(b_hi, b_lo, ig, m, causal)
    den = tl.sum(cmat, 1) + scale * a * q_nst
    dh_num = tl.sum(cmat * dh_v, 1) + scale * a * dh_q_cst

    floor = tl.exp(-m)
    inv_norm = 1.0 / (tl.maximum(tl.abs(den), floor) + eps)
    dnorm = -dh_num * inv_norm * inv_norm
    dden = tl.where(tl.abs(den) > floor, tl.where(den > 0, dnorm, -dnorm), 0.0)
    row_inter = scale * a * (dh_q_cst * inv_norm + dden * q_nst)
    tl.store(inv_norm_ptr + gate_row + offs_t, inv_norm, mask=valid)
    tl.store(dden_ptr + gate_row + offs_t, dden, mask=valid)
    tl.store(row_inter_ptr + gate_row + offs_t, row_inter, mask=valid)


@triton.autotune(configs=_autotune_configs((2, 4, 8), (1, 2)), key=["S", "DH", "L"])
@triton.jit
def _bwd_states_kernel(
    q_ptr, dh_ptr, ig_ptr, gate_ptr, inv_norm_ptr, dden_ptr, dcst_ptr, dnst_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_ib, stride_ih, stride_is,
    NH, S, NC, scale: tl.constexpr,
    DH: tl.constexpr, L: tl.constexpr, BD: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Reverse walk: writes at slot c the gradient w.r.t. the state at the END of chunk c."""
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    dh_base = dh_ptr + i_b * stride_db + i_h * stride_dh
    ig_base = ig_ptr + i_b * stride_ib + i_h * stride_ih
    gate_row = pid_bh.to(tl.int64) * S
    BHS = tl.num_programs(2).to(tl.int64) * S
    dcst_base = dcst_ptr + pid_bh.to(tl.int64) * NC * DH * DH
    dnst_base = dnst_ptr + pid_bh.to(tl.int64) * NC * DH

    offs_k = pid_k * BD + tl.arange(0, BD)
    offs_v = pid_v * BD + tl.arange(0, BD)

    dcst = tl.zeros([BD, BD], dtype=tl.float32)
    dnst = tl.zeros([BD], dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        c_ptrs = dcst_base + c * DH * DH + offs_k[:, None] * DH + offs_v[None, :]
        tl.store(c_ptrs, _cast(dcst, dcst_ptr.dtype.element_ty))
        if pid_v == 0:
            tl.store(dnst_base + c * DH + offs_k, dnst)

        offs_t = c * L + tl.arange(0, L)
        valid = offs_t < S
        b_hi, b_lo, m, ig, m_prev, bh_last, bl_last, m_last = _load_chunk_gates(
            gate_ptr, gate_row, BHS, ig_base, stride_is, offs_t, valid, c, S, L
        )
        a, _, decay = _state_weights(b_hi, b_lo, m, ig, valid, m_prev, bh_last, bl_last, m_last)
        inv_norm = tl.load(inv_norm_ptr + gate_row + offs_t, mask=valid, other=0.0)
        dden = tl.load(dden_ptr + gate_row + offs_t, mask=valid, other=0.0)
        q_c = _load_rows(q_base, offs_t, offs_k, stride_qs, stride_qd, valid).to(tl.float32)
        dh_c = _load_rows(dh_base, offs_t, offs_v, stride_ds, stride_dd, valid)
        # Row factors go on q so that dh enters the product unrounded; the scaled q is split into
        # two half-precision parts because the gate gradients need dCst to ~16 bits.
        qa = q_c * (scale * a * inv_norm)[:, None]
        dcst = _dot(tl.trans(qa), dh_c, dcst * decay, OP_DTYPE, DOT_DTYPE, PRECISION)
        if OP_DTYPE != tl.float32:
            qa_lo = qa - _cast(qa, OP_DTYPE).to(tl.float32)
            dcst = _dot(tl.trans(qa_lo), dh_c, dcst, OP_DTYPE, DOT_DTYPE, PRECISION)
        dnst = dnst * decay + tl.sum(q_c * (scale * a * dden)[:, None], 0)


@triton.autotune(configs=_autotune_configs((4, 8), (1, 2)), key=["S", "DH", "L"])
@triton.jit
def _bwd_grads_kernel(
    q_ptr, k_ptr, v_ptr, dh_ptr, ig_ptr,
    gate_ptr, inv_norm_ptr, dden_ptr, row_inter_ptr,
    cst_ptr, nst_ptr, dcst_ptr, dnst_ptr,
    dqk_ptr, dv_ptr, dig_part_ptr, dlogf_part_ptr, dq_off, dk_off, dv_off,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_ib, stride_ih, stride_is,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    NH, S, NC, scale: tl.constexpr,
    DH: tl.constexpr, L: tl.constexpr, BD: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq, dk, dv of DH tile ``pid_t`` for the tokens of chunk ``c``, plus this tile's share of the
    per-token gate gradient sums (tile 0 adds the intra-chunk parts).

    The tile index serves as the k-tile of dq, dk and the v-tile of dv (q, k, v share DH). dq and dk
    go into one tensor at element offsets dq_off and dk_off, dv at dv_off (see chunk_backward).
    """
    pid_t = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    dh_base = dh_ptr + i_b * stride_db + i_h * stride_dh
    gate_row = pid_bh.to(tl.int64) * S
    BHS = tl.num_programs(2).to(tl.int64) * S
    state_off = (pid_bh.to(tl.int64) * NC + c) * DH * DH
    vec_off = (pid_bh.to(tl.int64) * NC + c) * DH

    offs_l = tl.arange(0, L)
    offs_t = c * L + offs_l
    valid = offs_t < S
    b_hi, b_lo, m, ig, m_prev, bh_last, bl_last, m_last = _load_chunk_gates(
        gate_ptr, gate_row, BHS, ig_ptr + i_b * stride_ib + i_h * stride_ih, stride_is,
        offs_t, valid, c, S, L,
    )
    inv_norm = tl.load(inv_norm_ptr + gate_row + offs_t, mask=valid, other=0.0)
    dden = tl.load(dden_ptr + gate_row + offs_t, mask=valid, other=0.0)
    offs_d = pid_t * BD + tl.arange(0, BD)

    scores = tl.zeros([L, L], dtype=tl.float32)  # q_i . k_j
    dh_v = tl.zeros([L, L], dtype=tl.float32)  # dh_i . v_j
    dh_cst = tl.zeros([L, BD], dtype=tl.float32)  # (Cst dh_i)[tile], Cst = state at chunk start
    v_dcst = tl.zeros([L, BD], dtype=tl.float32)  # (dCst v_j)[tile], dCst = grad of chunk-end state
    k_dcst = tl.zeros([L, BD], dtype=tl.float32)  # (dCst^T k_j)[tile]
    k_dnst = tl.zeros([L], dtype=tl.float32)  # k_j . dnst
    state_dot = tl.zeros([], dtype=tl.float32)  # <Cst, dCst> over the rows of this tile
    for u in range(0, DH, BD):
        offs_u = u + tl.arange(0, BD)
        q_u = _load_rows(q_base, offs_t, offs_u, stride_qs, stride_qd, valid)
        k_u = _load_rows(k_base, offs_t, offs_u, stride_ks, stride_kd, valid)
        v_u = _load_rows(v_base, offs_t, offs_u, stride_vs, stride_vd, valid)
        dh_u = _load_rows(dh_base, offs_t, offs_u, stride_ds, stride_dd, valid)
        cst_du = tl.load(cst_ptr + state_off + offs_d[:, None] * DH + offs_u[None, :])
        dcst_du = tl.load(dcst_ptr + state_off + offs_d[:, None] * DH + offs_u[None, :])
        dcst_ud = tl.load(dcst_ptr + state_off + offs_u[:, None] * DH + offs_d[None, :])
        dnst_u = tl.load(dnst_ptr + vec_off + offs_u)
        scores = _dot(q_u, tl.trans(k_u), scores, OP_DTYPE, DOT_DTYPE, PRECISION)
        dh_v = _dot(dh_u, tl.trans(v_u), dh_v, OP_DTYPE, DOT_DTYPE, PRECISION)
        dh_cst = _dot(dh_u, tl.trans(cst_du), dh_cst, OP_DTYPE, DOT_DTYPE, PRECISION)
        # Split product: it feeds the forget-gate gradient, which can be a small difference.
        v_dcst = _dot_split(v_u, tl.trans(dcst_du), v_dcst, OP_DTYPE, DOT_DTYPE, PRECISION)
        k_dcst = _dot_split(k_u, dcst_ud, k_dcst, OP_DTYPE, DOT_DTYPE, PRECISION)
        k_dnst += tl.sum(k_u.to(tl.float32) * dnst_u[None, :], 1)
        state_dot += tl.sum(tl.sum(cst_du.to(tl.float32) * dcst_du.to(tl.float32), 1), 0)

    a, w, decay_state = _state_weights(b_hi, b_lo, m, ig, valid, m_prev, bh_last, bl_last, m_last)
    causal = (offs_l[:, None] >= offs_l[None, :]) & valid[:, None]
    decay = _intra_decay(b_hi, b_lo, ig, m, causal)
    cmat = scores * scale * decay
    dcmat = dh_v * inv_norm[:, None] + dden[:, None]
    dscores = dcmat * decay * scale

    q_t = _load_rows(q_base, offs_t, offs_d, stride_qs, stride_qd, valid)
    k_t = _load_rows(k_base, offs_t, offs_d, stride_ks, stride_kd, valid)
    dh_t = _load_rows(dh_base, offs_t, offs_d, stride_ds, stride_dd, valid)
    nst_t = tl.load(nst_ptr + vec_off + offs_d)
    dnst_t = tl.load(dnst_ptr + vec_off + offs_d)

    # Contributions through the chunk-start state (dq) and the chunk-end state (dk, dv).
    dq_inter = (scale * a)[:, None] * (dh_cst * inv_norm[:, None] + dden[:, None] * nst_t[None, :])
    dk_inter = w[:, None] * (v_dcst + dnst_t[None, :])
    dq = _dot(dscores, k_t, dq_inter, OP_DTYPE, DOT_DTYPE, PRECISION)
    dk = _dot(tl.trans(dscores), q_t, dk_inter, OP_DTYPE, DOT_DTYPE, PRECISION)
    dv = _dot_split_lhs(tl.trans(cmat * inv_norm[:, None]), dh_t, w[:, None] * k_dcst, OP_DTYPE, DOT_DTYPE, PRECISION)

    # Gate gradients (see the note above the backward kernels): this tile's share of the column
    # sums through the chunk-end state and of the pass-through term; tile 0 adds the terms that
    # need no DH reduction here (the row sums through the chunk-start state come from
    # _bwd_norm_kernel).
    col_inter = tl.sum(k_t.to(tl.float32) * dk_inter, 1)  # sum_{i > e} G_ij
    before = offs_l[None, :] < offs_l[:, None]  # [l, x]: x < l
    passing = decay_state * (state_dot + tl.sum(nst_t * dnst_t, 0))
    dig_part = col_inter
    dlogf_part = tl.sum(tl.where(before, col_inter[None, :], 0.0), 1) + passing
    if pid_t == 0:
        row_inter = tl.load(row_inter_ptr + gate_row + offs_t, mask=valid, other=0.0)
        g = dcmat * cmat  # G_ij inside the chunk
        # [l, j] = sum_{i >= l} G_ij; its sum over j < l is the intra-chunk spanning sum for l.
        g_below = tl.cumsum(g, 0, reverse=True)
        dig_part += tl.sum(g, 0)
        dlogf_part += tl.sum(tl.where(before, g_below, 0.0), 1)
        dlogf_part += tl.sum(tl.where(before, 0.0, row_inter[None, :]), 1)

    dq_base = dqk_ptr + dq_off + i_b * stride_dqb + i_h * stride_dqh
    dk_base = dqk_ptr + dk_off + i_b * stride_dkb + i_h * stride_dkh
    dv_base = dv_ptr + dv_off + i_b * stride_dvb + i_h * stride_dvh
    tl.store(
        dq_base + offs_t[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
        _cast(dq, dqk_ptr.dtype.element_ty), mask=valid[:, None],
    )
    tl.store(
        dk_base + offs_t[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
        _cast(dk, dqk_ptr.dtype.element_ty), mask=valid[:, None],
    )
    tl.store(
        dv_base + offs_t[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
        _cast(dv, dv_ptr.dtype.element_ty), mask=valid[:, None],
    )
    part_off = pid_t.to(tl.int64) * BHS + gate_row
    tl.store(dig_part_ptr + part_off + offs_t, dig_part, mask=valid)
    tl.store(dlogf_part_ptr + part_off + offs_t, dlogf_part, mask=valid)


@triton.jit
def _bwd_gates_kernel(
    fg_ptr, dig_part_ptr, dlogf_part_ptr, dg_ptr, copy_ptr, dg_off,
    stride_fb, stride_fh, stride_fs,
    stride_gg, stride_gb, stride_gh, stride_gs,
    NH, S, NT,
    BT: tl.constexpr, COPY: tl.constexpr, PAD: tl.constexpr, PADP: tl.constexpr,
):
    """Sums the per-tile parts; d fgate = d logf * sigmoid(-fgate).

    Both gates go into one tensor from element dg_off on, at gate * stride_gg + b * stride_gb + ... (and
    the same places of copy_ptr if COPY); with PAD > 0 the programs of head 0 also write PAD zeros after
    the forget gates along the head stride (the padding columns of a packed layout)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    gate_row = pid_bh.to(tl.int64) * S
    BHS = tl.num_programs(1).to(tl.int64) * S

    offs_t = pid_t * BT + tl.arange(0, BT)
    valid = offs_t < S
    dig = tl.zeros([BT], dtype=tl.float32)
    dlogf = tl.zeros([BT], dtype=tl.float32)
    for t in range(NT):
        dig += tl.load(dig_part_ptr + t * BHS + gate_row + offs_t, mask=valid, other=0.0)
        dlogf += tl.load(dlogf_part_ptr + t * BHS + gate_row + offs_t, mask=valid, other=0.0)
    fg = tl.load(
        fg_ptr + i_b * stride_fb + i_h * stride_fh + offs_t * stride_fs, mask=valid, other=0.0
    ).to(tl.float32)
    dfg = dlogf / (1.0 + tl.exp(fg))
    at = dg_off + i_b * stride_gb + i_h * stride_gh + offs_t * stride_gs
    _store_gate_grads(dg_ptr, copy_ptr, at, dig, dfg, valid, stride_gg, COPY)
    if PAD > 0:
        if i_h == 0:
            _zero_gate_padding(dg_ptr, copy_ptr, dg_off + i_b * stride_gb + 2 * stride_gg, offs_t, valid,
                               stride_gh, stride_gs, BT, PAD, PADP, COPY)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------


def _chunk_len(chunk_size: int, S: int) -> int:
    # tl.dot needs >= 16 rows; short sequences use the smallest chunk that covers them.
    return min(chunk_size, max(16, triton.next_power_of_2(S)))


def _pow2_block(DH: int, cap: int) -> int:
    # Largest power of two dividing DH (so DH tiles without padding), at most `cap`.
    return min(cap, DH & -DH)


def _dot_config(dtype: torch.dtype) -> dict:
    op = _TL_DTYPES[dtype]
    return dict(
        OP_DTYPE=op,
        DOT_DTYPE=tl.float32 if _INTERPRET else op,
        # fp32 inputs need true fp32 products; tf32 would lose ~3 digits.
        PRECISION="ieee" if dtype == torch.float32 else None,
    )


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _empty_heads_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # A (B, NH, S, DH) tensor laid out like x: token-major memory (B, S, NH, DH) when x is a
    # transposed view of per-token features, so that the caller's reshape back is free.
    dtype = dtype or x.dtype
    if x.stride(1) < x.stride(2):
        B, NH, S, DH = x.shape
        return torch.empty(B, S, NH, DH, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(x.shape, device=x.device, dtype=dtype)


def _launch_states(k, v, igate, fgate, L, state_dtype):
    """Gate planes (3, BH, S) = (b_hi, b_lo, m) in float32, chunk-start states (BH, NC, DH, DH) in
    state_dtype and normalizer states (BH, NC, DH) in float32."""
    B, NH, S, DH = k.shape
    NC = triton.cdiv(S, L)
    BD = _pow2_block(DH, 64)
    gates = torch.empty(3, B * NH, S, device=k.device, dtype=torch.float32)
    cst = torch.empty(B * NH, NC, DH, DH, device=k.device, dtype=state_dtype)
    nst = torch.empty(B * NH, NC, DH, device=k.device, dtype=torch.float32)
    wrap_triton(_fwd_states_kernel)[(DH // BD, DH // BD, B * NH)](
        k, v, igate, fgate, gates, cst, nst,
        *_strides4(k), *_strides4(v), *_strides3(igate), *_strides3(fgate),
        NH, S, NC,
        DH=DH, L=L, BD=BD, **_dot_config(k.dtype),
    )
    return gates, cst, nst


def _check_inputs(q, k, v, igate, fgate) -> None:
    """The kernels' shared input contract, with errors that name the offending input."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, NH, S, DH) shape, got {q.shape}, {k.shape}, {v.shape}")
    if igate.shape != q.shape[:3] or fgate.shape != q.shape[:3]:
        raise ValueError(f"igate and fgate must have shape {tuple(q.shape[:3])}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _TL_DTYPES:
        raise TypeError(f"q, k, v must share one of {list(_TL_DTYPES)}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (igate.is_floating_point() and fgate.is_floating_point()):
        raise TypeError("igate and fgate must be floating point")
    if q.shape[3] % 16 != 0:
        raise ValueError(f"head dim must be a multiple of 16, got {q.shape[3]}")


def chunk_forward(q, k, v, igate, fgate, chunk_size: int, eps: float):
    """The forward kernels: h (B, NH, S, DH) in v's dtype, and the gate planes, chunk-start states and
    normalizer states (see _launch_states) that chunk_backward can take instead of recomputing them."""
    B, NH, S, DH = q.shape
    L = _chunk_len(chunk_size, S)
    NC = triton.cdiv(S, L)
    h = _empty_heads_like(v)
    gates, cst, nst = _launch_states(k, v, igate, fgate, L, state_dtype=torch.float32)

    BK, BV = _pow2_block(DH, 64), _pow2_block(DH, 128)
    # scale and eps are compile-time constants: as runtime floats, torch.compile's launcher would type them
    # float64 and promote the gate arithmetic with them.
    wrap_triton(_fwd_output_kernel)[(DH // BV, NC, B * NH)](
        q, k, v, igate, gates, cst, nst, h,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(h), *_strides3(igate),
        NH, S, NC, 1.0 / math.sqrt(DH), eps,
        DH=DH, L=L, BK=BK, BV=BV, **_dot_config(q.dtype),
    )
    return h, gates, cst, nst


def _offset(base: torch.Tensor, view: torch.Tensor) -> int:
    # Where a view of base starts, in elements from base's start.
    return view.storage_offset() - base.storage_offset()


class GradDest(NamedTuple):
    """Where a cell's backward pass writes its gradients: dq and dk into views of one tensor ``qk``, dv
    into a view of ``v``, and d igate and d fgate into ``g`` at gate * gate_stride + (B, NH, S) strides from
    ``g_off`` on (and into ``g_copy`` likewise, with ``g_pad`` zeros after them along the head stride;
    see _bwd_gates_kernel). Each kernel gets each tensor once: torch.compile copies
    tensors that a launch writes through views, and mishandles one tensor passed twice."""

    qk: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    v: torch.Tensor
    dv: torch.Tensor
    g: torch.Tensor
    g_off: int
    gate_stride: int
    g_strides: tuple[int, int, int]
    g_copy: Optional[torch.Tensor] = None
    g_pad: int = 0


def _dq_dk(dqk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # dq and dk, (B, NH, S, DH) views of the (B, S, 2, NH, DH) tensor that holds both.
    return dqk[:, :, 0].transpose(1, 2), dqk[:, :, 1].transpose(1, 2)


def _grad_dest(q: torch.Tensor, v: torch.Tensor, gate_dtype: torch.dtype) -> GradDest:
    """Fresh gradient tensors: dq and dk token-major in one tensor (see _dq_dk), dv laid out like v, both
    gates in one (2, B, NH, S) tensor (a custom op's outputs may not alias: each is returned whole)."""
    B, NH, S, DH = q.shape
    dqk = torch.empty(B, S, 2, NH, DH, device=q.device, dtype=q.dtype)
    dv = _empty_heads_like(v)
    dg = torch.empty(2, B, NH, S, device=q.device, dtype=gate_dtype)
    return GradDest(dqk, *_dq_dk(dqk), dv, dv, dg, 0, dg.stride(0), dg.stride()[1:])


def chunk_backward(dh, q, k, v, igate, fgate, chunk_size: int, eps: float, dest: GradDest, states=None) -> None:
    """The backward kernels: dq, dk, dv and d igate, d fgate, written into ``dest``.

    states: the (gates, cst, nst) of chunk_forward, recomputed when None.
    """
    B, NH, S, DH = q.shape
    BH = B * NH
    L = _chunk_len(chunk_size, S)
    NC = triton.cdiv(S, L)
    BD = _pow2_block(DH, 64)
    NT = DH // BD
    scale = 1.0 / math.sqrt(DH)
    dots = _dot_config(q.dtype)

    gates, cst, nst = states or _launch_states(k, v, igate, fgate, L, state_dtype=torch.float32)
    inv_norm = torch.empty(BH, S, device=q.device, dtype=torch.float32)
    dden = torch.empty_like(inv_norm)
    row_inter = torch.empty_like(inv_norm)
    wrap_triton(_bwd_norm_kernel)[(NC, BH)](
        q, k, v, dh, igate, gates, cst, nst, inv_norm, dden, row_inter,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dh), *_strides3(igate),
        NH, S, NC, scale, eps,
        DH=DH, L=L, BD=BD, **dots,
    )

    dcst = torch.empty_like(cst)
    dnst = torch.empty_like(nst)
    wrap_triton(_bwd_states_kernel)[(NT, NT, BH)](
        q, dh, igate, gates, inv_norm, dden, dcst, dnst,
        *_strides4(q), *_strides4(dh), *_strides3(igate),
        NH, S, NC, scale,
        DH=DH, L=L, BD=BD, **dots,
    )

    dig_part = torch.empty(NT, BH, S, device=q.device, dtype=torch.float32)
    dlogf_part = torch.empty_like(dig_part)
    wrap_triton(_bwd_grads_kernel)[(NT, NC, BH)](
        q, k, v, dh, igate, gates, inv_norm, dden, row_inter, cst, nst, dcst, dnst,
        dest.qk, dest.v, dig_part, dlogf_part,
        _offset(dest.qk, dest.dq), _offset(dest.qk, dest.dk), _offset(dest.v, dest.dv),
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dh), *_strides3(igate),
        *_strides4(dest.dq), *_strides4(dest.dk), *_strides4(dest.dv),
        NH, S, NC, scale,
        DH=DH, L=L, BD=BD, **dots,
    )

    BT = 256
    wrap_triton(_bwd_gates_kernel)[(triton.cdiv(S, BT), BH)](
        fgate, dig_part, dlogf_part, dest.g, dest.g_copy, dest.g_off,
        *_strides3(fgate), dest.gate_stride, *dest.g_strides,
        NH, S, NT,
        BT=BT, COPY=dest.g_copy is not None, PAD=dest.g_pad, PADP=triton.next_power_of_2(max(dest.g_pad, 1)),
    )


@triton_op("vil::mlstm_chunkwise_fwd", mutates_args={})
def _mlstm_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor,
    chunk_size: int, eps: float,
) -> torch.Tensor:
    return chunk_forward(q, k, v, igate, fgate, chunk_size, eps)[0]


@triton_op("vil::mlstm_chunkwise_bwd", mutates_args={})
def _mlstm_bwd(
    dh: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    igate: torch.Tensor, fgate: torch.Tensor, chunk_size: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The states are recomputed (a fraction of the work) so that only the inputs are kept for the
    # backward pass; the fused layer op (mlstm_gated_triton) keeps them instead.
    dest = _grad_dest(q, v, torch.promote_types(igate.dtype, fgate.dtype))
    chunk_backward(dh, q, k, v, igate, fgate, chunk_size, eps, dest)
    return dest.qk, dest.v, dest.g


def _setup_context(ctx, inputs, output):
    q, k, v, igate, fgate, chunk_size, eps = inputs
    ctx.save_for_backward(q, k, v, igate, fgate)
    ctx.chunk_size = chunk_size
    ctx.eps = eps


def _backward(ctx, dh):
    q, k, v, igate, fgate = ctx.saved_tensors
    dqk, dv, dg = _mlstm_bwd(dh, q, k, v, igate, fgate, ctx.chunk_size, ctx.eps)
    return *_dq_dk(dqk), dv, dg[0].to(igate.dtype), dg[1].to(fgate.dtype), None, None


_mlstm_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlstm_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate: torch.Tensor,
    fgate: torch.Tensor,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """mLSTM cell, chunkwise-parallel in Triton; differentiable w.r.t. all five inputs.

    q, k, v: (B, NH, S, DH), one of fp32/bf16/fp16, any strides (e.g. a transposed view);
    DH must be a multiple of 16. igate, fgate: (B, NH, S) gate pre-activations, any float dtype.
    chunk_size: a power of two >= 16; S need not be a multiple of it.
    Returns h: (B, NH, S, DH) in v's dtype.
    """
    _check_inputs(q, k, v, igate, fgate)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if q.shape[2] == 0:
        return _empty_heads_like(v)
    return _mlstm_fwd(q, k, v, igate, fgate, chunk_size, eps)
