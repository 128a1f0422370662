import csv
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tasks import cli
from tasks.callbacks import LearningCurves

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "digits" / "vil_digits.yaml")


def _fit_args(out: Path, epochs: int, *extra: str) -> list[str]:
    """`vil fit` with the digits config, shrunk to a few batches of a one-pair model, writing under out."""
    return ["fit", "--config", CONFIG, "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--model.init_args.model_kwargs", '{"dim": 32, "depth": 1, "mlstm_form": "chunkwise"}', *extra]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_import_vil_does_not_import_lightning():
    code = "import vil, sys; assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_a_fit_imports_no_extra_command_module():
    # The extra commands' modules pull in their extras (mmseg, tfds); only `vil --help` lists (imports) them.
    code = (
        "import sys\n"
        "from tasks import cli\n"
        "try:\n"
        "    cli.VilCLI(args=['fit', '--config', 'experiments/digits/vil_digits.yaml', '--print_config'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "modules = [t.partition(':')[0] for t in cli.COMMANDS.values() if isinstance(t, str)]\n"
        "assert modules, 'no extra commands registered'\n"
        "loaded = [m for m in modules if m in sys.modules]\n"
        "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT, capture_output=True)


def test_console_scripts():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vil"] == scripts["vil-classify"] == "tasks.cli:main"


def test_help_lists_trainer_and_extra_commands(monkeypatch, capsys):
    def report(argv):
        """Summarize runs."""
        return 3 if argv == ["--x"] else 1

    monkeypatch.setitem(cli.COMMANDS, "report", report)
    for argv, code in ((["--help"], 0), ([], 2)):
        assert cli.main(argv) == code
        out = capsys.readouterr().out
        for name in ("fit", "validate", "test", "predict", "report (Summarize runs)"):
            assert name in out, (argv, name)
    assert cli.main(["report", "--x"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["fit"], "no model and no data configured"),
    (["fit", "--model", "tasks.classification.ClassificationModule"], "no data configured"),
])
def test_fit_without_data_is_a_one_line_error_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert "--config experiments/digits/vil_digits.yaml" in err and "--data" in err
    assert os.listdir(tmp_path) == []


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoint(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "pickle":
        torch.save({"state_dict": {}, "global_step": 0, "x": _Payload(folder.parent / "PWNED")}, path)
    elif kind == "weights":
        torch.save({"w": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found"), ("text", "text.ckpt"),
    ("pickle", "refusing to unpickle"), ("weights", "not a Lightning checkpoint"),
])
def test_bad_ckpt_path_is_a_clear_error(kind, message, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ckpt = _bad_checkpoint(kind, inputs)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--config", CONFIG, "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path" in err and message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["inputs"], "nothing written: no runs/ or lightning_logs/, no PWNED"


def test_each_run_gets_its_own_folder_and_last_ckpt_is_the_last_epoch(tmp_path):
    assert cli.main(_fit_args(tmp_path, 3)) == 0
    assert cli.main(_fit_args(tmp_path, 1)) == 0
    assert sorted(os.listdir(tmp_path)) == ["version_0", "version_1"]
    for run, epochs in (("version_0", 3), ("version_1", 1)):
        run_dir = tmp_path / run
        assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.yaml", "hparams.yaml", "learning_curves.png",
                                               "metrics.csv"]
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["best.ckpt", "last.ckpt"]
        val_acc = [float(r["val/acc"]) for r in _rows(run_dir / "metrics.csv") if r.get("val/acc")]
        assert len(val_acc) == epochs
        last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
        assert last["epoch"] == epochs - 1
        assert best["epoch"] == val_acc.index(max(val_acc))
        assert f"max_epochs: {epochs}" in (run_dir / "config.yaml").read_text()


def test_killed_run_resumes_into_its_folder_and_continues_metrics(tmp_path, monkeypatch):
    # 3 steps per epoch; killed mid-epoch 2, after last.ckpt of epoch 1 (global step 6)
    def kill(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 8:
            raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(LearningCurves, "on_train_batch_end", kill, raising=False)
        with pytest.raises(RuntimeError, match="killed"):
            cli.main(_fit_args(tmp_path, 4))
    run_dir = tmp_path / "version_0"
    assert (run_dir / "learning_curves.png").is_file(), "an interrupted run keeps its plot"
    steps_before = [int(r["step"]) for r in _rows(run_dir / "metrics.csv")]
    assert max(steps_before) >= 6, "the killed epoch's first steps were on disk"
    original_config = (run_dir / "config.yaml").read_text()

    assert cli.main(_fit_args(tmp_path, 4, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))) == 0
    assert os.listdir(tmp_path) == ["version_0"]
    rows = _rows(run_dir / "metrics.csv")
    for key in ("val/acc", "train/loss_epoch"):
        assert [int(r["epoch"]) for r in rows if r.get(key)] == [0, 1, 2, 3], key
    step_rows = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert step_rows == list(range(12)), "each training step once"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best.ckpt", "last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    assert (run_dir / "config.yaml").read_text() == original_config
    assert "ckpt_path: " + str(run_dir / "checkpoints" / "last.ckpt") in (run_dir / "config_resume_1.yaml").read_text()
