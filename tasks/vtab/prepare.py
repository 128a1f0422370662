"""`vil vtab prepare --from tfds --tfds-dir DIR --out ROOT`: the folder format written from tensorflow-datasets
data (ArrayRecord, prepared beforehand with TensorFlow; see tasks/vtab/README.md), with the official splits and
label functions. Images are PNG at their native size (lossless; the JPEG folder sets in circulation cost some
tasks several points), laid out like the community format: ``<task>/images/<split>/<i:06d>.png`` and
``<task>/<split>.txt`` with lines ``images/<split>/<i:06d>.png <label>``. Each task is written into
``<task>.partial`` and renamed when complete, so an interrupted prepare redoes only the unfinished task."""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image

from tasks.vtab.data import TfdsSource, VtabDataError
from tasks.vtab.tasks import SPLITS, resolve_tasks


def native_image(array) -> Image.Image:
    """A tfds image as PIL without conversion: grey stays one channel (lossless and smaller)."""
    array = np.asarray(array)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def prepare_task(source: TfdsSource, out: str, progress: bool = True) -> str:
    from tqdm import tqdm

    task = source.task
    final = os.path.join(out, task.name)
    if all(os.path.isfile(os.path.join(final, f"{s}.txt")) for s in SPLITS):
        return final
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    counts = source.check(SPLITS)
    bar = tqdm(total=sum(counts.values()), desc=task.name, unit="img", disable=not progress, file=sys.stderr)
    for split in SPLITS:
        os.makedirs(os.path.join(partial, "images", split))
        lines = []
        for i in range(counts[split]):
            example = source.example(split, i)
            label = task.label_fn(example)
            if not 0 <= label < task.num_classes:
                raise VtabDataError(f"{task.name} {split} example {i}: label {label} outside 0..{task.num_classes - 1}")
            rel = f"images/{split}/{i:06d}.png"
            native_image(task.image_fn(example)).save(os.path.join(partial, rel))
            lines.append(f"{rel} {label}\n")
            bar.update()
        with open(os.path.join(partial, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    bar.close()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def main(argv: list[str]) -> int:
    """Write the VTAB-1K folder format (PNG) from prepared tensorflow-datasets data."""
    p = argparse.ArgumentParser(prog="vil vtab prepare", description=main.__doc__)
    p.add_argument("--from", dest="source", choices=["tfds"], required=True)
    p.add_argument("--tfds-dir", default=None, help="tfds data dir (default: tfds' own, ~/tensorflow_datasets)")
    p.add_argument("--out", required=True, help="root of the folder format")
    p.add_argument("--tasks", nargs="+", default=["all"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        tasks = resolve_tasks(args.tasks)
        for task in tasks:
            folder = prepare_task(TfdsSource(args.tfds_dir, task), args.out, progress=not args.no_progress)
            print(f"{task.name}: {folder}", flush=True)
    except (ValueError, VtabDataError) as e:
        print(f"vil vtab prepare: error: {e}", file=sys.stderr)
        return 2
    return 0
