"""The 19 VTAB-1K tasks (../shared/reference/vtab1k.md): names, classes, category, folder-name spellings, the
paper's column names (Table 8) and, for tensorflow-datasets, the builder, the exact split slices of the
official protocol and the label function of each task.

Split slices are written as tfds split strings (``train[:800]``, ``train[2754:2954]``, ``test[50%:]``, joined
by ``+``) but resolved here against the full tfds split (``resolve_slices``), so that the counts are checked
and the same code runs on real prepared data and on ``tfds.testing.mock_data`` (which ignores tfds' own split
slicing)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping

import numpy as np

SPLITS = ("train800", "val200", "train800val200", "test")
GROUPS = ("natural", "specialized", "structured")


# -- label functions of the derived tasks (task_adaptation/data/*.py) ----------------------------------------------------
def label_of(key: str) -> Callable[[Mapping], int]:
    def label(example: Mapping) -> int:
        return int(example[key])
    label.__name__ = f"label_{key}"
    return label


def _bin(value: float, thresholds: tuple[float, ...]) -> int:
    """The largest i with thresholds[i] < value (task_adaptation's binning of clevr and kitti distances)."""
    return max(i for i, t in enumerate(thresholds) if t < value)


CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def clevr_count(example: Mapping) -> int:
    """Number of objects - 3 (scenes hold 3..10 objects: labels 0..7)."""
    return len(example["objects"]["size"]) - 3


def clevr_dist(example: Mapping) -> int:
    """Depth of the closest object, binned: <= 8 -> 0, (8, 8.5] -> 1, ..., (9.5, 10] -> 4, > 10 -> 5."""
    depth = float(np.min(np.asarray(example["objects"]["pixel_coords"])[:, 2]))
    return _bin(depth, CLEVR_DIST_THRESHOLDS)


def kitti_dist(example: Mapping) -> int:
    """Distance (z, m) of the closest vehicle (types Car, Van, Truck = 0, 1, 2), binned: <= 8 -> 0, (8, 20] -> 1,
    (20, 999] -> 2, no vehicle -> 3 (the appended 1000)."""
    objects = example["objects"]
    types = np.asarray(objects["type"]).reshape(-1)
    z = np.asarray(objects["location"], dtype=np.float64).reshape(-1, 3)[:, 2]
    return _bin(float(np.min(np.concatenate([z[types < 3], [1000.0]]))), KITTI_DIST_THRESHOLDS)


def dsprites_binned(key: str, num_original: int, num_classes: int = 16) -> Callable[[Mapping], int]:
    """floor(raw / (num_original / num_classes)): x position 32 -> 16 bins, orientation 40 -> 16 bins."""
    def label(example: Mapping) -> int:
        return int(math.floor(float(example[key]) / (num_original / num_classes)))
    label.__name__ = f"dsprites_{key}"
    return label


def image_rgb(example: Mapping) -> np.ndarray:
    return np.asarray(example["image"])


def image_binary(example: Mapping) -> np.ndarray:
    """dsprites: a 0/1 mask, scaled to 0/255 (task_adaptation multiplies by 255 before the model sees it)."""
    return np.asarray(example["image"]) * np.uint8(255)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str                   # the folder name of the community format
    group: str                  # natural / specialized / structured
    num_classes: int
    paper_name: str             # the column of the paper's Table 8
    aliases: tuple[str, ...]    # other folder-name spellings in circulation
    tfds_name: str              # tfds builder (with config)
    tfds_splits: Mapping[str, str]
    label_fn: Callable[[Mapping], int]
    image_fn: Callable[[Mapping], np.ndarray] = image_rgb
    test_size: int | None = None  # the official test count (folder format)


def _splits(val: str, test: str = "test") -> dict[str, str]:
    return {"train800": "train[:800]", "val200": val, "train800val200": f"train[:800]+{val}", "test": test}


_LABEL = label_of("label")
_TASK_LIST = [
    # natural
    Task("cifar", "natural", 100, "Cifar100", ("cifar100", "cifar-100", "cifar_100"), "cifar100",
         _splits("train[45000:45200]"), _LABEL, test_size=10000),
    Task("caltech101", "natural", 102, "Caltech101", ("caltech", "caltech-101"), "caltech101",
         _splits("train[2754:2954]"), _LABEL, test_size=6085),
    Task("dtd", "natural", 47, "DTD", ("dtd47",), "dtd", _splits("validation[:200]"), _LABEL, test_size=1880),
    Task("oxford_flowers102", "natural", 102, "Flower102", ("flowers102", "flowers", "flower102", "oxford_flowers"),
         "oxford_flowers102", _splits("validation[:200]"), _LABEL, test_size=6149),
    Task("oxford_iiit_pet", "natural", 37, "Pets", ("pets", "oxford_pets", "oxford_pet", "pet"), "oxford_iiit_pet",
         _splits("train[2944:3144]"), _LABEL, test_size=3669),
    Task("svhn", "natural", 10, "SVHN", ("svhn_cropped",), "svhn_cropped", _splits("train[65931:66131]"), _LABEL,
         test_size=26032),
    Task("sun397", "natural", 397, "Sun397", ("sun",), "sun397/tfds", _splits("validation[:200]"), _LABEL,
         test_size=21750),
    # specialized
    Task("patch_camelyon", "specialized", 2, "Camelyon", ("camelyon", "pcam", "patchcamelyon"), "patch_camelyon",
         _splits("validation[:200]"), _LABEL, test_size=32768),
    Task("eurosat", "specialized", 10, "EuroSAT", ("eurosat_rgb",), "eurosat/rgb",
         _splits("train[16200:16400]", "train[21600:]"), _LABEL, test_size=5400),
    Task("resisc45", "specialized", 45, "Resisc45", ("resisc",), "resisc45",
         _splits("train[18900:19100]", "train[25200:]"), _LABEL, test_size=6300),
    Task("diabetic_retinopathy", "specialized", 5, "Retinopathy",
         ("retinopathy", "diabetic_retinopathy_detection", "diabetic_retinopathy_btgraham-300"),
         "diabetic_retinopathy_detection/btgraham-300", _splits("validation[:200]"), _LABEL, test_size=42670),
    # structured
    Task("clevr_count", "structured", 8, "Clevr-Count", ("clevr_count_all", "clevr-count"), "clevr",
         _splits("train[63000:63200]", "validation"), clevr_count, test_size=15000),
    Task("clevr_dist", "structured", 6, "Clevr-Dist", ("clevr_closest_object_distance", "clevr-dist", "clevr_distance"),
         "clevr", _splits("train[63000:63200]", "validation"), clevr_dist, test_size=15000),
    Task("dmlab", "structured", 6, "DMLab", ("dmlab_frames",), "dmlab", _splits("validation[:200]"), _LABEL,
         test_size=22735),
    Task("kitti", "structured", 4, "KITTI-Dist", ("kitti_dist", "kitti_closest_vehicle_distance", "kitti-dist"),
         "kitti", _splits("validation[:200]"), kitti_dist, test_size=711),
    Task("dsprites_loc", "structured", 16, "dSpr-Loc", ("dsprites_label_x_position", "dsprites_location", "dsprites-loc"),
         "dsprites", _splits("train[589824:590024]", "train[663552:]"), dsprites_binned("label_x_position", 32),
         image_binary, test_size=73728),
    Task("dsprites_ori", "structured", 16, "dSpr-Ori", ("dsprites_label_orientation", "dsprites_orientation", "dsprites-ori"),
         "dsprites", _splits("train[589824:590024]", "train[663552:]"), dsprites_binned("label_orientation", 40),
         image_binary, test_size=73728),
    Task("smallnorb_azi", "structured", 18, "sNORB-Azim", ("smallnorb_label_azimuth", "smallnorb_azimuth", "smallnorb-azi"),
         "smallnorb", _splits("test[:200]", "test[50%:]"), label_of("label_azimuth"), test_size=12150),
    Task("smallnorb_ele", "structured", 9, "sNORB-Ele", ("smallnorb_label_elevation", "smallnorb_elevation", "smallnorb-ele"),
         "smallnorb", _splits("test[:200]", "test[50%:]"), label_of("label_elevation"), test_size=12150),
]
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}  # in the column order of the paper's Table 8


