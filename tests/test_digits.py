import csv

import pytest

from tasks import digits


def test_digits_job_learns_and_writes_its_outputs(tmp_path):
    """The embedded default job, shortened: it must learn, checkpoint, log a CSV and draw the curves."""
    results = digits.main([
        "--trainer.max_epochs", "8", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])
    assert results["test/acc"] > 0.85  # chance is 0.1; the full 40-epoch demo reaches >= 0.95
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_acc) == 8 and val_acc[-1] > val_acc[0]
    train_loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(train_loss) == 8 and train_loss[-1] < train_loss[0]


@pytest.mark.slow
def test_full_digits_demo_reaches_95_percent(tmp_path):
    results = digits.main(["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                           str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert results["test/acc"] >= 0.95
