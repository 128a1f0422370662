"""The row registry against the paper's tables, `vil list`, costs, the stage commands, and every config of
experiments/ (and every ablation switch) instantiated with tiny models and fixture data for one training step."""
import json
import sys
from pathlib import Path

import pytest

from test_imagenet import make_tree as make_imagenet
from test_segmentation import _tiny_config, make_ade20k

from experiments import rows as registry
from tasks import cli
from tasks import rows as runner

REPO = Path(__file__).resolve().parents[1]

# The paper's rows that concern ViL or our reimplemented DeiT-III-T, transcribed from
# ../shared/paper/vision-lstm-paper.txt: (table, row label in the paper, column, value).
PAPER = {
    ("1", "ViL-T", "IN-1K", 78.3), ("1", "ViL-S", "IN-1K", 81.5), ("1", "ViL-B", "IN-1K", 82.4),
    ("1", "DeiT-III-T (reimpl.)", "IN-1K", 76.2),
    ("2", "ViL-T", "mIoU", 41.2), ("2", "ViL-T", "ACC", 80.2), ("2", "ViL-T", "mIoU (ms)", 43.1), ("2", "ViL-T", "ACC (ms)", 81.3),
    ("2", "ViL-S", "mIoU", 46.3), ("2", "ViL-S", "ACC", 82.0), ("2", "ViL-S", "mIoU (ms)", 47.9), ("2", "ViL-S", "ACC (ms)", 82.9),
    ("2", "ViL-B", "mIoU", 48.6), ("2", "ViL-B", "ACC", 82.8), ("2", "ViL-B", "mIoU (ms)", 49.6), ("2", "ViL-B", "ACC (ms)", 83.3),
    ("3", "ViL-T", "Natural", 73.6), ("3", "ViL-T", "Specialized", 83.4), ("3", "ViL-T", "Structured", 56.1), ("3", "ViL-T", "Average", 68.3),
    ("3", "ViL-S", "Natural", 75.3), ("3", "ViL-S", "Specialized", 84.3), ("3", "ViL-S", "Structured", 58.3), ("3", "ViL-S", "Average", 70.0),
    ("3", "ViL-B", "Natural", 76.6), ("3", "ViL-B", "Specialized", 84.7), ("3", "ViL-B", "Structured", 59.1), ("3", "ViL-B", "Average", 70.9),
    ("4a", "Uni-dir.", "IN-1K", 72.2), ("4a", "Uni-dir.", "ADE20K mIoU", 28.6),
    ("4a", "Bi-dir.", "IN-1K", 73.7), ("4a", "Bi-dir.", "ADE20K mIoU", 31.7),
    ("4a", "Quad-dir.", "IN-1K", 73.8), ("4a", "Quad-dir.", "ADE20K mIoU", 33.1),
    ("4a", "Oct-dir.", "IN-1K", 73.5), ("4a", "Oct-dir.", "ADE20K mIoU", 32.4),
    ("4b", "None", "IN-1K", 72.3), ("4b", "None", "ADE20K mIoU", 29.2),
    ("4b", "Causal-Conv1D", "IN-1K", 72.8), ("4b", "Causal-Conv1D", "ADE20K mIoU", 27.8),
    ("4b", "Conv1D", "IN-1K", 72.8), ("4b", "Conv1D", "ADE20K mIoU", 28.4),
    ("4b", "Conv2D", "IN-1K", 73.7), ("4b", "Conv2D", "ADE20K mIoU", 31.7),
    ("4c", "no pos. embed.", "IN-1K", 73.7), ("4c", "no pos. embed.", "ADE20K mIoU", 31.0),
    ("4c", "pos. embed.", "IN-1K", 73.7), ("4c", "pos. embed.", "ADE20K mIoU", 31.7),
    ("4d", "Sequential", "IN-1K", 73.7), ("4d", "Sequential", "ADE20K mIoU", 31.7),
    ("4d", "Parallel", "IN-1K", 73.0), ("4d", "Parallel", "ADE20K mIoU", 30.6),
    ("5a", "Bilateral Mean", "IN-1K", 73.0), ("5a", "Bilateral Mean", "ADE20K mIoU", 31.5),
    ("5a", "Bilateral Concat", "IN-1K", 73.7), ("5a", "Bilateral Concat", "ADE20K mIoU", 31.7),
    ("5a", "[AVG]", "IN-1K", 72.6), ("5a", "[AVG]", "ADE20K mIoU", 32.8),
    ("5a", "Center [AVG]", "IN-1K", 72.4), ("5a", "Center [AVG]", "ADE20K mIoU", 32.1),
    ("5b", "Concat Bilateral Patches", "IN-1K", 73.7), ("5b", "Mid [CLS]", "IN-1K", 71.8),
    ("5b", "Bilateral [CLS]", "IN-1K", 73.5), ("5b", "Mid + Bilateral [CLS]", "IN-1K", 73.0),
    ("6", "ViL", "T (h)", 5.0), ("6", "ViL", "S (h)", 8.7), ("6", "ViL", "B (h)", 16.6),
    ("7", "DeiT-III-T 400", "IN-1K", 75.6), ("7", "DeiT-III-T 400", "ADE20K mIoU", 39.1),
    ("7", "DeiT-III-T 800", "IN-1K", 76.2), ("7", "DeiT-III-T 800", "ADE20K mIoU", 39.8),
    ("7", "ViL-T 400", "IN-1K", 77.2), ("7", "ViL-T 400", "VTAB-1K", 67.8), ("7", "ViL-T 400", "ADE20K mIoU", 40.9),
    ("7", "ViL-T 800", "IN-1K", 78.3), ("7", "ViL-T 800", "VTAB-1K", 68.3), ("7", "ViL-T 800", "ADE20K mIoU", 41.2),
    ("9", "ViL-T", "IN-C mCE", 59.6), ("9", "ViL-T", "IN-A", 15.2), ("9", "ViL-T", "IN-R", 42.2), ("9", "ViL-T", "Sketch", 30.0), ("9", "ViL-T", "Validation", 78.3),
    ("9", "ViL-S", "IN-C mCE", 50.6), ("9", "ViL-S", "IN-A", 23.8), ("9", "ViL-S", "IN-R", 47.9), ("9", "ViL-S", "Sketch", 35.2), ("9", "ViL-S", "Validation", 81.5),
    ("9", "ViL-B", "IN-C mCE", 45.3), ("9", "ViL-B", "IN-A", 30.9), ("9", "ViL-B", "IN-R", 51.9), ("9", "ViL-B", "Sketch", 39.0), ("9", "ViL-B", "Validation", 82.4),
}
# Which registry row holds each paper row label (the ablation defaults are one shared run).
ROW_OF = {
    ("1", "ViL-T"): "t1-vil-t", ("1", "ViL-S"): "t1-vil-s", ("1", "ViL-B"): "t1-vil-b", ("1", "DeiT-III-T (reimpl.)"): "t1-deit3-t",
    **{("2", f"ViL-{s}"): f"t2-vil-{s.lower()}" for s in "TSB"}, **{("3", f"ViL-{s}"): f"t3-vil-{s.lower()}" for s in "TSB"},
    ("4a", "Uni-dir."): "t4a-uni", ("4a", "Bi-dir."): "t4-default", ("4a", "Quad-dir."): "t4a-quad", ("4a", "Oct-dir."): "t4a-oct",
    ("4b", "None"): "t4b-none", ("4b", "Causal-Conv1D"): "t4b-causal1d", ("4b", "Conv1D"): "t4b-conv1d", ("4b", "Conv2D"): "t4-default",
    ("4c", "no pos. embed."): "t4c-no-pos", ("4c", "pos. embed."): "t4-default",
    ("4d", "Sequential"): "t4-default", ("4d", "Parallel"): "t4d-parallel",
    ("5a", "Bilateral Mean"): "t5a-bilateral-mean", ("5a", "Bilateral Concat"): "t4-default", ("5a", "[AVG]"): "t5a-avg",
    ("5a", "Center [AVG]"): "t5a-center-avg", ("5b", "Concat Bilateral Patches"): "t4-default", ("5b", "Mid [CLS]"): "t5b-mid-cls",
    ("5b", "Bilateral [CLS]"): "t5b-bilateral-cls", ("5b", "Mid + Bilateral [CLS]"): "t5b-mid-bilateral-cls",
    ("6", "ViL"): "t6-runtime", ("7", "DeiT-III-T 400"): "t7-deit3-t-e400", ("7", "DeiT-III-T 800"): "t7-deit3-t-e800",
    ("7", "ViL-T 400"): "t7-vil-t-e400", ("7", "ViL-T 800"): "t7-vil-t-e800", **{("9", f"ViL-{s}"): f"t9-vil-{s.lower()}" for s in "TSB"},
}


