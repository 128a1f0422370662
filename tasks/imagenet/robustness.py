"""Robustness and OOD evaluation of an ImageNet-1K classifier, the paper's Table 9: ImageNet-C (mean corruption
error against AlexNet), ImageNet-A and ImageNet-R (200-class subsets: the 1000 logits restricted to the
subset's classes), ImageNet-Sketch and the ImageNet-1K val split (top-1).

    vil robustness --model vil2_tiny --checkpoint vil2_tiny16_e800_in1k.th --imagenet-c /data/ImageNet-C \\
        --imagenet-a /data/imagenet-a --imagenet-r /data/imagenet-r --imagenet-sketch /data/sketch \\
        --imagenet-val /data/imagenet/val --out runs/robustness/vil2_tiny

Each folder holds one folder per WordNet id (ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/``); a
folder's class is the wnid's index among the 1000 sorted ImageNet-1K wnids, so a variant with fewer classes
(A, R) or folders moved into a ``val/`` level (the ViL authors' layout) read the same. Every image goes through
the evaluation transform of the released weights (resize 224 bicubic, center crop 224, ImageNet mean/std);
the 224x224 ImageNet-C images pass it unchanged. The results land in ``<out>/results.json`` after every dataset
(written atomically; a rerun skips the datasets already there) and the table in ``<out>/table.md`` and
``<out>/table.csv``.

Facts (corruption names, AlexNet errors, the A/R subsets): ../shared/reference/imagenet-variants.md; the wnid
and subset lists are timm's (``timm/data/_info``), which that file checked against the datasets' own code.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from tasks.files import write_json_atomic, write_text_atomic

# The 15 corruptions of the standard mCE, in the usual order, with AlexNet's top-1 error (mean over severities
# 1-5) as the normaliser (Hendrycks & Dietterich 2019; AugMix's ALEXNET_ERR).
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
CORRUPTIONS = tuple(ALEXNET_ERR)
# The 4 hold-out corruptions: evaluated when present, reported apart, not part of the mCE.
EXTRA_CORRUPTIONS = {"speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248}
SEVERITIES = (1, 2, 3, 4, 5)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K wnids in sorted order: position = logit index."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def subset_indices(name: str) -> list[int]:
    """The 1000-class logit indices of ImageNet-A (``a``) or -R (``r``), 200 each, ascending."""
    from timm.data._info import __path__ as info_path  # noqa: N811

    with open(os.path.join(info_path[0], f"imagenet_{name}_indices.txt")) as f:
        return [int(line) for line in f if line.strip()]


def corruption_errors(errors: dict[str, Sequence[float]], alexnet: dict[str, float] = ALEXNET_ERR) -> dict[str, float]:
    """CE_c = mean over the severities of the model's top-1 error / AlexNet's (in %), per corruption given."""
    return {c: 100.0 * sum(e) / len(e) / alexnet[c] for c, e in errors.items() if c in alexnet}


def mean_corruption_error(errors: dict[str, Sequence[float]]) -> float:
    """mCE (%): the mean of CE_c over the 15 standard corruptions; ``errors[c]`` holds the top-1 errors of the
    five severities. A corruption or severity missing is an error (the mCE is defined over all of them)."""
    missing = [c for c in CORRUPTIONS if c not in errors]
    short = [c for c in CORRUPTIONS if c in errors and len(errors[c]) != len(SEVERITIES)]
    if missing or short:
        raise ValueError(f"mCE needs the 15 corruptions at 5 severities: missing {missing}, incomplete {short}")
    ces = corruption_errors({c: errors[c] for c in CORRUPTIONS})
    return sum(ces.values()) / len(ces)


class _RemappedFolder(torch.utils.data.Dataset):
    """The images of one ``<root>/<wnid>/`` tree, labelled with the wnids' ImageNet-1K indices."""

    def __init__(self, root: str, transform, wnids: list[str]):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        from tasks.imagenet.data import ImageFolderSplit, list_classes

        index = {w: i for i, w in enumerate(wnids)}
        classes = list_classes(root)
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(f"{root}: {len(unknown)} class folders are not ImageNet-1K wnids, e.g. {unknown[:3]}")
        samples = make_dataset(root, {c: index[c] for c in classes}, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise ValueError(f"{root} holds no images")
        self.split = ImageFolderSplit(samples, transform)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split[i]


def _variant_root(root: str) -> str:
    """A variant folder as distributed (``<root>/<wnid>``) or in the ViL authors' layout (``<root>/val/<wnid>``)."""
    val = os.path.join(root, "val")
    return val if os.path.isdir(val) else root


@torch.no_grad()
def top1_accuracy(model, dataset, batch_size: int, num_workers: int, device, subset: list[int] | None = None,
                  precision: str = "bf16") -> tuple[float, int]:
    """Top-1 accuracy (and the number of images) of ``model`` on ``dataset``; with ``subset``, over those logits
    only (the target is the position of its class in the subset)."""
    from tasks.imagenet.data import collate_skipping

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    lookup = None
    if subset is not None:
        lookup = torch.full((1000,), -1, dtype=torch.long, device=device)
        lookup[torch.tensor(subset, device=device)] = torch.arange(len(subset), device=device)
        subset_t = torch.tensor(subset, device=device)
    correct = total = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for x, y, _ in loader:
        if len(x) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        if subset is not None:
            logits, y = logits[:, subset_t], lookup[y]
            if (y < 0).any():
                raise ValueError("an image's class is not in the 200-class subset")
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1), total


