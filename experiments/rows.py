"""The paper's table rows that concern ViL or our reimplemented baselines, as data: per row its paper numbers,
its stages (the command and configs each runs, the checkpoint each hands to the next) and its cost in H200
GPU-hours. ``vil list`` / ``vil run`` / ``vil report`` (``tasks/rows.py``) read ``ROWS``.

Paper numbers are transcribed from ../shared/paper/vision-lstm-paper.txt (Tables 1-9). Costs come from the
suite's measured H200 throughput (bf16):

- ImageNet training: ViL-T Lightning fit 5,309 img/s at 224 (0.88x of the bare 6,052 img/s step), hence
  0.88 x 7,800 = 6,864 img/s at 192. ViL-S and ViL-B were not measured on an H200: the README's H100 table
  gives S 0.48x and B 0.20x of T's img/s at 224, applied here to both resolutions; DeiT-T trains at 2.77x
  ViL-T (H100 table, 15,435 / 5,579). ImageNet end to end with JPEG decoding on a 16-core host is input-bound
  at about 1,100-1,400 img/s: the "loader" cost uses that range where it is below the model's speed.
- ADE20K UperNet, 512, batch 16: ViL-T 3.62 it/s, DeiT-T 4.14 it/s; S / B by the same 0.48x / 0.20x. The
  ablations' linear head is priced at the UperNet rate (an upper bound).
- VTAB-1K full sweep (570 runs): ViL-T 2.88 H200-hours (3 runs per GPU); S / B as 2.88 / 0.48 and / 0.20.
- Evaluation (robustness): inference assumed 3.36x the training step (H100 table, ViL-T 18,772 / 5,579 img/s),
  loader-bound at the same 1,100-1,400 img/s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_TRAIN_IMAGES = 1_281_167
# Images of one Table 9 evaluation: ImageNet-C (15 corruptions x 5 severities x 50,000), -A, -R, Sketch, val.
ROBUSTNESS_IMAGES = 15 * 5 * 50_000 + 7_500 + 30_000 + 50_889 + 50_000

VIL_T_FIT_IMG_S = {224: 5_309.0, 192: 0.88 * 7_800.0}
SIZE_RATIO = {"T": 1.0, "S": 0.48, "B": 0.20}   # img/s relative to ViL-T (H100 table, 224)
DEIT_T_RATIO = 15_435 / 5_579                    # DeiT-T / ViL-T training img/s (H100 table, 224)
LOADER_IMG_S = (1_100.0, 1_400.0)                # JPEG decoding on a 16-core host (slow, fast)
INFERENCE_RATIO = 18_772 / 5_579
ADE20K_IT_S = {"vil-T": 3.62, "deit-T": 4.14}
VTAB_SWEEP_HOURS_T = 2.88

CONFIGS = "experiments"
IN1K = f"{CONFIGS}/imagenet"
ADE = f"{CONFIGS}/ade20k"
VTAB = f"{CONFIGS}/vtab"
WEIGHTS = {"T": "weights/vil2_tiny16_e800_in1k.th", "T400": "weights/vil2_tiny16_e400_in1k.th",
           "S": "weights/vil2_small16_e400_in1k.th", "B": "weights/vil2_base16_e400_in1k.th"}


@dataclass(frozen=True)
class Cost:
    """H200 GPU-hours: ``model`` at the model's measured speed, ``loader`` (low, high) with the measured
    ImageNet loader (None where the stage does not read ImageNet JPEGs)."""

    model: float
    loader: tuple[float, float] | None = None


@dataclass(frozen=True)
class Stage:
    """One step of a row.

    name: the stage's folder under the row's output folder (``OUT/<row>/<name>``).
    command: ``vil`` command (``fit``, ``test``, ``vtab``, ``robustness``) or ``python`` for a script.
    configs: ``--config`` files, in order (repository-relative); for ``python`` the script and its arguments.
    args: further arguments (the paper's differences that are not a config of their own, e.g. an ablation switch).
    takes: the earlier stage whose checkpoint this stage starts from, and ``takes_flag`` the argument that
        receives it; None: the stage starts from what its configs say (released weights or scratch).
    hands: which checkpoint of a ``fit`` stage the next stage gets: ``last`` or ``best``.
    cost: H200 GPU-hours.
    """

    name: str
    command: str
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    takes: str | None = None
    takes_flag: str = "--model.init_args.checkpoint"
    hands: str = "last"
    cost: Cost = Cost(0.0)


@dataclass(frozen=True)
class PaperNumber:
    """A number of the paper's table and where ours comes from: ``metric`` of stage ``stage`` (see
    ``tasks.rows.stage_metrics``); ``lower_is_better`` for errors; ``tables``: the tables that print it when
    not all of the row's tables do."""

    column: str
    value: float
    stage: str
    metric: str
    lower_is_better: bool = False
    tables: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    id: str
    tables: tuple[str, ...]
    label: str
    numbers: tuple[PaperNumber, ...]
    stages: tuple[Stage, ...]
    note: str = ""
    params: str = ""   # as the paper prints them
    flops: str = ""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"row {self.id} has no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    @property
    def cost(self) -> Cost:
        model = sum(s.cost.model for s in self.stages)
        loaders = [s.cost.loader or (s.cost.model, s.cost.model) for s in self.stages]
        has_loader = any(s.cost.loader for s in self.stages)
        return Cost(model, (sum(lo for lo, _ in loaders), sum(hi for _, hi in loaders)) if has_loader else None)


