"""Does the ImageNet input pipeline keep up with the model? Generates JPEGs of ImageNet's typical size (500x375)
into an ImageFolder tree, then measures, in one run:

  loader   img/s of the training loader alone: CPU decoding (PIL) with N workers, and GPU decoding
           (decode_jpeg on the GPU in batches, augmentation there) when CUDA is present
  gpu path where GPU decoding spends its time, on one batch already read into memory: the batched decode
           alone, the batched training augmentation alone (decode excluded), and for comparison torchvision's
           v2 training transform applied image by image on the same decoded images
  model    img/s of ViL-T's training step alone (synthetic batch, bf16 autocast, fused AdamW, compiled blocks with
           CUDA graphs: the module's fast path)
  fit      img/s of a Lightning fit on the generated tree (bf16-mixed), per decode path (CPU decoding at each
           worker count given)

and prints each with its ratio to the model's img/s (>= 1.0: the input keeps up).

    python experiments/imagenet/bench_input.py                        # CUDA: ViL-T at 192 and 224
    python experiments/imagenet/bench_input.py --res 224 --workers 8 16
    python experiments/imagenet/bench_input.py --quick                # CPU smoke run: tiny model, numbers mean nothing
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))


def _write_class(args):
    folder, n, size, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    w, h = size
    for i in range(n):
        path = os.path.join(folder, f"img_{i:05d}.JPEG")
        if os.path.exists(path):
            continue
        # smooth colour fields plus noise: JPEG sizes near ImageNet's (about 110 KB at 500x375)
        low = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)


TREE_CLASSES = 10


def make_tree(root: str, images: int, classes: int = TREE_CLASSES, size=(500, 375)) -> str:
    jobs = [(os.path.join(root, split, f"n{c:08d}"), max(images // classes, 1) if split == "train" else 2, size, c)
            for split in ("train", "val") for c in range(classes)]
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 16)) as pool:
        list(pool.map(_write_class, jobs))
    return root


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_loader(root, res, batch, workers, decode, device, seconds, quick) -> float:
    from tasks.imagenet.data import ImageNetDataModule

    dm = ImageNetDataModule(root, batch_size=batch, num_workers=workers, img_size=res, decode=decode,
                            persistent_workers=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, start, warm = 0, None, 2 if not quick else 1
    for i, (x, y, _) in enumerate(loader):
        if decode == "gpu":
            x, y = dm.gpu_batch(x, y, device, training=True)
        _sync(device)
        if i == warm:
            start, n = time.perf_counter(), 0
        elif start is not None:
            n += len(y)
            if time.perf_counter() - start > seconds:
                break
    if start is None or n == 0:
        return float("nan")
    return n / (time.perf_counter() - start)


def _timed(fn, device, reps) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def bench_gpu_path(root, res, batch, device, reps) -> dict[str, float]:
    """img/s of the GPU decoding path's parts on one batch of the tree's files, already read into memory."""
    from tasks.imagenet.data import ImageNetDataModule, decode_images, to_normalized, train_augment
    from tasks.imagenet.gpu_augment import BatchedTrainAugment

    dm = ImageNetDataModule(root, batch_size=batch, img_size=res, decode="gpu")
    dm.setup("fit")
    datas = []
    for path, _ in dm.samples["train"][:batch]:
        with open(path, "rb") as f:
            datas.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    images = decode_images(datas, device)
    batched, per_image = BatchedTrainAugment(res), train_augment(res)
    normalize = to_normalized()
    times = {
        "decode only": _timed(lambda: decode_images(datas, device), device, reps),
        "augment, batched": _timed(lambda: normalize(batched(images)), device, reps),
        "augment, per-image v2": _timed(lambda: normalize(torch.stack([per_image(i) for i in images])), device,
                                        reps),
    }
    return {what: len(datas) / t for what, t in times.items()}


def _module(model, res, quick, compile_choice, num_classes=1000):
    from tasks.imagenet.module import ImageNetClassificationModule

    kwargs = {"img_size": res}
    if quick:
        kwargs.update(dim=32, depth=1, patch_size=4, mlstm_form="chunkwise")
    return ImageNetClassificationModule(model=model, num_classes=num_classes if not quick else 10, mixup_alpha=0.8,
                                        cutmix_alpha=1.0, compile=compile_choice, model_kwargs=kwargs)


def bench_model(model, res, batch, device, steps, quick) -> float:
    """The bare training step: forward, soft-target loss, backward, fused AdamW, under bf16 autocast."""
    module = _module(model, res, quick, "auto").to(device)
    module.configure_model()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=device.type == "cuda")
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, module.hparams.num_classes, (batch,), device=device)
    dtype = torch.bfloat16
    warm = 3 if quick else 15
    for i in range(warm + steps):
        if i == warm:
            _sync(device)
            start = time.perf_counter()
        module._mark_cudagraph_step()
        with torch.autocast(device.type, dtype=dtype):
            xm, soft = module.mixup(x, y)
            loss = module.soft_target_loss(module(xm), soft)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


class _Throughput:
    def __init__(self, warm):
        import lightning as L

        class Callback(L.Callback):
            def __init__(cb):
                cb.start, cb.images = None, 0

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == warm:
                    _sync(pl_module.device)
                    cb.start, cb.images = time.perf_counter(), 0
                elif cb.start is not None:
                    cb.images += len(batch[1])

            def on_train_end(cb, trainer, pl_module):
                _sync(pl_module.device)
                cb.elapsed = time.perf_counter() - cb.start if cb.start else float("nan")

        self.callback = Callback()

    @property
    def value(self):
        cb = self.callback
        return cb.images / cb.elapsed if cb.start else float("nan")


def bench_fit(model, root, res, batch, workers, decode, steps, quick, device) -> float:
    import lightning as L

    from tasks.imagenet.data import ImageNetDataModule

    warm = 3 if quick else 20
    meter = _Throughput(warm)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed", max_steps=warm + steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[meter.callback],
                        log_every_n_steps=50)
    dm = ImageNetDataModule(root, batch_size=batch, num_workers=workers, img_size=res, decode=decode)
    trainer.fit(_module(model, res, quick, "auto", num_classes=TREE_CLASSES), datamodule=dm)
    return meter.value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/bench_input/tree", help="where the generated JPEG tree goes (kept)")
    p.add_argument("--images", type=int, default=20000, help="training images to generate")
    p.add_argument("--model", default="vil2_tiny")
    p.add_argument("--res", type=int, nargs="+", default=[192, 224])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 1])
    p.add_argument("--seconds", type=float, default=20.0, help="loader measuring time per setting")
    p.add_argument("--steps", type=int, default=60, help="measured steps of the model and fit benchmarks")
    p.add_argument("--quick", action="store_true", help="CPU smoke run with a tiny model; numbers mean nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.res, args.batch, args.workers = 64, [32], 8, [2]
        args.seconds, args.steps, args.root = 1.0, 3, args.root.replace("tree", "tree_quick")
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {os.cpu_count()} CPU cores"
          f"{' (quick smoke run: the numbers measure nothing)' if args.quick else ''}")
    start = time.time()
    make_tree(args.root, args.images, size=(500, 375))
    print(f"JPEG tree: {args.images} training images of 500x375 in {args.root} ({time.time() - start:.0f} s)")
    decodes = ["cpu"] + (["gpu"] if device.type == "cuda" else [])
    rows = []
    for res in args.res:
        model_ips = bench_model(args.model, res, args.batch, device, args.steps, args.quick)
        rows.append((res, "model (synthetic batch)", "-", model_ips))
        print(f"{res}: model {model_ips:.0f} img/s", flush=True)
        for decode in decodes:
            for workers in args.workers:
                rows.append((res, f"loader, {decode} decode", workers,
                             bench_loader(args.root, res, args.batch, workers, decode, device, args.seconds,
                                          args.quick)))
                print(f"{res}: {rows[-1][1]}, {workers} workers: {rows[-1][3]:.0f} img/s", flush=True)
        for what, ips in bench_gpu_path(args.root, res, args.batch, device, 2 if args.quick else 10).items():
            rows.append((res, f"gpu path: {what}", "-", ips))
            print(f"{res}: {rows[-1][1]} ({device.type}, one batch in memory): {ips:.0f} img/s", flush=True)
        # CPU decoding fits at every worker count: fewer workers than cores leave the training process room
        # (it shares the cores with them); GPU decoding's workers only read files.
        for decode, workers in [("cpu", w) for w in args.workers] + [("gpu", args.workers[-1])] * ("gpu" in decodes):
            rows.append((res, f"fit, {decode} decode", workers,
                         bench_fit(args.model, args.root, res, args.batch, workers, decode, args.steps,
                                   args.quick, device)))
            print(f"{res}: {rows[-1][1]}, {workers} workers: {rows[-1][3]:.0f} img/s", flush=True)
        print(f"\n{args.model} @ {res}, batch {args.batch}, bf16")
        print(f"{'what':<32} {'workers':>7} {'img/s':>9} {'/ model':>8}")
        for r, what, workers, ips in rows:
            if r == res:
                print(f"{what:<32} {workers!s:>7} {ips:>9.0f} {ips / model_ips:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
