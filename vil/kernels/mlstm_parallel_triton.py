"""The mLSTM cell's parallel (quadratic) form as tiled Triton kernels, forward and backward.

Computes, per batch and head (``k`` scaled by 1/sqrt(DH), gate math in float32 and float64):

    F_i      = sum_{l<=i} logsigmoid(fgate_l)
    log D_ij = F_i - F_j + igate_j                       (j <= i)
    m_i      = max_{j<=i} log D_ij = F_i + M_i,  M_i = max_{j<=i} (igate_j - F_j)
    C_ij     = (q_i . k_j / sqrt(DH)) * exp(log D_ij - m_i)
    h_i      = sum_j C_ij v_j / (max(|sum_j C_ij|, exp(-m_i)) + eps)

The stabilizer m_i is a running maximum known before any product is formed, so the quadratic form is
evaluated like causal flash attention, one (query tile, key tile) pair at a time, in a single pass with
no rescaling: exp(log D_ij - m_i) = exp(b_j - M_i) with b_j = igate_j - F_j, and every weight is <= 1.
Nothing of size S x S is stored; memory is linear in the sequence length.

b and M grow like |F| (1e4-1e5 for long sequences with strong forgetting), so they are computed in
float64 and stored as float32 (hi, lo) pairs whose hi parts are differenced first: the exponent is then
accurate wherever it is near zero.

Kernels (BH = batch * heads, T = token tiles of BLOCK, NV / ND = feature tiles):

    _fwd_kernel  (T, NV, BH)  one output tile per (query tile, value-feature tile); also writes the
                              normalizer n_i and the row sum den_i.
    _bwd_kernel  (T, ND, BH)  program t: dk, dv of key tile t (over query tiles >= t), then dq of query
                              tile t (over key tiles <= t), so every program does the same number of
                              tile pairs. Also the gate-gradient row and column sums.

Narrow heads (DH <= 128) contract the head dim in one tl.dot, padded to a power of two (96 -> 128), and
hold the tiles they reuse in registers. Wider heads would spill them: they contract the head dim in
chunks of a power of two that divides it (192 = 3 x 64, 384 = 3 x 128), loading the chunks at each step.

Two small kernels do the gate pre- and post-processing (cumulative sums and maxima over S).
The stabilizer is held constant in the backward pass: it cancels from h except through eps.

Precision: half-precision inputs use half-precision tensor-core operands with float32 accumulation.
Products of two inputs (q k^T, dh v^T) are exact in one. The forward pass's product with the float32
decay-weighted scores splits them into two half-precision parts (about 16 mantissa bits): rows with
|den| much smaller than sum_j |C_ij| amplify errors in h, and the gate gradients inherit them through
dh . h. So h is returned and kept in float32, and the backward pass forms dh . h from it. The backward
pass's products round their decay-weighted operands to the input dtype, as flash attention rounds its
probabilities: they feed only dq, dk and dv, which keep errors of that rounding's size (splitting
there cost 10% of the backward kernel's time at the ViL-T shapes). Float32 inputs use exact float32
products (no tf32).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vil.kernels.mlstm_triton import (
    GradDest, _autotune_configs, _cast, _check_inputs, _dot, _dot_config, _dot_split_lhs, _empty_heads_like,
    _dq_dk, _grad_dest, _logsigmoid, _max_combine, _offset, _split_hi_lo, _store_gate_grads, _strides4,
    _zero_gate_padding,
)

__all__ = ["mlstm_parallel_triton"]


@triton.jit
def _tile(base, offs_t, offs_d, stride_s, stride_d, t_ok, d_ok):
    # A (tokens, features) tile of a (S, DH) matrix; out-of-range entries read as zeros.
    return tl.load(base + offs_t[:, None] * stride_s + offs_d[None, :] * stride_d,
                   mask=t_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _tile_t(base, offs_t, offs_d, stride_s, stride_d, t_ok, d_ok):
    # The same tile transposed, (features, tokens), loaded as such: an operand of tl.dot, not a
    # register transpose.
    return tl.load(base + offs_t[None, :] * stride_s + offs_d[:, None] * stride_d,
                   mask=d_ok[:, None] & t_ok[None, :], other=0.0)


@triton.jit
def _gram(a_base, b_base, offs_a, offs_b, a_ok, b_ok, stride_as, stride_ad, stride_bs, stride_bd, acc,
          DH: tl.constexpr, KC: tl.constexpr,
          OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    # acc + A B^T for the row tiles offs_a of A and offs_b of B, two (S, DH) matrices, loaded here: the
    # head dim is contracted in chunks of KC, a power of two that divides DH (192 = 3 x 64,
    # 384 = 3 x 128), so no product is spent on padding and no wide operand stays in registers.
    for k0 in tl.static_range(0, DH, KC):
        offs_k = k0 + tl.arange(0, KC)
        k_ok = offs_k < DH
        a = _tile(a_base, offs_a, offs_k, stride_as, stride_ad, a_ok, k_ok)
        b = _tile_t(b_base, offs_b, offs_k, stride_bs, stride_bd, b_ok, k_ok)
        acc = _dot(a, b, acc, OP_DTYPE, DOT_DTYPE, PRECISION)
    return acc


# The gate planes: four (BH, S) float32 rows b_hi, b_lo, M_hi, M_lo (b = igate - F, M its running max,
# each split into a float32 value and its float32 remainder). exp(log D_ij - m_i) = exp(b_j - M_i) is
# formed as (b_hi_j - M_hi_i) + (b_lo_j - M_lo_i): the first difference is exact where the exponent is
# near zero, however large b and M are.


@triton.jit
def _key_terms(gate_ptr, row, BHS, offs_n, n_ok):
    b_hi = tl.load(gate_ptr + row + offs_n, mask=n_ok, other=float("-inf"))  # padded keys weigh 0
    b_lo = tl.load(gate_ptr + BHS + row + offs_n, mask=n_ok, other=0.0)
    return b_hi, b_lo


@triton.jit
def _query_terms(gate_ptr, row, BHS, offs_m, m_ok):
    m_hi = tl.load(gate_ptr + 2 * BHS + row + offs_m, mask=m_ok, other=float("inf"))  # padded rows weigh 0
    m_lo = tl.load(gate_ptr + 3 * BHS + row + offs_m, mask=m_ok, other=0.0)
    return m_hi, m_lo


@triton.jit
def _decay(m_hi, m_lo, b_hi, b_lo, causal):
    # Rows index queries, columns keys. Above the diagonal the exponent may overflow; tl.where drops it.
    return tl.where(causal, tl.exp((b_hi[None, :] - m_hi[:, None]) + (b_lo[None, :] - m_lo[:, None])), 0.0)


@triton.jit
def _decay_t(m_hi, m_lo, b_hi, b_lo, causal_t):
    # The transpose of _decay: rows index keys, columns queries.
    return tl.where(causal_t, tl.exp((b_hi[:, None] - m_hi[None, :]) + (b_lo[:, None] - m_lo[None, :])), 0.0)


# Gate pre- and post-processing: one program per (batch, head) walks the sequence in blocks, carrying
# the running sums and maxima, in float64.
@triton.jit
def _gate_planes_kernel(
    ig_ptr, fg_ptr, gate_ptr, floor_ptr,
    stride_ib, stride_ih, stride_is, stride_fb, stride_fh, stride_fs,
    NH, S, BLOCK: tl.constexpr,
):
    """The four gate planes and the normalizer floor exp(-m_i) = exp(-(F_i + M_i))."""
    pid_bh = tl.program_id(0)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    row = pid_bh.to(tl.int64) * S
    BHS = tl.num_programs(0).to(tl.int64) * S
    f_carry = tl.full([], 0.0, tl.float64)
    m_carry = tl.full([], float("-inf"), tl.float64)
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        ok = offs < S
        fg = tl.load(fg_ptr + i_b * stride_fb + i_h * stride_fh + offs * stride_fs, mask=ok, other=0.0)
        # Padding lies after every real token: the prefix scans keep it out of real positions.
        ig = tl.load(ig_ptr + i_b * stride_ib + i_h * stride_ih + offs * stride_is, mask=ok, other=0.0)
        fg = fg.to(tl.float64)
        log_f = tl.where(ok, _logsigmoid(fg), 0.0)
        f_cum = f_carry + tl.cumsum(log_f, 0)
        b = ig.to(tl.float64) - f_cum
        running_max = tl.maximum(tl.associative_scan(b, 0, _max_combine), m_carry)
        b_hi, b_lo = _split_hi_lo(b)
        m_hi, m_lo = _split_hi_lo(running_max)
        tl.store(gate_ptr + row + offs, b_hi, mask=ok)
        tl.store(gate_ptr + BHS + row + offs, b_lo, mask=ok)
        tl.store(gate_ptr + 2 * BHS + row + offs, m_hi, mask=ok)
        tl.store(gate_ptr + 3 * BHS + row + offs, m_lo, mask=ok)
        tl.store(floor_ptr + row + offs, tl.exp(-(f_cum + running_max)).to(tl.float32), mask=ok)
        f_carry += tl.sum(log_f, 0)
        m_carry = tl.maximum(m_carry, tl.max(b, 0))


@triton.jit
def _gate_grads_kernel(
    rowg_ptr, colg_ptr, fg_ptr, dg_ptr, copy_ptr, dg_off,
    stride_fb, stride_fh, stride_fs, stride_gg, stride_gb, stride_gh, stride_gs,
    NH, S, BLOCK: tl.constexpr, HP: tl.constexpr, COPY: tl.constexpr, PAD: tl.constexpr, PADP: tl.constexpr,
):
    """d igate_j = colg_j; d logsigmoid(fgate_l) = sum_{i >= l} (rowg_i - colg_i), a suffix sum taken
    from the end in float64 (row and column sums nearly cancel for strongly forgetting tokens).

    One program per batch element, all heads at once (a packed layout holds a token's gates side by
    side). Both gates go into one tensor from element dg_off on, at gate * stride_gg + b * stride_gb + ...
    (and the same places of copy_ptr if COPY); with PAD > 0 also PAD zeros after the forget gates along
    the head stride (the padding columns of a packed layout)."""
    i_b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HP)
    h_ok = heads < NH
    rows = (i_b * NH + heads) * S  # offsets of the heads' rows of rowg and colg
    dst = dg_off + i_b * stride_gb + heads[None, :] * stride_gh
    carry = tl.zeros([HP], dtype=tl.float64)
    num_blocks = tl.cdiv(S, BLOCK)
    for i in range(num_blocks):
        offs = (num_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
        ok = (offs < S)[:, None] & h_ok[None, :]
        colg = tl.load(colg_ptr + rows[None, :] + offs[:, None], mask=ok, other=0.0)
        diff = tl.load(rowg_ptr + rows[None, :] + offs[:, None], mask=ok, other=0.0).to(tl.float64) - colg.to(tl.float64)
        dlog_f = carry[None, :] + tl.cumsum(diff, 0, reverse=True)
        carry += tl.sum(diff, 0)
        fg = tl.load(fg_ptr + i_b * stride_fb + heads[None, :] * stride_fh + offs[:, None] * stride_fs, mask=ok, other=0.0)
        dfg = dlog_f / (1.0 + tl.exp(fg.to(tl.float64)))  # times sigmoid(-fgate)
        _store_gate_grads(dg_ptr, copy_ptr, dst + offs[:, None] * stride_gs, colg, dfg, ok, stride_gg, COPY)
        if PAD > 0:
            _zero_gate_padding(dg_ptr, copy_ptr, dg_off + i_b * stride_gb + 2 * stride_gg, offs, offs < S,
                               stride_gh, stride_gs, BLOCK, PAD, PADP, COPY)


@triton.autotune(configs=_autotune_configs((4, 8), (2, 3)), key=["S", "DH", "BM", "BN", "BV"])
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, gate_ptr, floor_ptr, norm_ptr, den_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_hb, stride_hh, stride_hs, stride_hd,
    NH, S, scale: tl.constexpr, eps: tl.constexpr,
    DH: tl.constexpr, DHP: tl.constexpr, KC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BV: tl.constexpr, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output tile (query tile pid_m, value features of tile pid_v)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    row = pid_bh.to(tl.int64) * S
    BHS = tl.num_programs(2).to(tl.int64) * S

    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < S
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DH
    offs_k = tl.arange(0, DHP)
    k_ok = offs_k < DH
    if KC == 0:  # narrow heads: q is loaded once, the head dim padded to DHP
        q = _tile(q_base, offs_m, offs_k, stride_qs, stride_qd, m_ok, k_ok)
    m_hi, m_lo = _query_terms(gate_ptr, row, BHS, offs_m, m_ok)

    num = tl.zeros([BM, BV], dtype=tl.float32)
    den = tl.zeros([BM], dtype=tl.float32)
    for n0 in range(0, tl.minimum(pid_m * BM + BM, S), BN):  # causal: key tiles up to the query tile
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < S
        zeros = tl.zeros([BM, BN], dtype=tl.float32)
        if KC == 0:
            s = _dot(q, _tile_t(k_base, offs_n, offs_k, stride_ks, stride_kd, n_ok, k_ok), zeros,
                     OP_DTYPE, DOT_DTYPE, PRECISION)
        else:
            s = _gram(q_base, k_base, offs_m, offs_n, m_ok, n_ok, stride_qs, stride_qd, stride_ks, stride_kd,
                      zeros, DH, KC, OP_DTYPE, DOT_DTYPE, PRECISION)
        b_hi, b_lo = _key_terms(gate_ptr, row, BHS, offs_n, n_ok)
        c = s * scale * _decay(m_hi, m_lo, b_hi, b_lo, offs_m[:, None] >= offs_n[None, :])
        den += tl.sum(c, 1)
        v = _tile(v_base, offs_n, offs_v, stride_vs, stride_vd, n_ok, v_ok)
        num = _dot_split_lhs(c, v, num, OP_DTYPE, DOT_DTYPE, PRECISION)

    floor = tl.load(floor_ptr + row + offs_m, mask=m_ok, other=1.0)
    norm = tl.maximum(tl.abs(den), floor) + eps
    h = num / norm[:, None]
    h_base = h_ptr + i_b * stride_hb + i_h * stride_hh
    tl.store(h_base + offs_m[:, None] * stride_hs + offs_v[None, :] * stride_hd,
             _cast(h, h_ptr.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])
    if pid_v == 0:
        tl.store(norm_ptr + row + offs_m, norm, mask=m_ok)
        tl.store(den_ptr + row + offs_m, den, mask=m_ok)


# Backward. With inv_n_i = 1 / n_i and dden_i the gradient reaching den_i through n_i, the gradient
# of C_ij is dC_ij = inv_n_i (dh_i . v_j) + dden_i; that of the scaled score is dC_ij exp(b_j - M_i),
# and that of log D_ij is G_ij = dC_ij C_ij. The gates get d igate_j = sum_i G_ij and
# dF_i = sum_j G_ij - sum_k G_ki (row sum minus column sum), summed into d logsigmoid(fgate) outside.
@triton.autotune(configs=_autotune_configs((4, 8), (2, 3)), key=["S", "DH", "BLOCK", "SUB", "BD"])
@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, dh_ptr, gate_ptr, inv_norm_ptr, dden_ptr,
    dqk_ptr, dv_ptr, rowg_ptr, colg_ptr, dq_off, dk_off, dv_off,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_gqb, stride_gqh, stride_gqs, stride_gqd,
    stride_gkb, stride_gkh, stride_gks, stride_gkd,
    stride_gvb, stride_gvh, stride_gvs, stride_gvd,
    NH, S, scale: tl.constexpr,
    DH: tl.constexpr, DHP: tl.constexpr, KC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
    BD: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program t: dk, dv of key tile t over the query sub-tiles from t on, then dq of query tile t
    over the key sub-tiles up to t (same number of tile pairs for every t). dq and dk are written into
    one tensor at element offsets dq_off and dk_off (torch.compile must see each written tensor once
    per launch), dv at dv_off into its own."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = (pid_bh // NH).to(tl.int64)
    i_h = (pid_bh % NH).to(tl.int64)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    dh_base = dh_ptr + i_b * stride_db + i_h * stride_dh
    row = pid_bh.to(tl.int64) * S
    BHS = tl.num_programs(2).to(tl.int64) * S
    offs_k = tl.arange(0, DHP)
    k_ok = offs_k < DH
    offs_d = pid_d * BD + tl.arange(0, BD)
    d_ok = offs_d < DH
    t0 = pid_t * BLOCK
    offs_t = t0 + tl.arange(0, BLOCK)
    t_ok = offs_t < S

    # dk, dv of key tile t, as transposed score tiles (keys x queries). Narrow heads (KC == 0) hold
    # the tile's k and v and reuse the loaded query-side tiles as the outputs' operands; wide heads
    # load everything per step, in head-dim chunks (see _gram).
    if KC == 0:
        k = _tile(k_base, offs_t, offs_k, stride_ks, stride_kd, t_ok, k_ok)
        v = _tile(v_base, offs_t, offs_k, stride_vs, stride_vd, t_ok, k_ok)
    b_hi, b_lo = _key_terms(gate_ptr, row, BHS, offs_t, t_ok)
    dk = tl.zeros([BLOCK, BD], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BD], dtype=tl.float32)
    colg = tl.zeros([BLOCK], dtype=tl.float32)
    for m0 in range(t0, S, SUB):
        offs_m = m0 + tl.arange(0, SUB)
        m_ok = offs_m < S
        zeros = tl.zeros([BLOCK, SUB], dtype=tl.float32)
        if KC == 0:
            q_t = _tile_t(q_base, offs_m, offs_k, stride_qs, stride_qd, m_ok, k_ok)
            dh_t = _tile_t(dh_base, offs_m, offs_k, stride_ds, stride_dd, m_ok, k_ok)
            s_t = _dot(k, q_t, zeros, OP_DTYPE, DOT_DTYPE, PRECISION)
            dp_t = _dot(v, dh_t, zeros, OP_DTYPE, DOT_DTYPE, PRECISION)
        else:
            s_t = _gram(k_base, q_base, offs_t, offs_m, t_ok, m_ok, stride_ks, stride_kd, stride_qs, stride_qd,
                        zeros, DH, KC, OP_DTYPE, DOT_DTYPE, PRECISION)
            dp_t = _gram(v_base, dh_base, offs_t, offs_m, t_ok, m_ok, stride_vs, stride_vd, stride_ds,
                         stride_dd, zeros, DH, KC, OP_DTYPE, DOT_DTYPE, PRECISION)
        m_hi, m_lo = _query_terms(gate_ptr, row, BHS, offs_m, m_ok)
        e_t = _decay_t(m_hi, m_lo, b_hi, b_lo, offs_t[:, None] <= offs_m[None, :])
        inv_n_m = tl.load(inv_norm_ptr + row + offs_m, mask=m_ok, other=0.0)
        dden_m = tl.load(dden_ptr + row + offs_m, mask=m_ok, other=0.0)
        c_t = s_t * scale * e_t
        dc_t = dp_t * inv_n_m[None, :] + dden_m[None, :]
        colg += tl.sum(dc_t * c_t, 1)
        if KC == 0 and BD == DHP:
            q_d = tl.trans(q_t)
            dh_d = tl.trans(dh_t)
        else:
            q_d = _tile(q_base, offs_m, offs_d, stride_qs, stride_qd, m_ok, d_ok)
            dh_d = _tile(dh_base, offs_m, offs_d, stride_ds, stride_dd, m_ok, d_ok)
        dv = _dot(c_t * inv_n_m[None, :], dh_d, dv, OP_DTYPE, DOT_DTYPE, PRECISION)
        dk = _dot(dc_t * e_t, q_d, dk, OP_DTYPE, DOT_DTYPE, PRECISION)
    out = offs_t[:, None] * stride_gks + offs_d[None, :] * stride_gkd
    tl.store(dqk_ptr + dk_off + i_b * stride_gkb + i_h * stride_gkh + out,
             _cast(dk * scale, dqk_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
    out = offs_t[:, None] * stride_gvs + offs_d[None, :] * stride_gvd
    tl.store(dv_ptr + dv_off + i_b * stride_gvb + i_h * stride_gvh + out, _cast(dv, dv_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])

    # dq of query tile t.
    if KC == 0:
        q = _tile(q_base, offs_t, offs_k, stride_qs, stride_qd, t_ok, k_ok)
        dh = _tile(dh_base, offs_t, offs_k, stride_ds, stride_dd, t_ok, k_ok)
    mt_hi, mt_lo = _query_terms(gate_ptr, row, BHS, offs_t, t_ok)
    inv_n = tl.load(inv_norm_ptr + row + offs_t, mask=t_ok, other=0.0)
    dden = tl.load(dden_ptr + row + offs_t, mask=t_ok, other=0.0)
    dq = tl.zeros([BLOCK, BD], dtype=tl.float32)
    rowg = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, tl.minimum(t0 + BLOCK, S), SUB):
        offs_n = n0 + tl.arange(0, SUB)
        n_ok = offs_n < S
        zeros = tl.zeros([BLOCK, SUB], dtype=tl.float32)
        if KC == 0:
            k_t = _tile_t(k_base, offs_n, offs_k, stride_ks, stride_kd, n_ok, k_ok)
            v_t = _tile_t(v_base, offs_n, offs_k, stride_vs, stride_vd, n_ok, k_ok)
            s = _dot(q, k_t, zeros, OP_DTYPE, DOT_DTYPE, PRECISION)
            dp = _dot(dh, v_t, zeros, OP_DTYPE, DOT_DTYPE, PRECISION)
        else:
            s = _gram(q_base, k_base, offs_t, offs_n, t_ok, n_ok, stride_qs, stride_qd, stride_ks, stride_kd,
                      zeros, DH, KC, OP_DTYPE, DOT_DTYPE, PRECISION)
            dp = _gram(dh_base, v_base, offs_t, offs_n, t_ok, n_ok, stride_ds, stride_dd, stride_vs, stride_vd,
                       zeros, DH, KC, OP_DTYPE, DOT_DTYPE, PRECISION)
        bn_hi, bn_lo = _key_terms(gate_ptr, row, BHS, offs_n, n_ok)
        e = _decay(mt_hi, mt_lo, bn_hi, bn_lo, offs_t[:, None] >= offs_n[None, :])
        dc = dp * inv_n[:, None] + dden[:, None]
        rowg += tl.sum(dc * (s * scale * e), 1)
        if KC == 0 and BD == DHP:
            k_d = tl.trans(k_t)
        else:
            k_d = _tile(k_base, offs_n, offs_d, stride_ks, stride_kd, n_ok, d_ok)
        dq = _dot(dc * e, k_d, dq, OP_DTYPE, DOT_DTYPE, PRECISION)
    out = offs_t[:, None] * stride_gqs + offs_d[None, :] * stride_gqd
    tl.store(dqk_ptr + dq_off + i_b * stride_gqb + i_h * stride_gqh + out,
             _cast(dq * scale, dqk_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(rowg_ptr + row + offs_t, rowg, mask=t_ok)
        tl.store(colg_ptr + row + offs_t, colg, mask=t_ok)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------


# Heads wider than this are contracted in chunks (KC > 0); narrower ones in one tl.dot over the head dim
# padded to a power of two (DHP), their tiles held in registers. H100, bf16, forward + backward kernels
# per call: chunks cut ViL-S heads (192) at 196 tokens from 2.16 to 1.88 ms and ViL-B heads (384)
# from 3.90 to 2.18 ms, but made ViL-T heads (96) slower (0.61 -> 0.63 ms; 1.24 -> 1.34 ms at 1024
# tokens), as every step then reloads the tiles that the unchunked kernels hold.
CHUNKED_MIN_HEAD_DIM = 129


def _block_sizes(S: int, DH: int, itemsize: int) -> dict:
    """Tile sizes. Outputs are tiled in the head dim by BV/BD <= 128 (each tile recomputing the scores).
    Token tiles by the bytes of a padded row: the fastest measured on an H100 in bf16 at 196 tokens
    (forward / backward kernel per call: ViL-T heads 139 / 349 us, ViL-S heads 325 / 1000 us, ViL-B
    heads 345 / 1415 us; ViL-T heads at 1024 tokens 273 / 713 us, where 64-query tiles would take 265 us
    in the forward), and for float32 rows small enough for shared memory."""
    dhp = max(16, triton.next_power_of_2(DH))
    row_bytes = dhp * itemsize
    if row_bytes < 512:  # ViL-T heads
        bm, bn, block, sub = 128, 32, 64, 32
    elif row_bytes == 512 and itemsize == 2:  # ViL-S heads, contracted in chunks
        bm, bn, block, sub = 128, 32, 64, 16
    elif row_bytes == 512:
        bm, bn, block, sub = 32, 64, 32, 32
    elif itemsize == 2:  # half-precision rows of 1 KiB and more: ViL-B heads, contracted in chunks
        bm, bn, block, sub = 64, 32, 64, 16
    else:
        bm, bn, block, sub = 32, 32, 32, 16
    cap = max(16, triton.next_power_of_2(S))
    out = min(dhp, 128)
    kc = min(DH & -DH, 128) if DH >= CHUNKED_MIN_HEAD_DIM else 0  # the largest power of two dividing DH
    fwd = dict(DHP=dhp, KC=kc, BM=min(bm, cap), BN=min(bn, cap), BV=out)
    bwd = dict(DHP=dhp, KC=kc, BLOCK=min(block, cap), SUB=min(sub, cap), BD=out)
    return fwd, bwd


_GATE_BLOCK = 256


def _gate_planes(igate: torch.Tensor, fgate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, BH, S) float32 planes b_hi, b_lo, M_hi, M_lo and the normalizer floor exp(-m), (BH, S)."""
    B, NH, S = igate.shape
    planes = torch.empty(4, B * NH, S, device=igate.device, dtype=torch.float32)
    floor = torch.empty(B * NH, S, device=igate.device, dtype=torch.float32)
    wrap_triton(_gate_planes_kernel)[(B * NH,)](
        igate, fgate, planes, floor, *igate.stride(), *fgate.stride(), NH, S, BLOCK=_GATE_BLOCK,
    )
    return planes, floor


