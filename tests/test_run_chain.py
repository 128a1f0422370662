"""`vil run` on a real chained row (t7-vil-t-e400: ImageNet pre-training -> fine-tuning -> VTAB-1K transfer) with
tiny models and fixture data on the CPU, killed by SIGKILL in the second stage and restarted; then `vil report`
on the finished runs."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_imagenet import TINY_KWARGS, make_tree as make_imagenet
from test_vtab import make_tree as make_vtab

from experiments.rows import IMAGENET_TRAIN_IMAGES, get_row
from tasks import rows as runner

REPO = Path(__file__).resolve().parents[1]
ROW = "t7-vil-t-e400"


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")
           and not k.startswith(("PL_", "SLURM_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_args(out: Path, imagenet: Path, vtab: Path) -> list[str]:
    fit = ["--data.init_args.root", str(imagenet), "--data.init_args.batch_size", "4",
           "--data.init_args.num_workers", "0", "--data.init_args.img_size", "16",
           "--model.init_args.model", "vil2_nano", "--model.init_args.num_classes", "3",
           "--model.init_args.global_batch_size", "null", "--model.init_args.model_kwargs", json.dumps(TINY_KWARGS),
           "--model.init_args.warmup_epochs", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
           "--trainer.precision", "32-true", "--trainer.log_every_n_steps", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    vtab_args = ["--model", "vil2_nano", "--model-kwargs", json.dumps({k: TINY_KWARGS[k] for k in ("dim", "depth", "patch_size")}),
                 "--img-size", "16", "--data-root", str(vtab), "--tasks", "dtd", "--lrs", "1e-3", "--seeds", "0",
                 "--epochs", "1", "--warmup-epochs", "0.5", "--batch-size", "4", "--eval-batch-size", "4",
                 "--accelerator", "cpu", "--progress", "false"]
    return [sys.executable, "-m", "tasks.cli", "run", ROW, "--out", str(out), "--stages", "pretrain,finetune,vtab",
            "@pretrain,finetune", *fit, "@pretrain", "--trainer.max_epochs", "1",
            "@finetune", "--trainer.max_epochs", "12", "@vtab", *vtab_args]


def is_rich_png(path: Path) -> bool:
    """A valid PNG with drawn content: many colours, not a blank canvas."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path)
    img.verify()
    arr = np.asarray(Image.open(path).convert("RGB"))
    return arr.shape[0] > 200 and arr.shape[1] > 200 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 20 \
        and (arr < 128).any(axis=-1).mean() > 0.01


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")
    imagenet = make_imagenet(base / "imagenet", special=False)
    vtab = make_vtab(base / "vtab", tasks={"dtd": "dtd"})
    out = base / "out"
    argv = run_args(out, imagenet, vtab)
    row = get_row(ROW)
    finetune_ckpt = out / ROW / "finetune" / "version_0" / "checkpoints" / "last.ckpt"
    log = open(base / "first.log", "w")
    proc = subprocess.Popen(argv, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while not finetune_ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its `vil fit` child: one process group
    proc.wait()
    log.close()
    status_after_kill = {s.name: runner.stage_status(out, row, s) for s in row.stages}
    pretrain_done = (out / ROW / "pretrain" / "done.json").read_text()
    second = subprocess.run(argv, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    return dict(out=out, killed=killed, status_after_kill=status_after_kill, pretrain_done=pretrain_done,
                second=second, first_log=(base / "first.log").read_text(), row=row)


def test_killed_second_stage_resumes_and_the_first_is_not_rerun(chain):
    out, second = chain["out"], chain["second"]
    assert chain["killed"], "the fine-tuning stage finished before it could be killed:\n" + chain["first_log"]
    assert chain["status_after_kill"] == {"pretrain": "done", "finetune": "stopped", "vtab": "not run",
                                          "ade20k": "not run", "ade20k-ms": "not run"}
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"[{ROW}] 1/5 pretrain: done, skipped" in second.stdout
    assert f"[{ROW}] 2/5 finetune: resuming" in second.stdout
    # The first stage ran once: one run folder, its marker untouched.
    assert [p.name for p in (out / ROW / "pretrain").glob("version_*")] == ["version_0"]
    assert (out / ROW / "pretrain" / "done.json").read_text() == chain["pretrain_done"]
    # The second continued in its run folder from last.ckpt (RunLogger's resumed config) and ran all 12 epochs.
    ft = out / ROW / "finetune"
    assert [p.name for p in ft.glob("version_*")] == ["version_0"]
    assert (ft / "version_0" / "config_resume_1.yaml").is_file()
    with open(ft / "version_0" / "metrics.csv", newline="") as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val/acc")]
    assert epochs == list(range(12))  # each epoch validated once: the rows after the checkpoint were redone, not doubled
    # Each stage started from the previous stage's checkpoint.
    ft_done = json.loads((ft / "done.json").read_text())
    pre_done = json.loads(chain["pretrain_done"])
    assert ft_done["argv"][ft_done["argv"].index("--model.init_args.checkpoint") + 1] == pre_done["checkpoint"]
    vtab_done = json.loads((out / ROW / "vtab" / "done.json").read_text())
    assert vtab_done["argv"][vtab_done["argv"].index("--checkpoint") + 1] == ft_done["checkpoint"]
    assert ft_done["checkpoint"].endswith("finetune/version_0/checkpoints/last.ckpt")
    assert (out / ROW / "vtab" / "results.csv").is_file()
    assert runner.row_status(out, chain["row"]) == "stopped (3/5 stages done)"
    # A third run has nothing to do for the selected stages.
    third = subprocess.run(chain["second"].args, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.count("done, skipped") == 3


def test_report_on_the_finished_runs(chain, tmp_path, capsys):
    out = chain["out"]
    # A benchmark.csv in experiments/benchmark.py's summary format, as the t6-runtime row leaves it.
    bench = out / "t6-runtime" / "benchmark"
    bench.mkdir(parents=True)
    lines = ["size,res,task,vil_img_s,vil_mode,deit_img_s,deit_mode"]
    for size, scale in (("tiny", 1.0), ("small", 0.5)):
        for res, img_s in ((224, 6000.0), (512, 900.0), (1024, 200.0)):
            lines += [f"{size},{res},train,{img_s * scale},cudagraphs,{3 * img_s * scale},cudagraphs",
                      f"{size},{res},infer,{3 * img_s * scale},cudagraphs,{9 * img_s * scale},cudagraphs"]
    (bench / "benchmark.csv").write_text("\n".join(lines) + "\n")
    (bench / "done.json").write_text(json.dumps({"folder": str(bench)}))

    assert runner.report_main([str(out), "--dest", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    ft_acc = runner.read_metrics_csv(out / ROW / "finetune" / "version_0" / "metrics.csv")["val/acc"] * 100
    assert f"| {ROW} | ViL-T 400+20 -> VTAB-1K, ADE20K | IN-1K | 77.2 | {ft_acc:.2f} | {ft_acc - 77.2:+.2f} |" in text
    assert "## Table 7" in text and "## Table 6" in text
    # Table 6: 10 epochs at the tiny model's 6,000 img/s = 12,811,670 / 6,000 s.
    hours = 10 * IMAGENET_TRAIN_IMAGES / 6000.0 / 3600
    assert f"| T (h) | 5 | {hours:.2f} | {hours - 5.0:+.2f} |" in text
    for png in ("accuracy_vs_flops.png", "throughput.png"):
        assert is_rich_png(tmp_path / png), png
