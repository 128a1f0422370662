"""VTAB-1K sweep throughput: a mini sweep through `vil vtab` on synthetic tasks of the real sizes (800 / 200 /
1000 training-validation images, 224x224 after the resize, the recipe's 50 epochs and batch 64), timed per
setting of --runs-per-gpu, against the bare training step of the same model measured in the same process.

    python experiments/vtab/bench_sweep.py                               # GPU: ViL-T, 3 tasks x 2 lrs x 2 seeds
    python experiments/vtab/bench_sweep.py --runs-per-gpu 1 3 --epochs 50
    python experiments/vtab/bench_sweep.py --quick                      # CPU smoke run (seconds; no real numbers)

Prints per setting: wall time, runs/hour, GPU utilization (nvidia-smi, sampled every second), training img/s of
the sweep against the bare step (ratio), and the projected hours of the full 570-run sweep (19 tasks x (25 + 5)
runs, the real test-set sizes): the measured wall time scaled by the work (training image-epochs, and test images
weighted by the measured cost of an evaluated image relative to a trained one). The model starts from random
weights unless --checkpoint is given (throughput does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
import vil  # noqa: E402
from tasks.vtab import sweep  # noqa: E402
from tasks.vtab.report import load_records  # noqa: E402
from tasks.vtab.tasks import TASKS  # noqa: E402

BENCH_TASKS = ("cifar", "eurosat", "kitti")  # 100, 10 and 4 classes: heads of different sizes
QUICK = dict(model_kwargs={"dim": 32, "depth": 1, "patch_size": 4}, img_size=16, native=16,
             counts={"train800": 16, "val200": 8, "train800val200": 24, "test": 8}, epochs=1, batch=8)
FULL_COUNTS = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 1000}


def make_tasks(root: str, counts: dict[str, int], native: int, seed: int = 0) -> None:
    """Folder-format tasks whose label sets the image's mean colour (learnable, so accuracy is a sanity check)."""
    rng = np.random.default_rng(seed)
    for name in BENCH_TASKS:
        classes = TASKS[name].num_classes
        for split, n in counts.items():
            os.makedirs(os.path.join(root, name, "images", split), exist_ok=True)
            lines = []
            for i in range(n):
                label = int(rng.integers(classes))
                colour = rng.uniform(0, 255, 3) * 0.2 + 204 * label / classes
                img = np.clip(rng.normal(colour, 25, (native, native, 3)), 0, 255).astype(np.uint8)
                rel = f"images/{split}/{i:06d}.png"
                Image.fromarray(img).save(os.path.join(root, name, rel))
                lines.append(f"{rel} {label}\n")
            with open(os.path.join(root, name, f"{split}.txt"), "w") as f:
                f.writelines(lines)