def build_table(results: dict[str, dict]) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """The Table 9 row (metric, value) from the per-dataset results; the numbers as a dict."""
    numbers: dict[str, float] = {}
    errors: dict[str, list[float]] = {}
    for key, r in results.items():
        if key.startswith("imagenet_c/"):
            _, corruption, severity = key.split("/")
            errors.setdefault(corruption, []).append(1.0 - r["acc"])
    if errors:
        standard = {c: e for c, e in errors.items() if c in ALEXNET_ERR}
        try:
            numbers["IN-C mCE"] = mean_corruption_error(standard)
        except ValueError:
            pass
        for c, ce in corruption_errors(standard).items():
            numbers[f"IN-C CE {c}"] = ce
        for c, ce in corruption_errors(errors, EXTRA_CORRUPTIONS).items():
            numbers[f"IN-C CE {c} (extra)"] = ce
        numbers["IN-C mean top-1"] = 100.0 * sum(r["acc"] for k, r in results.items()
                                                 if k.startswith("imagenet_c/")) / sum(map(len, errors.values()))
    for key, label in (("imagenet_a", "IN-A top-1"), ("imagenet_r", "IN-R top-1"),
                       ("imagenet_sketch", "Sketch top-1"), ("imagenet_val", "Validation top-1")):
        if key in results:
            numbers[label] = 100.0 * results[key]["acc"]
    return [(k, f"{v:.2f}") for k, v in numbers.items()], numbers