def _gate_grads(rowg, colg, fgate, dest: GradDest) -> None:
    """d igate and d fgate from the row and column sums of the log-decay gradient, into ``dest``."""
    B, NH, S = fgate.shape
    hp = triton.next_power_of_2(NH)
    wrap_triton(_gate_grads_kernel)[(B,)](
        rowg, colg, fgate, dest.g, dest.g_copy, dest.g_off,
        *fgate.stride(), dest.gate_stride, *dest.g_strides, NH, S,
        BLOCK=max(16, _GATE_BLOCK // hp), HP=hp, COPY=dest.g_copy is not None, PAD=dest.g_pad,
        PADP=triton.next_power_of_2(max(dest.g_pad, 1)),
    )


def cell_forward(q, k, v, igate, fgate, eps: float):
    """Launches the forward pass: h (float32) and what the backward pass keeps (norm, den, planes, floor)."""
    B, NH, S, DH = q.shape
    blocks, _ = _block_sizes(S, DH, q.element_size())
    planes, floor = _gate_planes(igate, fgate)
    # h stays float32: it feeds a normalization, and the backward pass needs it unrounded (dh . h).
    h = _empty_heads_like(v, torch.float32)
    norm = torch.empty(B * NH, S, device=q.device, dtype=torch.float32)
    den = torch.empty_like(norm)
    # scale and eps are compile-time constants: as runtime floats, torch.compile's launcher would type them
    # float64 and promote the gate arithmetic with them.
    wrap_triton(_fwd_kernel)[(triton.cdiv(S, blocks["BM"]), triton.cdiv(DH, blocks["BV"]), B * NH)](
        q, k, v, h, planes, floor, norm, den,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(h),
        NH, S, 1.0 / math.sqrt(DH), eps,
        DH=DH, **blocks, **_dot_config(q.dtype),
    )
    return h, norm, den, planes, floor


def cell_backward(dh, dh_dot_h, q, k, v, fgate, norm, den, planes, floor, dest: GradDest) -> None:
    """Launches the backward pass from dh and the row sums dh . h, (B * NH, S) in float32: dq, dk, dv,
    d igate, d fgate, written into ``dest``."""
    B, NH, S, DH = q.shape
    _, blocks = _block_sizes(S, DH, q.element_size())
    # n_i = max(|den_i|, exp(-m_i)) + eps, h_i = num_i / n_i: dL/dn_i = -(dh_i . h_i) / n_i.
    dnorm = -dh_dot_h / norm
    dden = torch.where(den.abs() > floor, torch.where(den > 0, dnorm, -dnorm), 0.0)
    rowg = torch.empty(B * NH, S, device=q.device, dtype=torch.float32)
    colg = torch.empty_like(rowg)
    wrap_triton(_bwd_kernel)[(triton.cdiv(S, blocks["BLOCK"]), triton.cdiv(DH, blocks["BD"]), B * NH)](
        q, k, v, dh, planes, 1.0 / norm, dden, dest.qk, dest.v, rowg, colg,
        _offset(dest.qk, dest.dq), _offset(dest.qk, dest.dk), _offset(dest.v, dest.dv),
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dh),
        *_strides4(dest.dq), *_strides4(dest.dk), *_strides4(dest.dv),
        NH, S, 1.0 / math.sqrt(DH),
        DH=DH, **blocks, **_dot_config(q.dtype),
    )
    _gate_grads(rowg, colg, fgate, dest)


