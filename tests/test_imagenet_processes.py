"""ImageNet task in separate processes: a SIGKILLed fit resumed mid-epoch ends bitwise where an unbroken one
does; 2-process DDP (gloo, CPU) validation gives the metrics of one process on an uneven val set; 2-process
training ends where one process with the same global batch does."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_imagenet import CONFIGS, ROOT, TINY_KWARGS, make_tree

VIL = str(Path(sys.executable).parent / "vil")
STRIP = ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
         "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in STRIP and not k.startswith(("PL_", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


# Runs `vil fit` in this process with a callback that SIGKILLs it at the start of a given step.
FIT_SCRIPT = """
import os, signal, sys
import lightning as L
from tasks import cli

class KillAtStep(L.Callback):
    def __init__(self, step: int = -1):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(cli.main(sys.argv[1:]))
"""


def fit_args(tree, out, kill_step: int | None, workers: int, *extra) -> list[str]:
    """`vil fit` of a tiny row; last.ckpt every 2 steps and, unless kill_step is None, a SIGKILL at that step."""
    callbacks = [{"class_path": "tasks.callbacks.ResumeCheckpoint", "init_args": {"every_n_train_steps": 2}}]
    if kill_step is not None:
        callbacks.append({"class_path": "__main__.KillAtStep", "init_args": {"step": kill_step}})
    kwargs = {**TINY_KWARGS, "drop_path_rate": 0.1}  # stochastic depth and batch mixing both draw random numbers
    return ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "vil2_tiny_e800.yaml"),
            "--data.init_args.root", str(tree), "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", str(workers), "--data.init_args.img_size", "16",
            "--model.init_args.model", "vil2_nano", "--model.init_args.num_classes", "3",
            "--model.init_args.global_batch_size", "null", "--model.init_args.model_kwargs", json.dumps(kwargs),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.callbacks", json.dumps(callbacks), *extra]


def run_fit(args, timeout=240):
    return subprocess.run(["timeout", "-k", "10", str(timeout), sys.executable, "-c", FIT_SCRIPT, *args],
                          env=clean_env(), cwd=ROOT, capture_output=True, text=True)


def _kill_and_resume(tmp_path, workers):
    tree = make_tree(tmp_path / "tree")  # 18 training images: 4 steps of 4 per epoch
    unbroken = run_fit(fit_args(tree, tmp_path / "unbroken", -1, workers))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    killed = run_fit(fit_args(tree, tmp_path / "killed", 7, workers))
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert (state["global_step"], state["epoch"], state["ImageNetDataModule"]["batches"]) == (6, 1, 2), \
        "killed at step 7: the last checkpoint is step 6, mid-epoch 1"
    resumed = run_fit(fit_args(tree, tmp_path / "killed", -1, workers, "--ckpt_path", str(last)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "unbroken" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["optimizer_states"][0]["state"]:
        assert torch.equal(a["optimizer_states"][0]["state"][key]["exp_avg"],
                           b["optimizer_states"][0]["state"][key]["exp_avg"])


def test_sigkilled_fit_resumes_mid_epoch_to_bitwise_the_same_weights(tmp_path):
    _kill_and_resume(tmp_path, workers=0)


@pytest.mark.slow
def test_sigkilled_fit_with_loader_workers_resumes_bitwise(tmp_path):
    _kill_and_resume(tmp_path, workers=2)


def _validate(tree, out, devices: int, ckpt) -> dict:
    logger = {"class_path": "tasks.loggers.RunLogger", "init_args": {"save_dir": str(out)}}
    args = ["validate", "--config", str(CONFIGS / "eval.yaml"), "--model.model", "vil2_nano",
            "--model.checkpoint", str(ckpt), "--model.num_classes", "3", "--model.model_kwargs",
            json.dumps(TINY_KWARGS), "--data.root", str(tree), "--data.img_size", "16", "--data.batch_size", "2",
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false"]
    env = clean_env()
    env["PL_TORCH_DISTRIBUTED_BACKEND"] = "gloo"
    proc = subprocess.run(["timeout", "-k", "10", "240", VIL, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if devices > 1:
        assert f"Starting with {devices} processes" in proc.stdout + proc.stderr
    with open(out / "version_0" / "metrics.csv", newline="") as f:
        return {k: float(v) for k, v in next(csv.DictReader(f)).items() if v and k.startswith("val/")}


def test_two_process_ddp_validation_equals_one_process_on_an_uneven_val_set(tmp_path):
    import vil

    tree = make_tree(tmp_path / "tree", n_val=4, special=False)
    (tree / "val" / "n01484850" / "n01484850_3.JPEG").unlink()  # 11 val images: ranks get 6 and 5
    model = vil.create_model("vil2_nano", num_classes=3, **TINY_KWARGS)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # predictions that differ between images
    ckpt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), ckpt)
    one = _validate(tree, tmp_path / "one", 1, ckpt)
    two = _validate(tree, tmp_path / "two", 2, ckpt)
    assert set(one) == {"val/acc", "val/loss"}
    assert two["val/acc"] == one["val/acc"], "every image counted once, none twice"
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)
    assert round(one["val/acc"] * 11) == pytest.approx(one["val/acc"] * 11, abs=1e-6), "a share of 11 images"


def _fit_ddp(tree, out, devices: int, batch_size: int, data_seed: int = 0):
    args = fit_args(tree, out, None, 0, "--data.init_args.batch_size", str(batch_size),
                    "--data.init_args.seed", str(data_seed),
                    # a large lr without warmup, so that the weights move far from where they started
                    "--model.init_args.lr", "0.5", "--model.init_args.warmup_epochs", "0",
                    "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
                    "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                    # no batch mixing (it pairs images within a process's batch) and no stochastic depth
                    "--model.init_args.mixup_alpha", "0", "--model.init_args.cutmix_alpha", "0",
                    "--model.init_args.model_kwargs", json.dumps(TINY_KWARGS), "--trainer.limit_val_batches", "0")
    env = clean_env()
    env["PL_TORCH_DISTRIBUTED_BACKEND"] = "gloo"
    proc = subprocess.run(["timeout", "-k", "10", "240", VIL, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "version_0" / "metrics.csv", newline="") as f:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return torch.load(out / "version_0" / "checkpoints" / "last.ckpt", weights_only=True), losses


def test_two_process_ddp_training_matches_one_process_with_the_same_global_batch(tmp_path):
    # 18 images, global batch 6: one process x 6 or two x 3. The sampler deals each epoch's permutation to the
    # ranks round-robin and seeds each image's augmentation by its index, so both runs see the same images with
    # the same augmentations in every step; DDP averages the two halves' gradients into the full batch's.
    tree = make_tree(tmp_path / "tree", n_train=6, special=False)
    one, one_losses = _fit_ddp(tree, tmp_path / "one", 1, 6)
    two, two_losses = _fit_ddp(tree, tmp_path / "two", 2, 3)
    other, _ = _fit_ddp(tree, tmp_path / "other", 2, 3, data_seed=1)  # another order: must end elsewhere
    assert one["global_step"] == two["global_step"] == other["global_step"] == 6
    assert len(one_losses) == 6 and len(two_losses) == 6  # rank 0 logs its half-batch loss

    def max_diff(a, b):
        return max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])

    print(f'max weight difference: 1 vs 2 processes {max_diff(one, two):.2e}, other order {max_diff(one, other):.2e}')
    assert max_diff(one, two) < 5e-5  # float sums in another order (measured: about 4e-6)
    assert max_diff(one, other) > 1e-3  # the comparison can tell runs apart
