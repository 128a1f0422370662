"""An independent float64 reference of the mLSTM cell, written straight from the paper's parallel form with a
global cumulative sum (no shared code with vil.mlstm)."""
import math

import torch
import torch.nn.functional as F


def mlstm_reference(q, k, v, igate, fgate, eps=1e-6):
    q, k, v, igate, fgate = (t.double() for t in (q, k, v, igate, fgate))
    S = q.shape[-2]
    log_f = F.logsigmoid(fgate)
    cum = torch.cat([torch.zeros_like(log_f[..., :1]), log_f.cumsum(-1)], dim=-1)
    log_d = cum[..., 1:, None] - cum[..., None, 1:]
    log_d = log_d.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    log_d = log_d + igate[..., None, :]
    m = log_d.max(dim=-1, keepdim=True).values
    c = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])) * torch.exp(log_d - m)
    n = torch.maximum(c.sum(-1, keepdim=True).abs(), torch.exp(-m))
    return (c @ v) / (n + eps)


def rel_err(out, ref):
    """Relative error ||out - ref|| / ||ref|| in float64; the absolute one where the reference is exactly zero
    (e.g. the forget-gate gradient of a one-token sequence)."""
    diff, scale = (out.double() - ref.double()).norm(), ref.double().norm()
    return (diff / scale if scale > 0 else diff).item()
