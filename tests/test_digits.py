import csv
import os

import lightning as L
from lightning.pytorch.callbacks import LambdaCallback
import pytest
import torch
import yaml

from tasks.callbacks import CPUThreads, LearningCurves
from tasks.classification import ClassificationModule
from tasks.digits.__main__ import DEFAULT_CONFIG, run
from tasks.digits.data import DigitsDataModule
from tasks.loggers import RunLogger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_digits_job_learns_and_writes_its_outputs(tmp_path, capsys):
    """The embedded default job, shortened: it must learn, checkpoint, log a CSV and draw the curves."""
    args = ["--trainer.max_epochs", "8", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    results = run(args)
    assert results["test/acc"] > 0.85  # chance is 0.1; the full 40-epoch demo reaches >= 0.95
    run_dir = tmp_path / "version_0"
    assert f"test accuracy {results['test/acc']:.4f}" in capsys.readouterr().out
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml", "hparams.yaml"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "learning_curves.png").stat().st_size > 10_000
    rows = _rows(run_dir / "metrics.csv")
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_acc) == 8 and val_acc[-1] > val_acc[0]
    train_loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(train_loss) == 8 and train_loss[-1] < train_loss[0]
    assert len([r for r in rows if r.get("test/acc")]) == 1

    # --ckpt_path resumes that run: it has reached max_epochs, so only the test runs again, in the same folder
    again = run([*args, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert sorted(os.listdir(tmp_path)) == ["version_0"]
    assert again["test/acc"] == pytest.approx(results["test/acc"])


@pytest.mark.slow
def test_full_digits_demo_reaches_95_percent(tmp_path):
    results = run(["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                   str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert results["test/acc"] >= 0.95


def test_learning_curves_have_every_epoch_when_drawn(tmp_path, monkeypatch):
    """The plot is drawn when the epoch's metrics are in metrics.csv, so the last plot of an N-epoch fit has
    N points for the training loss and the validation accuracy. (Also: CPUThreads holds during the fit.)"""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = []
    seen = LambdaCallback(on_train_batch_start=lambda *args: threads.append(torch.get_num_threads()))
    curves = LearningCurves()
    drawn = []
    plot = curves.plot
    curves.plot = lambda trainer: drawn.append(plot(trainer)) or drawn[-1]
    module = ClassificationModule(model="vil2_digits", num_classes=10, compile="none",
                                  model_kwargs=dict(dim=32, depth=1, mlstm_form="chunkwise"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=3, limit_val_batches=2,
                        num_sanity_val_steps=0, logger=RunLogger(tmp_path), callbacks=[curves, CPUThreads(1), seen],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert drawn and drawn[-1] is not None
    assert len(drawn[-1]["train/loss_epoch"]) == 3 and len(drawn[-1]["val/acc"]) == 3
    assert [e for e, _ in drawn[-1]["val/acc"]] == [0, 1, 2]
    assert (tmp_path / "version_0" / "learning_curves.png").is_file()
    assert threads and set(threads) == {1}


def test_learning_curves_take_their_metric_names(tmp_path):
    with open(tmp_path / "metrics.csv", "w") as f:
        f.write("epoch,step,seg/loss,seg/miou,other\n0,1,0.5,,\n0,1,,0.3,7\n1,2,0.4,,\n1,2,,0.4,8\n")

    class Logged:  # what plot() reads of a trainer
        logger = type("L", (), {"log_dir": str(tmp_path)})()

    drawn = LearningCurves(losses=["seg/loss"], scores=["seg/miou", "absent"], score_label="mIoU").plot(Logged)
    assert drawn == {"seg/loss": [(0.0, 0.5), (1.0, 0.4)], "seg/miou": [(0.0, 0.3), (1.0, 0.4)]}
    assert (tmp_path / "learning_curves.png").is_file()


def test_cpu_threads_sets_and_restores_unless_omp_num_threads_is_set(monkeypatch):
    start = torch.get_num_threads()
    other = 2 if start == 1 else 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    callback = CPUThreads(num_threads=other)
    callback.setup(None, None, "fit")
    assert torch.get_num_threads() == other
    callback.teardown(None, None, "fit")
    assert torch.get_num_threads() == start

    monkeypatch.setenv("OMP_NUM_THREADS", str(start))
    callback.setup(None, None, "fit")
    assert torch.get_num_threads() == start, "OMP_NUM_THREADS wins"
    callback.teardown(None, None, "fit")
    assert torch.get_num_threads() == start
    with pytest.raises(ValueError):
        CPUThreads(num_threads=0)


def test_digits_config_runs_on_one_cpu_thread():
    with open(DEFAULT_CONFIG) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    assert {"class_path": "tasks.callbacks.CPUThreads", "init_args": {"num_threads": 1}} in callbacks
