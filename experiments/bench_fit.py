"""Training throughput of a Lightning fit against the bare training step of ``benchmark.py``, in one run.

The fit is what ``vil fit`` runs (``tasks.classification.ClassificationModule`` with its defaults:
``mlstm_form="auto"``, ``compile="auto"``, fused AdamW, the warmup-cosine schedule), with bf16-mixed
precision and gradient clipping at 1.0 as in the ImageNet recipe, on synthetic data already on the GPU,
so that it measures the training loop and not the input pipeline. The bare step is
``benchmark.measure`` on the same model with CUDA graphs (``compile_blocks(mode="reduce-overhead")``).

    .venv/bin/python experiments/bench_fit.py                       # ViL-T at 224, batch 256
    .venv/bin/python experiments/bench_fit.py --precision bf16-mixed 16-mixed --steps 30
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import lightning as L  # noqa: E402

import vil  # noqa: E402
from experiments.benchmark import measure  # noqa: E402
from tasks.classification import ClassificationModule  # noqa: E402


class SyntheticBatches(torch.utils.data.IterableDataset):
    """The same batch of random images and labels, ``steps`` times, created on the training device."""

    def __init__(self, batch: int, res: int, steps: int, num_classes: int, device: str):
        self.x = torch.randn(batch, 3, res, res, device=device)
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.steps = steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


class StepTimer(L.Callback):
    """Images per second over the steps after ``warmup`` (compilation and graph capture happen before)."""

    def __init__(self, warmup: int, batch: int):
        self.warmup, self.batch, self.start, self.img_s = warmup, batch, None, float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        steps = trainer.global_step - self.warmup
        self.img_s = self.batch * steps / (time.perf_counter() - self.start)


def fit_img_s(args, precision: str) -> float:
    module = ClassificationModule(model=args.model, num_classes=1000, lr=1e-3, warmup_steps=10,
                                  model_kwargs=dict(img_size=args.res))
    timer = StepTimer(args.warmup, args.batch)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, gradient_clip_val=args.clip,
                        max_steps=args.warmup + args.steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    data = torch.utils.data.DataLoader(SyntheticBatches(args.batch, args.res, args.warmup + args.steps, 1000, "cuda"),
                                       batch_size=None)
    trainer.fit(module, train_dataloaders=data)
    print(f"fit: compile={module.compiled}, optimizer fused={trainer.optimizers[0].defaults.get('fused')}, "
          f"precision={precision}, gradient_clip_val={args.clip}")
    return timer.img_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vil2_tiny")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--precision", nargs="+", default=["bf16-mixed"], choices=["bf16-mixed", "16-mixed"])
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fit.py measures GPU training throughput and needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} at {args.res}, "
          f"batch {args.batch}")
    model = vil.create_model(args.model, img_size=args.res).cuda().compile_blocks(mode="reduce-overhead")
    bare, _ = measure(model, args.batch, args.res, True, torch.device("cuda"), steps=10, warmup=args.warmup,
                      min_seconds=3.0, cudagraphs=True)
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    fits = {}
    for precision in args.precision:
        fits[precision] = fit_img_s(args, precision)
        torch._dynamo.reset()
    print(f"bare training step (benchmark.py, bf16 autocast, cudagraphs): {bare:8.1f} img/s")
    for precision, fit in fits.items():
        print(f"Lightning fit ({precision}, clip {args.clip}): {fit:8.1f} img/s = {fit / bare:.2f}x the bare step")
    return bare, fits


if __name__ == "__main__":
    main()