def get_task(name: str) -> Task:
    """The task of a name or any of its folder spellings; ValueError naming close matches otherwise."""
    if name in TASKS:
        return TASKS[name]
    for task in _TASK_LIST:
        if name.lower() in task.aliases:
            return task
    spellings = [n for t in _TASK_LIST for n in (t.name, *t.aliases)]
    close = difflib.get_close_matches(name.lower(), spellings, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown VTAB-1K task {name!r}.{hint} The 19 tasks: {', '.join(TASKS)}")


def resolve_tasks(names: list[str] | None) -> list[Task]:
    """Tasks of the given names (all 19 when None or ["all"]), each once, in Table 8 order."""
    if not names or names == ["all"]:
        return list(_TASK_LIST)
    chosen = {get_task(n).name for n in names}
    return [t for t in _TASK_LIST if t.name in chosen]


_SLICE = re.compile(r"^(?P<split>\w+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def resolve_slices(spec: str, split_sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """``"train[:800]+validation[:200]"`` -> [("train", 0, 800), ("validation", 0, 200)] for the given full
    split sizes. Percent bounds round like tfds (to the closest example). A slice that reaches past its split's
    end is an error: the protocol's counts would silently shrink."""
    parts = []
    for part in spec.split("+"):
        match = _SLICE.match(part.strip())
        if not match:
            raise ValueError(f"split {part!r} of {spec!r} is not of the form name[start:stop]")
        split = match["split"]
        if split not in split_sizes:
            raise ValueError(f"split {split!r} of {spec!r} is not in the data (splits: {', '.join(split_sizes)})")
        size = split_sizes[split]

        def bound(text: str | None, default: int) -> int:
            if text is None:
                return default
            value = round(size * int(text[:-1]) / 100) if text.endswith("%") else int(text)
            return value + size if value < 0 else value

        start, stop = bound(match["start"], 0), bound(match["stop"], size)
        if not 0 <= start <= stop <= size:
            raise ValueError(f"split {part!r} needs examples {start}..{stop} but {split!r} has {size}")
        parts.append((split, start, stop))
    return parts
