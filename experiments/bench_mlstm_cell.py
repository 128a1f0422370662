"""GPU micro-benchmark of the mLSTM cell: the fused Triton kernels (tiled parallel form, chunkwise form) vs.
the PyTorch parallel form, with scaled_dot_product_attention at the matching DeiT shapes for reference.

Times forward and forward+backward (median of triton.testing.do_bench; the PyTorch gate pre- and
post-processing of the tiled kernel included, run eagerly), reports peak memory of one forward+backward,
and checks each kernel once per shape against the float32 parallel form.

    .venv/bin/python experiments/bench_mlstm_cell.py                 # all shapes, bf16
    .venv/bin/python experiments/bench_mlstm_cell.py --shapes vil-t-224 --chunk-size 64
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (batch, heads, head dim, tokens); mLSTM rows and the DeiT attention they are compared with.
MLSTM_SHAPES = {
    "vil-t-224": (256, 4, 96, 196),
    "vil-t-512": (48, 4, 96, 1024),
    "vil-t-1024": (12, 4, 96, 4096),
    "vil-b-224": (128, 4, 384, 196),
}
SDPA_SHAPES = {
    "vil-t-224": (256, 3, 64, 197),
    "vil-t-512": (48, 3, 64, 1025),
    "vil-t-1024": (12, 3, 64, 4097),
    "vil-b-224": (128, 12, 64, 197),
}


def mlstm_parallel(q, k, v, igate, fgate, eps: float = 1e-6):
    """Quadratic form of the mLSTM cell: gates and weights in float32, matmuls in the input dtype."""
    S, DH = q.shape[-2:]
    log_f_cum = F.logsigmoid(fgate.float()).cumsum(-1)
    log_d = log_f_cum[..., :, None] - log_f_cum[..., None, :] + igate.float()[..., None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    m = log_d.amax(-1, keepdim=True).detach()
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(DH)
    c = scores * torch.exp(log_d - m)
    norm = torch.maximum(c.sum(-1, keepdim=True).abs(), torch.exp(-m)) + eps
    return ((c.to(v.dtype) @ v).float() / norm).to(v.dtype)


def make_mlstm_inputs(B, NH, DH, S, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # Heads as transposed views of per-token features, the layout a ViL block produces.
    q, k, v = (
        torch.randn(B, S, NH, DH, device="cuda", dtype=dtype, generator=g).transpose(1, 2) for _ in range(3)
    )
    igate = torch.randn(B, S, NH, device="cuda", generator=g).transpose(1, 2)
    fgate = (3.0 + torch.randn(B, S, NH, device="cuda", generator=g)).transpose(1, 2)
    inputs = [t.requires_grad_() for t in (q, k, v, igate, fgate)]
    dh = torch.randn(B, NH, S, DH, device="cuda", dtype=dtype, generator=g)
    return inputs, dh


def make_sdpa_inputs(B, H, D, S, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    inputs = [
        torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)
    ]
    return inputs, torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g)


def measure(fn, inputs, dout, warmup, rep):
    """(forward ms, forward+backward ms, peak MiB of one forward+backward) or an error string."""
    import triton.testing

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        out.backward(dout.to(out.dtype))

    try:
        fwd_bwd()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        t_fwd = triton.testing.do_bench(fwd, warmup=warmup, rep=rep, return_mode="median")
        t_all = triton.testing.do_bench(
            fwd_bwd, warmup=warmup, rep=rep, grad_to_none=inputs, return_mode="median"
        )
        for x in inputs:
            x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        for x in inputs:
            x.grad = None
        return t_fwd, t_all, peak
    except torch.cuda.OutOfMemoryError:
        for x in inputs:
            x.grad = None
        torch.cuda.empty_cache()
        return "OOM"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_against_fp32(kernel, inputs, dout):
    """Relative errors of h and of the five gradients vs. the float32 parallel form."""
    try:
        h = kernel(*inputs)
        grads = torch.autograd.grad(h, inputs, dout.to(h.dtype))
        ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
        h_ref = mlstm_parallel(*ref_inputs)
        grads_ref = torch.autograd.grad(h_ref, ref_inputs, dout.float())
        errs = [rel_err(h, h_ref)] + [rel_err(a, b) for a, b in zip(grads, grads_ref)]
        del h_ref, grads_ref
        return "h {:.1e}  dq {:.1e}  dk {:.1e}  dv {:.1e}  di {:.1e}  df {:.1e}".format(*errs)
    except torch.cuda.OutOfMemoryError:
        return "reference OOM"
    finally:
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(MLSTM_SHAPES), choices=list(MLSTM_SHAPES))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measurement time, ms")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the parallel form")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from vil.kernels.mlstm_parallel_triton import mlstm_parallel_triton
    from vil.kernels.mlstm_triton import mlstm_chunkwise_triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kernels = {
        "triton tiled": mlstm_parallel_triton,
        "triton chunkwise": lambda q, k, v, i, f: mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=args.chunk_size),
    }
    compiled_parallel = torch.compile(mlstm_parallel, dynamic=False)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
          f"chunk_size {args.chunk_size}")

    rows, checks = [], []
    for name in args.shapes:
        B, NH, DH, S = MLSTM_SHAPES[name]
        inputs, dout = make_mlstm_inputs(B, NH, DH, S, dtype)
        label = f"({B}, {NH}x{DH}, {S})"
        results = {name_k: measure(kernel, inputs, dout, args.warmup, args.rep) for name_k, kernel in kernels.items()}
        results["parallel eager"] = measure(mlstm_parallel, inputs, dout, args.warmup, args.rep)
        if not args.no_compile:
            results["parallel compiled"] = measure(compiled_parallel, inputs, dout, args.warmup, args.rep)
        if not args.no_check:
            for name_k, kernel in kernels.items():
                checks.append((name, f"{label} {name_k}", check_against_fp32(kernel, inputs, dout)))
        del inputs, dout

        B, H, D, S_attn = SDPA_SHAPES[name]
        sdpa_inputs, sdpa_dout = make_sdpa_inputs(B, H, D, S_attn, dtype)
        for causal in (True, False):
            fn = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
            results[f"sdpa {'causal' if causal else 'full'} ({B}, {H}x{D}, {S_attn})"] = measure(
                fn, sdpa_inputs, sdpa_dout, args.warmup, args.rep)
        del sdpa_inputs, sdpa_dout
        torch.cuda.empty_cache()

        baseline = results["parallel eager"]
        for method, res in results.items():
            first = method == next(iter(kernels))
            rows.append((name if first else "", label if first else "", method, res, baseline))

    header = (f"{'shape':<11} {'(B, NHxDH, S)':<20} {'method':<36} {'fwd ms':>8} {'fwd+bwd ms':>11} "
              f"{'vs parallel':>12} {'peak MiB':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, label, method, res, baseline in rows:
        if isinstance(res, str):
            print(f"{name:<11} {label:<20} {method:<36} {res:>8}")
            continue
        t_fwd, t_all, peak = res
        ratio = f"{t_all / baseline[1]:.2f}x" if not isinstance(baseline, str) else "-"
        print(f"{name:<11} {label:<20} {method:<36} {t_fwd:>8.3f} {t_all:>11.3f} {ratio:>12} {peak:>9.0f}")
    print("('vs parallel' = fwd+bwd time / that of the eager PyTorch parallel form at the same mLSTM shape)")

    if checks:
        print("\ncorrectness of the Triton kernels vs. the float32 parallel form (relative L2 error):")
        for name, label, result in checks:
            print(f"  {name:<11} {label:<20} {result}")


if __name__ == "__main__":
    main()