# -- costs ---------------------------------------------------------------------------------------------------------------
def imagenet_cost(size: str, epochs: int, res: int, deit: bool = False) -> Cost:
    img_s = VIL_T_FIT_IMG_S[res] * (DEIT_T_RATIO if deit else SIZE_RATIO[size])
    images = epochs * IMAGENET_TRAIN_IMAGES
    hours = lambda rate: images / rate / 3600  # noqa: E731
    slow, fast = (min(img_s, rate) for rate in LOADER_IMG_S)
    return Cost(hours(img_s), (hours(fast), hours(slow)))


def ade20k_cost(size: str, iterations: int = 160_000, deit: bool = False) -> Cost:
    it_s = ADE20K_IT_S["deit-T"] if deit else ADE20K_IT_S["vil-T"] * SIZE_RATIO[size]
    return Cost(iterations / it_s / 3600)


def vtab_cost(size: str) -> Cost:
    return Cost(VTAB_SWEEP_HOURS_T / SIZE_RATIO[size])


def robustness_cost(size: str) -> Cost:
    img_s = 6_052.0 * INFERENCE_RATIO * SIZE_RATIO[size]
    hours = lambda rate: ROBUSTNESS_IMAGES / rate / 3600  # noqa: E731
    return Cost(hours(img_s), tuple(hours(min(img_s, r)) for r in reversed(LOADER_IMG_S)))


# -- stages --------------------------------------------------------------------------------------------------------------
SIZE_NAME = {"T": "tiny", "S": "small", "B": "base"}


def imagenet_stages(size: str, epochs: int, ft_epochs: int) -> tuple[Stage, Stage]:
    model = f"vil2_{SIZE_NAME[size]}"
    return (
        Stage("pretrain", "fit", (f"{IN1K}/base.yaml", f"{IN1K}/{model}_e{epochs}.yaml"),
              cost=imagenet_cost(size, epochs, 192)),
        Stage("finetune", "fit", (f"{IN1K}/base.yaml", f"{IN1K}/{model}_e{epochs}_ft224.yaml"), takes="pretrain",
              cost=imagenet_cost(size, ft_epochs, 224)),
    )


def deit3_stages(epochs: int) -> tuple[Stage, Stage]:
    # The 400-epoch DeiT-III-T of Table 7 runs the 800-epoch recipe with half the epochs.
    extra = () if epochs == 800 else ("--trainer.max_epochs", str(epochs))
    return (
        Stage("pretrain", "fit", (f"{IN1K}/base.yaml", f"{IN1K}/deit3_tiny_e800.yaml"), extra,
              cost=imagenet_cost("T", epochs, 192, deit=True)),
        Stage("finetune", "fit", (f"{IN1K}/base.yaml", f"{IN1K}/deit3_tiny_e800_ft224.yaml"), takes="pretrain",
              cost=imagenet_cost("T", 20, 224, deit=True)),
    )


