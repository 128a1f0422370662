"""The mLSTM cell with stabilized exponential gating, in three equivalent forms.

All forms take per-head queries, keys and values of shape (B, NH, S, DH) and the input/forget gate
pre-activations of shape (B, NH, S), and return the hidden states h of shape (B, NH, S, DH):

    log f_t  = logsigmoid(fgate_t)
    log D_ij = sum_{l=j+1..i} log f_l + igate_j      (j <= i)
    m_i      = max_j log D_ij                         (stabilizer)
    C_ij     = (q_i . k_j / sqrt(DH)) * exp(log D_ij - m_i)
    h_i      = sum_j C_ij v_j / (max(|sum_j C_ij|, exp(-m_i)) + eps)

- ``parallel``: the quadratic form above, O(S^2) memory.
- ``chunkwise``: parallel inside chunks of ``chunk_size`` tokens, recurrent across chunks; memory linear
  in S. Works for any S: the last chunk is padded and the padding (which lies after every real token,
  so causality keeps it out of real outputs) is cut off.
- ``recurrent``: step by step with the matrix memory C_t, the normalizer n_t and the stabilizer m_t.

The forms carry the exact row-max stabilizer m_i between chunks and steps, so they compute the same
function to rounding error (the stabilizer only enters the result through ``eps``).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

MLSTM_FORMS = ("parallel", "chunkwise", "recurrent", "triton", "auto")


def _log_decay_matrix(log_f: torch.Tensor) -> torch.Tensor:
    """sum_{l=j+1..i} log f_l for j <= i and -inf above the diagonal, shape (..., S, S).

    Summing masked rows instead of subtracting two global cumulative sums keeps the result accurate
    in float32 for long sequences, where the global sums reach magnitudes of 1e4-1e5.
    """
    S = log_f.shape[-1]
    strictly_lower = torch.ones(S, S, dtype=torch.bool, device=log_f.device).tril(-1)
    terms = log_f.unsqueeze(-1).expand(*log_f.shape, S).masked_fill(~strictly_lower, 0.0)
    segsum = terms.cumsum(dim=-2)  # [i, j] = sum_{l=j+1..i} log f_l (for j < i)
    causal = torch.ones(S, S, dtype=torch.bool, device=log_f.device).tril()
    return segsum.masked_fill(~causal, float("-inf"))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in float32: the gates' exponentials need the range.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _normalize(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    n = torch.maximum(den.abs(), torch.exp(-m))
    return num / (n + eps)


def mlstm_parallel(q, k, v, igate, fgate, eps: float = 1e-6) -> torch.Tensor:
    dtype = q.dtype
    work = _work_dtype(dtype)
    q, v = q.to(work), v.to(work)
    k = k.to(work) / math.sqrt(q.shape[-1])
    log_f = F.logsigmoid(fgate.to(work))
    log_d = _log_decay_matrix(log_f) + igate.to(work).unsqueeze(-2)
    m = log_d.amax(dim=-1, keepdim=True)
    c = (q @ k.transpose(-2, -1)) * torch.exp(log_d - m)
    h = _normalize(c @ v, c.sum(dim=-1, keepdim=True), m, eps)
    return h.to(dtype)


def mlstm_recurrent(q, k, v, igate, fgate, eps: float = 1e-6) -> torch.Tensor:
    dtype = q.dtype
    work = _work_dtype(dtype)
    q, v = q.to(work), v.to(work)
    k = k.to(work) / math.sqrt(q.shape[-1])
    log_f = F.logsigmoid(fgate.to(work))
    igate = igate.to(work)
    B, NH, S, DH = q.shape
    c_state = q.new_zeros(B, NH, DH, DH)
    n_state = q.new_zeros(B, NH, DH)
    m_state = q.new_full((B, NH), float("-inf"))
    hs = []
    for t in range(S):
        m_new = torch.maximum(log_f[..., t] + m_state, igate[..., t])
        f_scale = torch.exp(log_f[..., t] + m_state - m_new)
        i_scale = torch.exp(igate[..., t] - m_new)
        c_state = f_scale[..., None, None] * c_state + i_scale[..., None, None] * (
            v[..., t, :, None] * k[..., t, None, :]
        )
        n_state = f_scale[..., None] * n_state + i_scale[..., None] * k[..., t, :]
        q_t = q[..., t, :]
        num = (c_state @ q_t.unsqueeze(-1)).squeeze(-1)
        den = (n_state * q_t).sum(-1, keepdim=True)
        hs.append(_normalize(num, den, m_new.unsqueeze(-1), eps))
        m_state = m_new
    return torch.stack(hs, dim=-2).to(dtype)


def mlstm_chunkwise(q, k, v, igate, fgate, chunk_size: int = 64, eps: float = 1e-6) -> torch.Tensor:
    dtype = q.dtype
    work = _work_dtype(dtype)
    B, NH, S, DH = q.shape
    L = min(chunk_size, S)
    nc = math.ceil(S / L)
    pad = nc * L - S
    q, v = q.to(work), v.to(work)
    k = k.to(work) / math.sqrt(DH)
    log_f = F.logsigmoid(fgate.to(work))
    igate = igate.to(work)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_f, igate = F.pad(log_f, (0, pad)), F.pad(igate, (0, pad))
    q, k, v = (t.view(B, NH, nc, L, DH) for t in (q, k, v))
    log_f, igate = log_f.view(B, NH, nc, L), igate.view(B, NH, nc, L)

    # Intra-chunk log-decay matrices and per-token cumulative decay from each chunk's start.
    log_d_intra = _log_decay_matrix(log_f) + igate.unsqueeze(-2)  # (B, NH, nc, L, L)
    b = log_f.cumsum(-1)  # (B, NH, nc, L)
    scores = q @ k.transpose(-2, -1)  # (B, NH, nc, L, L)

    c_state = q.new_zeros(B, NH, DH, DH)  # stabilized sum_j w_j k_j v_j^T up to the chunk start
    n_state = q.new_zeros(B, NH, DH)
    m_state = q.new_full((B, NH), float("-inf"))
    hs = []
    for c in range(nc):
        ld = log_d_intra[:, :, c]
        m_intra = ld.amax(-1)  # (B, NH, L)
        log_inter = b[:, :, c] + m_state.unsqueeze(-1)  # decay applied to the carried state
        m = torch.maximum(m_intra, log_inter)
        w_inter = torch.exp(log_inter - m)
        w_intra = scores[:, :, c] * torch.exp(ld - m.unsqueeze(-1))
        q_c = q[:, :, c]
        num = w_inter.unsqueeze(-1) * (q_c @ c_state) + w_intra @ v[:, :, c]
        den = w_inter * (q_c @ n_state.unsqueeze(-1)).squeeze(-1) + w_intra.sum(-1)
        hs.append(_normalize(num, den.unsqueeze(-1), m.unsqueeze(-1), eps))
        # Carry the state to the end of this chunk, stabilized by m at the chunk's last token.
        m_end = m[..., -1]
        decay_state = torch.exp(log_inter[..., -1] - m_end)
        w_kv = torch.exp(ld[..., -1, :] - m_end.unsqueeze(-1))  # (B, NH, L)
        k_w = k[:, :, c] * w_kv.unsqueeze(-1)
        c_state = decay_state[..., None, None] * c_state + k_w.transpose(-2, -1) @ v[:, :, c]
        n_state = decay_state[..., None] * n_state + k_w.sum(-2)
        m_state = m_end
    h = torch.cat(hs, dim=-2)[:, :, :S]
    return h.to(dtype)


# Up to this many tokens the tiled parallel-form kernel is the faster Triton path (H100, bf16, forward
# and backward: 2.3x the chunkwise kernel at 196 tokens, even at 1024); beyond it the chunkwise kernel,
# whose work grows linearly with the sequence (2.8x faster at 4096 tokens).
TILED_MAX_TOKENS = 1024


def resolve_form(form: str, device: torch.device, seq_len: int) -> str:
    """The form ``mlstm`` runs for seq_len tokens on ``device``: ``auto`` resolved, and ``triton`` as
    ``tiled`` (the parallel-form kernels) or ``chunkwise_triton``."""
    if form == "auto":
        form = "triton" if device.type == "cuda" and _triton_available() else "chunkwise"
    if form == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"mlstm_form='triton' runs GPU kernels, but the input is on {device.type}: use "
                               f"'auto' (the kernels on CUDA, the chunkwise form elsewhere) or move model and input "
                               f"to a CUDA device (TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter)")
        return "tiled" if seq_len <= TILED_MAX_TOKENS else "chunkwise_triton"
    if form not in MLSTM_FORMS:
        raise ValueError(f"unknown mlstm form {form!r}; choose one of {MLSTM_FORMS}")
    return form


def kernel_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the Triton kernels compute q, k, v in. A custom kernel is invisible to autocast: it gets
    the half-precision operands that autocast would have given a matmul."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype


def mlstm(q, k, v, igate, fgate, form: str = "parallel", chunk_size: int = 64, eps: float = 1e-6):
    """Dispatch to one form of the mLSTM cell. ``auto`` uses the fused Triton kernels on CUDA and the
    chunkwise PyTorch form elsewhere. ``triton`` picks the tiled parallel-form kernel up to
    ``TILED_MAX_TOKENS`` tokens (it returns h in float32, as it keeps it for its backward pass) and the
    chunkwise kernel beyond."""
    form = resolve_form(form, q.device, q.shape[2])
    if form == "parallel":
        return mlstm_parallel(q, k, v, igate, fgate, eps=eps)
    if form == "chunkwise":
        return mlstm_chunkwise(q, k, v, igate, fgate, chunk_size=chunk_size, eps=eps)
    if form == "recurrent":
        return mlstm_recurrent(q, k, v, igate, fgate, eps=eps)
    q, k, v = (t.to(kernel_dtype(q)) for t in (q, k, v))
    if form == "tiled":
        from vil.kernels.mlstm_parallel_triton import mlstm_parallel_triton

        return mlstm_parallel_triton(q, k, v, igate, fgate, eps=eps)
    from vil.kernels.mlstm_triton import mlstm_chunkwise_triton

    return mlstm_chunkwise_triton(q, k, v, igate, fgate, chunk_size=chunk_size, eps=eps)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
