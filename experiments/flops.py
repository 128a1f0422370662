"""Training FLOPs per image: ViL vs DeiT (timm) at several resolutions, counted on the CPU.

    .venv/bin/python experiments/flops.py --sizes tiny --res 224 512 1024

A FLOP ratio is what the throughput ratio would be if both models ran at the same hardware efficiency.
ViL is counted in its chunkwise form (the linear-cost algorithm; 64-token chunks by default), DeiT with
its attention as plain matmuls (torch's counter does not price the CPU's fused attention kernel).
"""
from __future__ import annotations

import argparse

import timm
import torch

import vil


def deit_train_flops(size: str, res: int) -> int:
    model = timm.create_model(f"deit_{size}_patch16_224", img_size=res)
    for block in model.blocks:
        block.attn.fused_attn = False
    return vil.count_flops(model, res, train=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=["tiny", "small", "base"])
    parser.add_argument("--res", nargs="+", type=int, default=[224, 512, 1024])
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    print(f"{'size':6s} {'res':>5s} {'ViL GFLOP':>10s} {'DeiT GFLOP':>11s} {'ViL/DeiT':>9s}")
    rows = []
    for size in args.sizes:
        for res in args.res:
            model = vil.create_model(f"vil2_{size}", img_size=res, mlstm_form="chunkwise", chunk_size=args.chunk_size)
            ours = vil.count_flops(model, res, train=True)
            theirs = deit_train_flops(size, res)
            print(f"{size:6s} {res:5d} {ours / 1e9:10.1f} {theirs / 1e9:11.1f} {ours / theirs:8.2f}x", flush=True)
            rows.append(dict(size=size, res=res, vil_flops=ours, deit_flops=theirs))
    return rows


if __name__ == "__main__":
    main()