def ade20k_stages(size: str, takes: str | None = None, deit: bool = False) -> tuple[Stage, Stage]:
    row_config = f"{ADE}/deit_tiny.yaml" if deit else f"{ADE}/vil_{SIZE_NAME[size]}.yaml"
    return (
        Stage("ade20k", "fit", (f"{ADE}/base.yaml", row_config), takes=takes, hands="best",
              cost=ade20k_cost(size, deit=deit)),
        # multi-scale [0.75 .. 1.75] + flip evaluation of the best single-scale checkpoint (vil test)
        Stage("ade20k-ms", "test", (f"{ADE}/base.yaml", row_config), takes="ade20k", takes_flag="--ckpt_path",
              cost=Cost(0.1)),
    )


def vtab_stage(size: str, takes: str | None = None, weights: str | None = None) -> Stage:
    model = f"vil2_{SIZE_NAME[size]}"
    args = () if takes else ("--checkpoint", weights or WEIGHTS[size])
    return Stage("vtab", "vtab", (f"{VTAB}/recipe.yaml", f"{VTAB}/{model}.yaml"), args, takes=takes,
                 takes_flag="--checkpoint", cost=vtab_cost(size))


def robustness_stage(size: str) -> Stage:
    model = f"vil2_{SIZE_NAME[size]}"
    return Stage("robustness", "robustness", (), ("--model", model, "--checkpoint", WEIGHTS[size]),
                 cost=robustness_cost(size))


# -- rows ----------------------------------------------------------------------------------------------------------------
def _n(column, value, stage, metric, lower=False):
    return PaperNumber(column, value, stage, metric, lower)


T1 = [
    Row("t1-vil-t", ("1",), "ViL-T 800+20", (_n("IN-1K", 78.3, "finetune", "val/acc"),),
        imagenet_stages("T", 800, 20), params="6M", flops="1.3G"),
    Row("t1-vil-s", ("1",), "ViL-S 400+20", (_n("IN-1K", 81.5, "finetune", "val/acc"),),
        imagenet_stages("S", 400, 20), params="23M", flops="4.7G"),
    Row("t1-vil-b", ("1",), "ViL-B 400+5", (_n("IN-1K", 82.4, "finetune", "val/acc"),),
        imagenet_stages("B", 400, 5), params="89M", flops="17.9G"),
    Row("t1-deit3-t", ("1",), "DeiT-III-T (reimpl.) 800+20", (_n("IN-1K", 76.2, "finetune", "val/acc"),),
        deit3_stages(800), params="6M", flops="1.3G"),
]

T2 = [
    Row(f"t2-vil-{s.lower()}", ("2",), f"ViL-{s} UperNet",
        (_n("mIoU", ss, "ade20k", "val/mIoU"), _n("ACC", ss_acc, "ade20k", "val/aAcc"),
         _n("mIoU (ms)", ms, "ade20k-ms", "test/mIoU"), _n("ACC (ms)", ms_acc, "ade20k-ms", "test/aAcc")),
        ade20k_stages(s), note="from the released ImageNet-1K weights (weights/*.th, see the row config)",
        params=p, flops=f)
    for s, ss, ss_acc, ms, ms_acc, p, f in (("T", 41.2, 80.2, 43.1, 81.3, "11M", "6.6G"),
                                            ("S", 46.3, 82.0, 47.9, 82.9, "42M", "24.4G"),
                                            ("B", 48.6, 82.8, 49.6, 83.3, "115M", "93.6G"))
]

# Table 3 (category means) and Table 8 (per task) from one sweep per size; Table 8's columns are in
# tasks.vtab.report.PAPER_TABLE8 (the report compares all 19 tasks), Table 3's means here.
T3 = [
    Row(f"t3-vil-{s.lower()}", ("3", "8"), f"ViL-{s} VTAB-1K",
        (_n("Natural", nat, "vtab", "natural"), _n("Specialized", spec, "vtab", "specialized"),
         _n("Structured", struct, "vtab", "structured"), _n("Average", avg, "vtab", "average")),
        (vtab_stage(s),), note="from the released ImageNet-1K weights; Table 8's 19 tasks in the VTAB report",
        params=p, flops=f)
    for s, nat, spec, struct, avg, p, f in (("T", 73.6, 83.4, 56.1, 68.3, "6M", "1.3G"),
                                            ("S", 75.3, 84.3, 58.3, 70.0, "23M", "4.7G"),
                                            ("B", 76.6, 84.7, 59.1, 70.9, "89M", "17.9G"))
]


