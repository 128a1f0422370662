"""Segment a folder of images with a trained ADE20K run: ``vil segment predict``.

    vil segment predict --checkpoint runs/ade20k/version_0/checkpoints/best.ckpt --input photos/ --out masks/

Each image is resized as in evaluation (to fit 2048x512, keeping its aspect ratio), segmented by sliding
512 windows (any image size), optionally at several scales with flips, and written at its original size:

    OUT/color/NAME.png    the classes in ADE20K's palette (a palette PNG)
    OUT/labels/NAME.png   the raw labels in the dataset's own format: class c as c + 1 (1..150)

Files are written atomically; images whose two outputs exist are skipped, so a killed run continues where it
stopped. Unreadable images are reported and skipped (exit code 1 when there were any).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image

from tasks.files import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_module(path: str, device: str = "cpu"):
    """The ``SegmentationModule`` of a Lightning checkpoint of ``vil fit`` (EMA weights when it has them)."""
    from tasks.segmentation.module import SegmentationModule
    from vil.checkpoint import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of a segmentation run (no state_dict / "
                              f"hyper_parameters)")
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    class_path = ckpt["hyper_parameters"].get("_class_path", "")
    if class_path and not class_path.endswith("SegmentationModule"):
        raise CheckpointError(f"{path} is a checkpoint of {class_path}, not of a segmentation run")
    # The run's starting weights are in the state dict; the EMA copy is not rebuilt (its weights are used).
    hp.update(checkpoint=None, ema_decay=None, compile="none")
    module = SegmentationModule(**hp)
    sd = ckpt["state_dict"]
    if any(k.startswith("ema.module.") for k in sd):
        sd = {k[len("ema.module."):]: v for k, v in sd.items() if k.startswith("ema.module.")}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the run's model: {len(missing)} missing keys "
                              f"({', '.join(missing[:5])}), {len(unexpected)} unexpected ({', '.join(unexpected[:5])})")
    return module.to(device).eval()


def ade20k_palette() -> list[int]:
    """The flat RGB palette of a 'P' PNG: ADE20K's 150 class colors (mmseg's), black for the rest."""
    from mmseg.datasets import ADE20KDataset

    colors = [c for rgb in ADE20KDataset.METAINFO["palette"] for c in rgb]
    return colors + [0] * (768 - len(colors))


def _write_png(image: Image.Image, path: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp)


def predict_folder(module, input_dir: str, out_dir: str, scale=(2048, 512), scales=(1.0,), flip: bool = False,
                   overwrite: bool = False) -> tuple[int, list[str]]:
    """Segment every image of ``input_dir``; returns (images written, unreadable files)."""
    from mmcv.transforms import Compose
    from mmengine.registry import DefaultScope
    from tqdm import tqdm

    from tasks.segmentation.data import BadSampleError, test_pipeline

    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"--input {input_dir} is not a folder")
    names = sorted(f for f in os.listdir(input_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {input_dir}")
    color_dir, label_dir = os.path.join(out_dir, "color"), os.path.join(out_dir, "labels")
    with DefaultScope.overwrite_default_scope("mmseg"):
        pipeline = Compose(test_pipeline(scale, with_mask=False))
    palette = ade20k_palette()
    written, failed = 0, []
    for name in tqdm(names, desc="segment", unit="img"):
        stem = os.path.splitext(name)[0]
        color_path, label_path = os.path.join(color_dir, f"{stem}.png"), os.path.join(label_dir, f"{stem}.png")
        if not overwrite and os.path.isfile(color_path) and os.path.isfile(label_path):
            continue
        try:
            sample = pipeline(dict(img_path=os.path.join(input_dir, name)))
        except BadSampleError as e:
            warnings.warn(f"skipped: {e}")
            failed.append(name)
            continue
        batch = dict(inputs=[sample["inputs"]], data_samples=[sample["data_samples"]])
        data = module.preprocess(batch, module.segmentor, training=False)
        probs = module.predict_probabilities(data["inputs"], [data["data_samples"][0].metainfo], scales, flip,
                                             module.segmentor)
        labels = probs[0].argmax(0).to(torch.uint8).cpu().numpy()
        color = Image.fromarray(labels, mode="P")
        color.putpalette(palette)
        _write_png(color, color_path)
        _write_png(Image.fromarray((labels.astype(np.int64) + 1).astype(np.uint8)), label_path)
        written += 1
    return written, failed


def main(argv: list[str] | None = None) -> int:
    """Segment a folder of images with a trained ADE20K checkpoint (palette and raw label PNGs)."""
    parser = argparse.ArgumentParser(prog="vil segment", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("predict", help="segment the images of a folder",
                       description="Segment the images of --input into --out/color and --out/labels.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `vil fit` with a segmentation config")
    p.add_argument("--input", required=True, help="folder of images (.jpg, .png, ...)")
    p.add_argument("--out", required=True, help="output folder (color/ and labels/ are created in it)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="test scales of the resized image (the paper's multi-scale: 0.75 1 1.25 1.5 1.75)")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped views")
    p.add_argument("--resize", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="fit each image into this size first, keeping its aspect ratio (default 2048 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    args = parser.parse_args(argv)

    import tasks.segmentation  # noqa: F401  (the mmcv.ops stand-in, before mmseg)
    from vil.checkpoint import CheckpointError

    if any(s <= 0 for s in args.scales):
        parser.error(f"--scales must be positive, got {args.scales}")
    try:
        module = load_module(args.checkpoint, args.device)
        written, failed = predict_folder(module, args.input, args.out, tuple(args.resize), tuple(args.scales),
                                         args.flip, args.overwrite)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"vil segment: error: {e}", file=sys.stderr)
        return 2
    print(f"vil segment: wrote {written} images to {args.out}/color and {args.out}/labels"
          + (f"; {len(failed)} unreadable, skipped: {', '.join(failed[:10])}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