def bare_step_img_s(model_name: str, model_kwargs: dict, img_size: int, batch: int, cuda: bool, steps: int) -> float:
    """Training img/s of the model alone: compiled blocks with CUDA graphs, bf16 autocast, fused AdamW."""
    device = "cuda" if cuda else "cpu"
    model = vil.create_model(model_name, num_classes=100, img_size=img_size, **model_kwargs).to(device)
    if cuda:
        model.compile_blocks(mode="reduce-overhead")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=cuda or None)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step():
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(max(steps // 4, 1) if cuda else 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    img_s = steps * batch / (time.perf_counter() - start)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return img_s


class GpuUtilization(threading.Thread):
    """Samples nvidia-smi's utilization.gpu (%) of every GPU once a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            try:
                text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout
                values = [float(v) for v in text.split()]
                if values:
                    self.samples.append(statistics.fmean(values))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def full_sweep_work(eval_weight: float, epochs: int) -> float:
    """Work of the full sweep in training image-epochs: per task 25 runs 800 -> 200, 5 runs 1000 -> test."""
    work = 0.0
    for task in TASKS.values():
        work += 25 * (800 * epochs + eval_weight * 200) + 5 * (1000 * epochs + eval_weight * task.test_size)
    return work


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, tiny images, 1 epoch")
    p.add_argument("--model", default="vil2_tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs-per-gpu", type=int, nargs="+", default=[1, 3])
    p.add_argument("--bare-steps", type=int, default=100)
    p.add_argument("--out", default=None, help="keep the synthetic data and the sweeps here (default: a temp dir)")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    if args.quick:
        model_kwargs, img_size, native, counts = QUICK["model_kwargs"], QUICK["img_size"], QUICK["native"], QUICK["counts"]
        model, epochs, batch, bare_steps = "vil2_nano", QUICK["epochs"], QUICK["batch"], 3
        args.runs_per_gpu = args.runs_per_gpu[:1]  # one slot on the CPU
    else:
        model_kwargs, img_size, native, counts = {}, 224, 64, FULL_COUNTS
        model, epochs, batch, bare_steps = args.model, args.epochs, 64, args.bare_steps
    base = args.out or tempfile.mkdtemp(prefix="vtab-bench-")
    data = os.path.join(base, "data")
    if not os.path.isdir(data):
        make_tasks(data, counts, native)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = os.path.join(base, f"{model}-random.pt")
        torch.manual_seed(0)
        torch.save(vil.create_model(model, img_size=img_size, **model_kwargs).state_dict(), checkpoint)

    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {device}; model {model} at {img_size}, {epochs} epochs, batch {batch}; tasks {', '.join(BENCH_TASKS)}"
          f" x lrs {args.lrs} x seeds {args.seeds}" + ("  [--quick: smoke run, the numbers measure nothing]" if args.quick else ""))
    bare = bare_step_img_s(model, model_kwargs, img_size, batch, cuda, bare_steps)
    print(f"bare training step (compiled blocks + CUDA graphs, bf16, fused AdamW): {bare:,.0f} img/s")

    rows = []
    for per_gpu in args.runs_per_gpu:
        out = os.path.join(base, f"sweep-rpg{per_gpu}")
        shutil.rmtree(out, ignore_errors=True)
        argv = ["--model", model, "--model-kwargs", json.dumps(model_kwargs), "--img-size", str(img_size),
                "--checkpoint", checkpoint, "--data-root", data, "--out", out, "--tasks", *BENCH_TASKS,
                "--lrs", *map(str, args.lrs), "--seeds", *map(str, args.seeds), "--epochs", str(epochs),
                "--batch-size", str(batch), "--runs-per-gpu", str(per_gpu), "--progress", "false"]
        if not cuda:
            argv += ["--accelerator", "cpu"]  # the runs go one by one in this process
        util = GpuUtilization()
        if cuda:
            util.start()
        start = time.time()
        rc = sweep.main(argv)
        wall = time.time() - start
        util.stop.set()
        recs = [r for r in load_records(out) if r["status"] == "ok"]
        if rc != 0 or not recs:
            print(f"runs-per-gpu {per_gpu}: the sweep failed (exit code {rc})")
            rows.append(None)
            continue
        gpus = max(torch.cuda.device_count(), 1) if cuda else 1
        # cost of one evaluated image in training image-epochs, from the runs' own timings
        train_cost = [r["train_seconds"] / (r["num_train"] * epochs) for r in recs if r["train_seconds"] > 0]
        eval_cost = [r["eval_seconds"] / r["num_eval"] for r in recs if r["eval_seconds"] > 0]
        weight = statistics.median(eval_cost) / statistics.median(train_cost) if train_cost and eval_cost else 0.0
        work = sum(r["num_train"] * epochs + weight * r["num_eval"] for r in recs)
        finished = sorted(r["finished_at"] for r in recs)
        # steady state: from the first finished run to the last (leaves out start-up and compilation)
        steady = [r for r in recs if r["finished_at"] > finished[0]]
        steady_wall = finished[-1] - finished[0]
        steady_work = sum(r["num_train"] * epochs + weight * r["num_eval"] for r in steady)
        rate = steady_work / steady_wall if steady_wall > 0 and steady else work / wall
        projected = full_sweep_work(weight, 50 if not args.quick else epochs) / rate / 3600 * gpus
        train_img_s = sum(r["num_train"] * epochs for r in steady) / steady_wall if steady_wall > 0 else float("nan")
        row = dict(per_gpu=per_gpu, runs=len(recs), wall=wall, runs_h=len(recs) / wall * 3600,
                   run_s=statistics.fmean(r["seconds"] for r in recs), util=util.mean(), train_img_s=train_img_s,
                   ratio=train_img_s / gpus / bare, projected=projected, acc=statistics.fmean(r["acc"] for r in recs))
        rows.append(row)
        util_text = f"{row['util']:.0f}%" if row["util"] is not None else "n/a"
        print(f"runs-per-gpu {per_gpu}: {row['runs']} runs in {wall:.0f} s ({row['runs_h']:.0f} runs/h, mean run "
              f"{row['run_s']:.1f} s), GPU util {util_text}, sweep training {train_img_s:,.0f} img/s = "
              f"{row['ratio']:.2f}x the bare step per GPU; eval image = {weight:.2f} train image-epochs; projected full "
              f"570-run sweep: {projected:.2f} GPU-hours ({projected / gpus:.2f} h on {gpus} GPU(s)); mean acc "
              f"{row['acc']:.3f}")
    done = [r for r in rows if r]
    if done:
        best = min(done, key=lambda r: r["projected"])
        print(f"\nbest: runs-per-gpu {best['per_gpu']}: {best['projected']:.2f} GPU-hours for the full ViL sweep "
              f"({'within' if best['projected'] <= 3 else 'over'} the 3-hour goal on one H200)")
    if not args.out:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if len(done) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