@triton_op("vil::mlstm_parallel_fwd", mutates_args={})
def _mlstm_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return cell_forward(q, k, v, igate, fgate, eps)  # all but h kept for the backward pass


@triton_op("vil::mlstm_parallel_bwd", mutates_args={})
def _mlstm_bwd(
    dh: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
    igate: torch.Tensor, fgate: torch.Tensor, norm: torch.Tensor, den: torch.Tensor, planes: torch.Tensor,
    floor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, NH, S, DH = q.shape
    dh_dot_h = (dh.float() * h).sum(-1).reshape(B * NH, S)
    dest = _grad_dest(q, v, igate.dtype)  # split by the caller
    cell_backward(dh, dh_dot_h, q, k, v, fgate, norm, den, planes, floor, dest)
    return dest.qk, dest.v, dest.g


def _setup_context(ctx, inputs, output):
    q, k, v, igate, fgate, eps = inputs
    h, norm, den, planes, floor = output
    ctx.save_for_backward(q, k, v, h, igate, fgate, norm, den, planes, floor)


def _backward(ctx, dh, *_):
    dqk, dv, dg = _mlstm_bwd(dh, *ctx.saved_tensors)
    return *_dq_dk(dqk), dv, dg[0], dg[1], None


_mlstm_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlstm_parallel_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """mLSTM cell, parallel form in tiled Triton kernels; differentiable w.r.t. all five inputs.

    q, k, v: (B, NH, S, DH), one of fp32/bf16/fp16, any strides (e.g. a transposed view);
    DH must be a multiple of 16. igate, fgate: (B, NH, S) gate pre-activations, any float dtype.
    Returns h: (B, NH, S, DH) in float32, laid out like v.
    """
    _check_inputs(q, k, v, igate, fgate)
    if q.shape[2] == 0:
        return _empty_heads_like(v, torch.float32)
    return _mlstm_fwd(q, k, v, igate, fgate, eps)[0]