def ablation(row_id: str, tables: tuple[str, ...], label: str, in1k: float, ade: float | None,
             switches: dict[str, str], seg_args: tuple[str, ...] = ()) -> Row:
    """ViL-T 100 epochs at 224 on ImageNet-1K, then (where the paper reports it) the reduced ADE20K setting
    (linear head, 40k iterations) from that run, both with the same backbone switches."""
    flags = tuple(a for key, value in switches.items() for a in (f"--model.init_args.model_kwargs.{key}", value))
    stages = [Stage("imagenet", "fit", (f"{IN1K}/base.yaml", f"{CONFIGS}/ablations/imagenet_e100_224.yaml"), flags,
                    cost=imagenet_cost("T", 100, 224))]
    numbers = [_n("IN-1K", in1k, "imagenet", "val/acc")]
    if ade is not None:
        stages.append(Stage("ade20k-linear", "fit", (f"{ADE}/base.yaml", f"{ADE}/vil_tiny.yaml",
                                                     f"{ADE}/ablation_linear.yaml"), flags + seg_args,
                            takes="imagenet", cost=ade20k_cost("T", 40_000)))
        # Table 5b has no ADE20K column.
        numbers.append(PaperNumber("ADE20K mIoU", ade, "ade20k-linear", "val/mIoU",
                                   tables=tuple(t for t in tables if t != "5b")))
    return Row(row_id, tables, label, tuple(numbers), tuple(stages))


T45 = [
    # The paper's default (bi-directional, Conv2D, position embedding, sequential, bilateral concat, no [CLS])
    # is one run shared by all ablation tables.
    ablation("t4-default", ("4a", "4b", "4c", "4d", "5a", "5b"), "ViL-T ablation default", 73.7, 31.7, {}),
    ablation("t4a-uni", ("4a",), "Uni-dir. traversal", 72.2, 28.6, {"traversal": "uni"}),
    ablation("t4a-quad", ("4a",), "Quad-dir. traversal", 73.8, 33.1, {"traversal": "quad"}),
    ablation("t4a-oct", ("4a",), "Oct-dir. traversal", 73.5, 32.4, {"traversal": "oct"}),
    ablation("t4b-none", ("4b",), "no QK convolution", 72.3, 29.2, {"conv_kind": "none"}),
    ablation("t4b-causal1d", ("4b",), "Causal-Conv1D", 72.8, 27.8, {"conv_kind": "causal1d"}),
    ablation("t4b-conv1d", ("4b",), "Conv1D", 72.8, 28.4, {"conv_kind": "1d"}),
    ablation("t4c-no-pos", ("4c",), "no position embedding", 73.7, 31.0, {"pos_embed": "false"}),
    # Parallel pairs have one output each: the last tap is pair 11 instead of block 23.
    ablation("t4d-parallel", ("4d",), "Parallel concurrency", 73.0, 30.6, {"concurrency": "parallel"},
             seg_args=("--model.init_args.out_indices", "[11]")),
    ablation("t5a-bilateral-mean", ("5a",), "Bilateral Mean pooling", 73.0, 31.5, {"pooling": "bilateral_mean"}),
    ablation("t5a-avg", ("5a",), "[AVG] pooling", 72.6, 32.8, {"pooling": "avg"}),
    ablation("t5a-center-avg", ("5a",), "Center [AVG] pooling", 72.4, 32.1, {"pooling": "center_avg"}),
    ablation("t5b-mid-cls", ("5b",), "Mid [CLS]", 71.8, None, {"cls_tokens": "mid", "pooling": "cls"}),
    ablation("t5b-bilateral-cls", ("5b",), "Bilateral [CLS]", 73.5, None, {"cls_tokens": "bilateral", "pooling": "cls"}),
    ablation("t5b-mid-bilateral-cls", ("5b",), "Mid + Bilateral [CLS]", 73.0, None,
             {"cls_tokens": "mid+bilateral", "pooling": "cls"}),
]