def main(argv: list[str] | None = None) -> int:
    """Table 9: ImageNet-C mCE, ImageNet-A/-R (200-class subsets), ImageNet-Sketch and val top-1 of a checkpoint."""
    try:
        return _run(argv)
    except SystemExit as e:  # argparse's errors (printed) and --help
        return e.code if isinstance(e.code, int) else 0


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="vil robustness", description=main.__doc__.strip())
    p.add_argument("--model", default="vil2_tiny", help="registered model name (vil.list_models())")
    p.add_argument("--checkpoint", required=True, help="weights: the authors' .th, a state dict or a run's .ckpt")
    p.add_argument("--model-kwargs", default="{}", help="JSON of further vil.create_model arguments")
    p.add_argument("--imagenet-c", help="ImageNet-C root: <root>/<corruption>/<severity>/<wnid>/*")
    p.add_argument("--imagenet-a", help="ImageNet-A root: <root>/<wnid>/* (or <root>/val/<wnid>/*)")
    p.add_argument("--imagenet-r", help="ImageNet-R root")
    p.add_argument("--imagenet-sketch", help="ImageNet-Sketch root")
    p.add_argument("--imagenet-val", help="ImageNet-1K val split: <val>/<wnid>/*")
    p.add_argument("--extra-corruptions", action="store_true", help="also the 4 hold-out ImageNet-C corruptions")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "32"), default="bf16")
    p.add_argument("--out", required=True, help="folder for results.json, table.md and table.csv")
    args = p.parse_args(argv)
    if not any((args.imagenet_c, args.imagenet_a, args.imagenet_r, args.imagenet_sketch, args.imagenet_val)):
        p.error("give at least one of --imagenet-c, --imagenet-a, --imagenet-r, --imagenet-sketch, --imagenet-val")
    for flag in ("imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_val"):
        folder = getattr(args, flag)
        if folder is not None and not os.path.isdir(folder):
            p.error(f"--{flag.replace('_', '-')} {folder}: folder not found")

    import vil
    from tasks.imagenet.data import eval_resize, to_normalized
    from torchvision.transforms import v2

    device = torch.device(args.device)
    try:
        model = vil.create_model(args.model, checkpoint=args.checkpoint, num_classes=1000, img_size=args.img_size,
                                 **json.loads(args.model_kwargs))
    except (ValueError, RuntimeError) as e:
        print(f"vil robustness: error: {e}", file=sys.stderr)
        return 2
    model = model.to(device).eval()
    transform = v2.Compose([eval_resize(args.img_size, args.crop_pct), to_normalized()])
    wnids = imagenet_wnids()

    jobs: list[tuple[str, str, list[int] | None]] = []
    if args.imagenet_c:
        names = CORRUPTIONS + (tuple(EXTRA_CORRUPTIONS) if args.extra_corruptions else ())
        for c in names:
            for s in SEVERITIES:
                folder = os.path.join(args.imagenet_c, c, str(s))
                if not os.path.isdir(folder):
                    print(f"vil robustness: error: {folder} not found (ImageNet-C needs "
                          f"<root>/<corruption>/<severity>/<wnid>/ for all corruptions and severities 1-5)",
                          file=sys.stderr)
                    return 2
                jobs.append((f"imagenet_c/{c}/{s}", folder, None))
    for flag, key, subset in (("imagenet_a", "imagenet_a", "a"), ("imagenet_r", "imagenet_r", "r"),
                              ("imagenet_sketch", "imagenet_sketch", None), ("imagenet_val", "imagenet_val", None)):
        if getattr(args, flag):
            jobs.append((key, _variant_root(getattr(args, flag)), subset_indices(subset) if subset else None))

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
    meta = {"model": args.model, "checkpoint": os.path.abspath(args.checkpoint), "img_size": args.img_size}
    if results.get("_meta", meta) != meta:
        print(f"vil robustness: error: {results_path} holds results of {results['_meta']}; use another --out",
              file=sys.stderr)
        return 2
    results["_meta"] = meta
    from tqdm import tqdm

    for key, folder, subset in tqdm(jobs, desc="datasets", unit="set"):
        if key in results:
            continue
        start = time.time()
        dataset = _RemappedFolder(folder, transform, wnids)
        acc, n = top1_accuracy(model, dataset, args.batch_size, args.num_workers, device, subset, args.precision)
        results[key] = {"acc": acc, "images": n, "seconds": round(time.time() - start, 1)}
        write_json_atomic(results_path, results)

    rows, numbers = build_table({k: v for k, v in results.items() if k != "_meta"})
    table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    write_text_atomic(os.path.join(args.out, "table.md"), f"# {args.model} ({args.checkpoint})\n\n{table}")
    csv_text = io.StringIO()
    csv.writer(csv_text).writerows([("metric", "value"), *rows])
    write_text_atomic(os.path.join(args.out, "table.csv"), csv_text.getvalue())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
