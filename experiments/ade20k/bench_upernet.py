"""Training speed of the ADE20K UperNet (paper Table 2 / Table 12 setting): ViL-T against the same UperNet on
timm's DeiT-T, measured in one run, with the projected time of the 160k-iteration schedule.

    .venv/bin/python experiments/ade20k/bench_upernet.py            # CUDA: 512x512, batch 16, fp16 autocast
    .venv/bin/python experiments/ade20k/bench_upernet.py --quick    # CPU smoke run of the script (tiny models)

Each step is the training step of ``tasks.segmentation.module.SegmentationModule`` (mmseg's EncoderDecoder
loss with the auxiliary head, backward, fused AdamW over the layer-decay groups, GradScaler for fp16), with
the module's compile choice (``auto``: compiled block pairs with CUDA graphs on CUDA). Inputs are synthetic
normalized crops and random labels: the data pipeline is not timed.
"""
from __future__ import annotations

import argparse
import time

import torch

import tasks.segmentation  # noqa: F401  (the mmcv.ops stand-in, before mmseg)
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from tasks.segmentation.module import SegmentationModule

# name -> module arguments (paper Table 12: heads 192 wide for the tiny models; taps after pairs / blocks
# 4, 6, 8, 12)
REAL = {
    "ViL-T": dict(model="vil2_tiny", out_indices=(7, 11, 15, 23), channels=192),
    "DeiT-T": dict(model="deit_tiny_patch16_224", out_indices=(3, 5, 7, 11), channels=192),
}
QUICK = {
    "ViL-T": dict(model="vil2_nano", out_indices=(0, 1, 2, 3), channels=16,
                  model_kwargs=dict(dim=32, mlstm_form="chunkwise")),
    "DeiT-T": dict(model="deit_tiny_patch16_224", out_indices=(0, 1, 2, 3), channels=16,
                   model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)),
}


def measure(name: str, kwargs: dict, crop: int, batch: int, steps: int, warmup: int, device: torch.device,
            amp_dtype: torch.dtype | None, compile_choice: str) -> float:
    torch.manual_seed(0)
    module = SegmentationModule(crop_size=crop, slide_stride=min(341, crop), compile=compile_choice,
                                **{**kwargs, "model_kwargs": {**kwargs.get("model_kwargs", {}), "img_size": crop}})
    module = module.to(device).train()
    module.configure_model()  # the compile choice, resolved for the module's device
    groups = module.param_groups(lr=5e-4 * batch / 16)
    optimizer = torch.optim.AdamW(groups, lr=5e-4, fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    x = torch.randn(batch, 3, crop, crop, device=device)
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 150, (1, crop, crop), device=device)))
               for _ in range(batch)]
    for s in samples:
        s.set_metainfo(dict(img_shape=(crop, crop), ori_shape=(crop, crop), pad_shape=(crop, crop)))

    def step():
        module._mark_cudagraph_step()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = module.segmentor.parse_losses(module.segmentor.loss(x, samples))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)  # waits for the last step
    seconds = time.perf_counter() - start
    its = steps / seconds
    memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    params = sum(p.numel() for p in module.parameters()) / 1e6
    print(f"{name:7s} UperNet: {its:6.2f} it/s ({batch * its:7.1f} img/s), {params:.1f}M parameters, "
          f"warm-up {compile_s:.0f} s (compile), loss {float(loss):.3f}{memory}")
    return its


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny models (measures nothing)")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation, CUDA graph capture)")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="autocast dtype (paper Table 12: mixed float16)")
    parser.add_argument("--compile", default="auto", help="SegmentationModule compile choice")
    parser.add_argument("--iterations", type=int, default=160_000, help="schedule length for the projection")
    args = parser.parse_args(argv)
    if args.quick:
        args.crop, args.batch, args.steps, args.warmup, args.precision = 64, 2, 2, 1, "fp32"
        device = torch.device("cpu")
        torch.set_num_threads(1)
        models = QUICK
        print("quick CPU smoke run: tiny models, the numbers measure nothing")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --quick for a CPU smoke run)")
        device = torch.device("cuda")
        models = REAL
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.precision]
    print(f"{args.crop}x{args.crop}, batch {args.batch}, {args.precision}, compile {args.compile}, "
          f"{args.steps} timed steps after {args.warmup}")
    rates = {name: measure(name, kwargs, args.crop, args.batch, args.steps, args.warmup, device, amp, args.compile)
             for name, kwargs in models.items()}
    vil_rate, deit_rate = rates["ViL-T"], rates["DeiT-T"]
    print(f"ViL-T / DeiT-T training speed: {vil_rate / deit_rate:.2f}x")
    for name, rate in rates.items():
        print(f"{name}: {args.iterations:,} iterations in {args.iterations / rate / 3600:.1f} h at this speed")


if __name__ == "__main__":
    main()
