"""Throughput benchmark: ViL against DeiT (timm, PyTorch SDPA attention) across resolutions.

For each model size and resolution it times a full training step (bf16 autocast forward, backward, AdamW
step) and inference, eager and torch.compile'd, and reports images/s, the ratio to DeiT of the same size
(each at its best setting) and peak memory. ``compiled`` compiles ViL block by block
(``VisionLSTM.compile_blocks``) and DeiT whole; ``cudagraphs`` does the same with
``mode="reduce-overhead"``, which replays each compiled graph as a CUDA graph (no per-kernel launch cost;
its peak memory counts the graphs' memory pools, allocated during warm-up). The ``authors`` column is ViL with the quadratic parallel
mLSTM form at every length, compiled, the algorithm of the authors' release; ``vil`` uses
``mlstm_form="auto"``: the fused Triton kernels on CUDA.

    .venv/bin/python experiments/benchmark.py               # GPU: T/S/B at 224/384/512/768/1024
    .venv/bin/python experiments/benchmark.py --sizes tiny --res 224 512 1024 --modes compiled cudagraphs
    .venv/bin/python experiments/benchmark.py --quick       # CPU smoke run of the script (seconds; no real numbers)

Writes ``benchmark.csv`` and ``benchmark.png`` (img/s vs resolution) under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import vil  # noqa: E402

SIZES = {  # name: (ViL model, timm DeiT model, batch size at 224)
    "tiny": ("vil2_tiny", "deit_tiny_patch16_224", 256),
    "small": ("vil2_small", "deit_small_patch16_224", 256),
    "base": ("vil2_base", "deit_base_patch16_224", 128),
}
QUICK = dict(dim=32, depth=2, patch_size=4)
MODES = ("eager", "compiled", "cudagraphs")


def build(kind: str, size: str, res: int, quick: bool) -> torch.nn.Module:
    import timm

    vil_name, deit_name, _ = SIZES[size]
    if kind == "deit":
        if quick:
            return timm.create_model(deit_name, img_size=res, patch_size=4, embed_dim=32, depth=2, num_heads=2)
        return timm.create_model(deit_name, img_size=res)
    form = "parallel" if kind == "authors" else "auto"
    traversal = "quad" if kind == "vil-quad" else "bi"
    return vil.create_model(vil_name, img_size=res, mlstm_form=form, traversal=traversal, **(QUICK if quick else {}))


def batch_size(size: str, res: int, quick: bool) -> int:
    if quick:
        return 2
    return max(1, int(SIZES[size][2] * (224 / res) ** 2))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch: int, res: int, train: bool, device, steps: int, warmup: int,
            min_seconds: float = 0.0, cudagraphs: bool = False) -> tuple[float, float]:
    """(images per second, peak memory in GiB) over at least ``steps`` steps and ``min_seconds``.
    Peak memory is that of the timed steps, or with ``cudagraphs`` of the whole run: the graphs' memory
    is set aside while they are recorded, in the warm-up."""
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None) if train else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        if cudagraphs:  # a new iteration: outputs of the previous replay may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if train:
            with amp:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), amp:
                model(x)

    model.train(train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda" and not cudagraphs:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done, elapsed = 0, 0.0
    while done < steps or elapsed < min_seconds:  # fast models get more steps: 10 of them take ~0.1 s
        for _ in range(steps):
            step()
        done += steps
        _sync(device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch * done / elapsed, peak


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    rows = []
    for size in args.sizes:
        for res in args.res:
            batch = batch_size(size, res, args.quick)
            for kind in args.kinds:
                for mode in args.modes:
                    for train in (True, False):
                        row = dict(size=size, res=res, batch=batch, model=kind, mode=mode,
                                   task="train" if train else "infer")
                        try:
                            model = build(kind, size, res, args.quick).to(device)
                            if mode != "eager":
                                torch._dynamo.reset()  # fresh compile caches: no recompile limits across runs
                                kw = dict(mode="reduce-overhead") if mode == "cudagraphs" else {}
                                # ViL: block-wise compilation, one compile for all blocks.
                                model = (model.compile_blocks(**kw) if hasattr(model, "compile_blocks")
                                         else torch.compile(model, **kw))
                            ips, mem = measure(model, batch, res, train, device, args.steps, args.warmup,
                                               args.min_seconds, cudagraphs=mode == "cudagraphs")
                            row.update(img_s=ips, peak_gib=mem)
                        except torch.cuda.OutOfMemoryError:
                            row.update(img_s=float("nan"), peak_gib=float("nan"), note="OOM")
                        finally:
                            model = None
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        rows.append(row)
                        print(f"  {size:5s} {res:5d} bs{batch:<4d} {kind:8s} {mode:10s} {row['task']:5s} "
                              f"{row['img_s']:10.1f} img/s  {row['peak_gib']:6.2f} GiB", flush=True)
    return rows


def best(rows, **match) -> dict | None:
    """The fastest row (over the modes) matching the given fields."""
    cands = [r for r in rows if all(r[k] == v for k, v in match.items()) and not math.isnan(r["img_s"])]
    return max(cands, key=lambda r: r["img_s"]) if cands else None


def summarize(rows) -> list[dict]:
    table = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for res in dict.fromkeys(r["res"] for r in rows if r["size"] == size):
            for task in ("train", "infer"):
                v = best(rows, size=size, res=res, task=task, model="vil")
                d = best(rows, size=size, res=res, task=task, model="deit")
                a = best(rows, size=size, res=res, task=task, model="authors")
                q = best(rows, size=size, res=res, task=task, model="vil-quad")
                ratio = lambda p, q: p["img_s"] / q["img_s"] if p and q else float("nan")  # noqa: E731
                table.append(dict(
                    size=size, res=res, task=task,
                    vil_img_s=v["img_s"] if v else float("nan"), vil_mode=v["mode"] if v else "-",
                    deit_img_s=d["img_s"] if d else float("nan"), deit_mode=d["mode"] if d else "-",
                    authors_img_s=a["img_s"] if a else float("nan"),
                    vil_over_deit=ratio(v, d), vil_over_authors=ratio(v, a),
                    quad_over_bi=ratio(q, v),
                    vil_peak_gib=v["peak_gib"] if v else float("nan"), deit_peak_gib=d["peak_gib"] if d else float("nan"),
                ))
    return table


def print_table(table):
    head = (f"{'size':5s} {'res':>5s} {'task':5s} {'ViL img/s':>10s} {'DeiT img/s':>10s} {'ViL/DeiT':>8s} "
            f"{'authors':>9s} {'ViL/auth':>8s} {'quad/bi':>7s} {'ViL GiB':>8s} {'DeiT GiB':>8s}")
    print(head)
    print("-" * len(head))

    def cell(value, width, spec, suffix=""):  # a kind left out of the run shows as "-", not "nan"
        text = "-" if math.isnan(value) else f"{value:{spec}}{suffix}"
        return f"{text:>{width}s}"

    for r in table:
        print(f"{r['size']:5s} {r['res']:5d} {r['task']:5s} {cell(r['vil_img_s'], 10, '.1f')} "
              f"{cell(r['deit_img_s'], 10, '.1f')} {cell(r['vil_over_deit'], 8, '.2f', 'x')} "
              f"{cell(r['authors_img_s'], 9, '.1f')} {cell(r['vil_over_authors'], 8, '.2f', 'x')} "
              f"{cell(r['quad_over_bi'], 7, '.2f', 'x')} {cell(r['vil_peak_gib'], 8, '.2f')} "
              f"{cell(r['deit_peak_gib'], 8, '.2f')}")


def write_outputs(rows, table, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for name, data in (("benchmark_runs.csv", rows), ("benchmark.csv", table)):
        keys = list(dict.fromkeys(k for r in data for k in r))
        with open(os.path.join(out_dir, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(data)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task in zip(axes, ("train", "infer")):
        for size in dict.fromkeys(r["size"] for r in table):
            sel = [r for r in table if r["size"] == size and r["task"] == task]
            res = [r["res"] for r in sel]
            for key, style in (("vil_img_s", "-o"), ("deit_img_s", "--s"), ("authors_img_s", ":^")):
                ax.plot(res, [r[key] for r in sel], style, label=f"{key.split('_')[0]}-{size}")
        ax.set(xlabel="resolution", ylabel="images / s", yscale="log", title=task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "benchmark.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--res", nargs="+", type=int, default=[224, 384, 512, 768, 1024])
    p.add_argument("--kinds", nargs="+", default=["vil", "deit", "authors"],
                   choices=["vil", "vil-quad", "deit", "authors"], help="vil-quad: ViL with quad-directional traversal")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "cudagraphs"], choices=MODES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=2.0, help="time each setting for at least this long")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, for a smoke test")
    p.add_argument("--out", default="runs/benchmark")
    args = p.parse_args(argv)
    if args.quick:  # every size builds the same tiny model here: one size, one resolution
        args.sizes, args.res = args.sizes[:1], [r for r in args.res if r <= 64][:1] or [32]
        args.steps, args.warmup, args.min_seconds = 1, 1, 0.0
        args.modes = [m for m in args.modes if m == "eager"] or ["eager"]
        torch.set_num_threads(1)  # tiny CPU ops: more threads only contend for the cores
        print("quick: a smoke run of the script with tiny models on the CPU; the numbers measure nothing")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu"
    print(f"device: {dev}, torch {torch.__version__}")
    rows = run(args)
    table = summarize(rows)
    print()
    print_table(table)
    write_outputs(rows, table, args.out)
    return table


if __name__ == "__main__":
    main()