def test_registry_holds_exactly_the_papers_rows():
    ours = {(t, n.column, n.value, row.id) for row in registry.ROWS.values() for n in row.numbers
            for t in n.tables or row.tables}
    expected = {(t, col, v, ROW_OF[t, label]) for t, label, col, v in PAPER}
    assert expected - ours == set(), "paper numbers missing from the registry"
    # Every registry number is one of the paper's (Table 8's per-task numbers are in tasks.vtab.report).
    assert {(t, c, v, r) for t, c, v, r in ours if t != "8"} - expected == set()
    assert {r for *_, r in expected} == set(registry.ROWS)


def test_vil_list_prints_every_row_with_its_paper_number_cost_and_status(tmp_path, capsys):
    assert cli.main(["list", "--out", str(tmp_path), "--format", "csv"]) == 0
    import csv
    import io

    listed = {r["row"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert set(listed) == set(registry.ROWS)
    for t, label, col, v in PAPER:
        assert f"{col} {v:g}" in listed[ROW_OF[t, label]]["paper"]
    assert all(r["status"] == "not run" for r in listed.values())
    # ViL-T 800 epochs at 192 + 20 at 224: 1,281,167 images x epochs / (0.88 x 7,800 | 5,309 img/s).
    hours = 1_281_167 * (800 / (0.88 * 7800) + 20 / 5309) / 3600
    assert listed["t1-vil-t"]["gpu_hours"] == f"{hours:,.1f}"
    loader = [1_281_167 * 820 / rate / 3600 for rate in (1400, 1100)]
    assert listed["t1-vil-t"]["gpu_hours_with_loader"] == "-".join(f"{h:,.1f}" for h in loader)
    # ADE20K ViL-T: 160k iterations at 3.62 it/s + the multi-scale test; VTAB-1K ViL-B: 2.88 / 0.20.
    assert listed["t2-vil-t"]["gpu_hours"] == f"{160000 / 3.62 / 3600 + 0.1:,.1f}"
    assert listed["t3-vil-b"]["gpu_hours"] == f"{2.88 / 0.20:,.1f}"
    assert cli.main(["list", "--table", "4", "--out", str(tmp_path), "--format", "csv"]) == 0
    table4 = {r["row"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert table4 == {"t4-default", "t4a-uni", "t4a-quad", "t4a-oct", "t4b-none", "t4b-causal1d", "t4b-conv1d",
                      "t4c-no-pos", "t4d-parallel"}
    assert cli.main(["list", "--table", "11", "--out", str(tmp_path)]) == 2


def test_run_rejects_unknown_rows_stages_and_targets(tmp_path, capsys):
    assert cli.main(["run", "t99-nothing", "--out", str(tmp_path)]) == 2
    assert "unknown row 't99-nothing'" in capsys.readouterr().err
    assert cli.main(["run", "t1-vil-t", "--out", str(tmp_path), "--stages", "vtab"]) == 2
    assert "has no stage 'vtab'" in capsys.readouterr().err
    assert cli.main(["run", "t1-vil-t", "--out", str(tmp_path), "@vtab", "--x", "1"]) == 2
    assert "has no stage or command vtab" in capsys.readouterr().err
    # A later stage alone needs the earlier stage's checkpoint.
    assert cli.main(["run", "t1-vil-t", "--out", str(tmp_path), "--stages", "finetune"]) == 2
    assert "needs the checkpoint of stage pretrain" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_stage_commands_chain_checkpoints_and_scope_overrides(tmp_path):
    row = registry.get_row("t7-vil-t-e800")
    per = runner.split_overrides(["--a", "1", "@pretrain,finetune", "--b", "2", "@vtab", "--c", "3"], row)
    assert per == {"pretrain": ["--a", "1", "--b", "2"], "finetune": ["--a", "1", "--b", "2"],
                   "vtab": ["--a", "1", "--c", "3"], "ade20k": ["--a", "1"], "ade20k-ms": ["--a", "1"]}
    ckpt = tmp_path / "p.ckpt"
    argv = runner.stage_command(row, row.stage("finetune"), tmp_path, ckpt, [], devices=8, num_nodes=2)
    assert argv[argv.index("--model.init_args.checkpoint") + 1] == str(ckpt)
    assert argv[argv.index("--trainer.devices") + 1] == "8" and argv[argv.index("--trainer.num_nodes") + 1] == "2"
    assert "--ckpt_path" not in argv  # nothing to resume yet
    run = tmp_path / row.id / "finetune" / "version_3" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"x")
    argv = runner.stage_command(row, row.stage("finetune"), tmp_path, ckpt, [], None, None)
    assert argv[argv.index("--ckpt_path") + 1] == str(run / "last.ckpt")
    vtab = runner.stage_command(row, row.stage("vtab"), tmp_path, ckpt, [], devices=4, num_nodes=None)
    assert vtab[vtab.index("--checkpoint") + 1] == str(ckpt) and vtab[vtab.index("--devices") + 1:][:4] == ["0", "1", "2", "3"]
    ms = runner.stage_command(row, row.stage("ade20k-ms"), tmp_path, ckpt, [], None, None)
    assert ms[3] == "test" and ms[ms.index("--ckpt_path") + 1] == str(ckpt)
    par = registry.get_row("t4d-parallel")
    argv = runner.stage_command(par, par.stage("ade20k-linear"), tmp_path, ckpt, [], None, None)
    assert argv[argv.index("--model.init_args.model_kwargs.concurrency") + 1] == "parallel"
    assert argv[argv.index("--model.init_args.out_indices") + 1] == "[11]"


# -- every config, one training step ------------------------------------------------------------------------------------
VIL_TINY = ["--model.init_args.model", "vil2_nano", "--model.init_args.model_kwargs.dim", "32",
            "--model.init_args.model_kwargs.depth", "1", "--model.init_args.model_kwargs.patch_size", "4",
            "--model.init_args.model_kwargs.img_size", "16", "--model.init_args.model_kwargs.mlstm_form", "chunkwise"]
DEIT_TINY = ["--model.init_args.model_kwargs.img_size", "16", "--model.init_args.model_kwargs.patch_size", "4",
             "--model.init_args.model_kwargs.embed_dim", "32", "--model.init_args.model_kwargs.depth", "1",
             "--model.init_args.model_kwargs.num_heads", "2"]
ONE_STEP = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("in1k"), special=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny ViL's weights for the configs that start from a checkpoint (fine-tuning, require_checkpoint)."""
    import torch

    import vil

    torch.manual_seed(0)
    model = vil.create_model("vil2_nano", num_classes=3, dim=32, depth=1, patch_size=4, img_size=16)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def imagenet_args(tree, out):
    return ["--data.init_args.root", str(tree), "--data.init_args.batch_size", "4", "--data.init_args.num_workers",
            "0", "--data.init_args.img_size", "16", "--model.init_args.num_classes", "3",
            "--model.init_args.global_batch_size", "null", "--trainer.logger.init_args.save_dir", str(out)]


IMAGENET_CONFIGS = sorted(p.name for p in (REPO / "experiments" / "imagenet").glob("*.yaml")
                          if p.name not in ("base.yaml", "eval.yaml"))


@pytest.mark.parametrize("config", IMAGENET_CONFIGS)
def test_imagenet_row_config_trains_one_step(config, imagenet_tree, tiny_checkpoint, tmp_path):
    deit = config.startswith("deit3")
    args = ["fit", "--config", str(REPO / "experiments/imagenet/base.yaml"),
            "--config", str(REPO / "experiments/imagenet" / config), *imagenet_args(imagenet_tree, tmp_path),
            *(DEIT_TINY if deit else VIL_TINY), *ONE_STEP]
    if "ft224" in config and not deit:
        args += ["--model.init_args.checkpoint", str(tiny_checkpoint)]
    if "ft224" in config and deit:
        args += ["--model.init_args.require_checkpoint", "false"]
    assert cli.main(args) == 0


def test_imagenet_eval_config_validates(imagenet_tree, tiny_checkpoint):
    args = ["validate", "--config", str(REPO / "experiments/imagenet/eval.yaml"), "--data.init_args.root",
            str(imagenet_tree), "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.img_size", "16", "--model.init_args.num_classes", "3",
            "--model.init_args.checkpoint", str(tiny_checkpoint), *VIL_TINY, *ONE_STEP]
    assert cli.main(args) == 0


ABLATION_ROWS = [r.id for r in registry.ROWS.values() if r.id.startswith(("t4", "t5"))]


@pytest.mark.parametrize("row_id", ABLATION_ROWS)
def test_ablation_rows_imagenet_stage_trains_one_step(row_id, imagenet_tree, tmp_path):
    """The row's own stage command (configs + switch), with the tiny model on top."""
    row = registry.get_row(row_id)
    argv = runner.stage_command(row, row.stage("imagenet"), tmp_path, None, [], None, None)
    assert argv[:4] == [sys.executable, "-m", "tasks.cli", "fit"]
    assert cli.main([*argv[3:], *imagenet_args(imagenet_tree, tmp_path), *VIL_TINY, *ONE_STEP]) == 0


ADE_STAGES = [("t2-vil-t", "ade20k"), ("t2-vil-s", "ade20k"), ("t2-vil-b", "ade20k"), ("t4-default", "ade20k-linear"),
              ("t4d-parallel", "ade20k-linear"), ("t4a-quad", "ade20k-linear")]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return make_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


@pytest.mark.parametrize("row_id,stage", ADE_STAGES)
def test_ade20k_stage_configs_train_one_step(row_id, stage, ade_root, tmp_path):
    row = registry.get_row(row_id)
    argv = runner.stage_command(row, row.stage(stage), tmp_path, None, [], None, None)
    tiny = _tiny_config(tmp_path, ade_root)
    extra = ["--config", str(tiny), "--model.init_args.model_kwargs.depth", "2", *ONE_STEP]
    if stage == "ade20k-linear":  # linear head on the last tap: block 3 of 2 pairs, pair 1 when parallel
        extra += ["--model.init_args.out_indices", "[1]" if "parallel" in row_id else "[3]"]
    # the row's switch (dotted keys) must come after the tiny config file, which sets model_kwargs whole
    switches = [a for a in argv if a.startswith("--model.init_args.model_kwargs.")]
    switch_args = [x for i, a in enumerate(argv) if a in switches for x in (a, argv[i + 1])]
    assert cli.main([*argv[3:], *extra, *switch_args]) == 0


def test_vtab_configs_parse_as_the_sweeps_options():
    from tasks.vtab.sweep import build_parser

    for size in ("tiny", "small", "base"):
        cfg = build_parser().parse_args(["--config", str(REPO / "experiments/vtab/recipe.yaml"), "--config",
                                         str(REPO / f"experiments/vtab/vil2_{size}.yaml"), "--out", "x"])
        assert cfg.model == f"vil2_{size}" and cfg.epochs == 50 and len(cfg.lrs) == 5 and len(cfg.seeds) == 5