T6 = [
    Row("t6-runtime", ("6",), "ViL training time, 10 IN-1K epochs (hours; paper: A100 fp16, ours: H200 bf16)",
        (_n("T (h)", 5.0, "benchmark", "hours10_tiny", True), _n("S (h)", 8.7, "benchmark", "hours10_small", True),
         _n("B (h)", 16.6, "benchmark", "hours10_base", True)),
        (Stage("benchmark", "python", ("experiments/benchmark.py", "--sizes", "tiny", "small", "base", "--res", "224",
                                       "--kinds", "vil", "deit"), cost=Cost(0.2)),),
        note="hours = 10 x 1,281,167 / training img/s at 224 from benchmark.csv; Table 6's Vim column "
             "(7.3 / 14.0 / 28.2 h) is not reimplemented"),
]

T7 = [
    Row("t7-vil-t-e400", ("7",), "ViL-T 400+20 -> VTAB-1K, ADE20K",
        (_n("IN-1K", 77.2, "finetune", "val/acc"), _n("VTAB-1K", 67.8, "vtab", "average"),
         _n("ADE20K mIoU", 40.9, "ade20k", "val/mIoU")),
        (*imagenet_stages("T", 400, 20), vtab_stage("T", takes="finetune"), *ade20k_stages("T", takes="finetune")),
        params="6M", flops="1.3G"),
    Row("t7-vil-t-e800", ("7",), "ViL-T 800+20 -> VTAB-1K, ADE20K",
        (_n("IN-1K", 78.3, "finetune", "val/acc"), _n("VTAB-1K", 68.3, "vtab", "average"),
         _n("ADE20K mIoU", 41.2, "ade20k", "val/mIoU")),
        (*imagenet_stages("T", 800, 20), vtab_stage("T", takes="finetune"), *ade20k_stages("T", takes="finetune")),
        params="6M", flops="1.3G"),
    # `vil vtab` fine-tunes ViL backbones only, so the DeiT-III-T rows leave out Table 7's VTAB-1K column
    # (paper: 67.0 at 400 epochs, 67.1 at 800).
    *(Row(f"t7-deit3-t-e{e}", ("7",), f"DeiT-III-T (reimpl.) {e}+20 -> ADE20K",
          (_n("IN-1K", in1k, "finetune", "val/acc"), _n("ADE20K mIoU", ade, "ade20k", "val/mIoU")),
          (*deit3_stages(e), *ade20k_stages("T", takes="finetune", deit=True)),
          note="no VTAB-1K stage (vil vtab takes ViL backbones)", params="6M", flops="1.3G")
      for e, in1k, ade in ((400, 75.6, 39.1), (800, 76.2, 39.8))),
]

T9 = [
    Row(f"t9-vil-{s.lower()}", ("9",), f"ViL-{s} robustness",
        (_n("IN-C mCE", c, "robustness", "IN-C mCE", True), _n("IN-A", a, "robustness", "IN-A top-1"),
         _n("IN-R", r, "robustness", "IN-R top-1"), _n("Sketch", sk, "robustness", "Sketch top-1"),
         _n("Validation", v, "robustness", "Validation top-1")),
        (robustness_stage(s),), note="from the released ImageNet-1K weights; pass the dataset folders as overrides")
    for s, c, a, r, sk, v in (("T", 59.6, 15.2, 42.2, 30.0, 78.3), ("S", 50.6, 23.8, 47.9, 35.2, 81.5),
                              ("B", 45.3, 30.9, 51.9, 39.0, 82.4))
]

ROWS: dict[str, Row] = {row.id: row for row in (*T1, *T2, *T3, *T45, *T6, *T7, *T9)}


def rows_of_table(table: str | None) -> list[Row]:
    """The rows of paper table ``table`` (``4`` matches 4a-4d); all rows for None."""
    if table is None:
        return list(ROWS.values())
    table = str(table).lower()
    return [r for r in ROWS.values() if any(t == table or t.rstrip("abcd") == table for t in r.tables)]


def get_row(row_id: str) -> Row:
    if row_id not in ROWS:
        raise KeyError(f"unknown row {row_id!r}; `vil list` shows the rows ({', '.join(ROWS)})")
    return ROWS[row_id]
