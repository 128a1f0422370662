"""The run-folder logger: each run writes into its own ``save_dir/name/version_N`` folder, and a resumed run
continues the folder of the checkpoint it resumes from."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class RunLogger(CSVLogger):
    """Lightning's CSVLogger (``metrics.csv``, ``hparams.yaml``) with the next free ``version_N`` per run, and
    ``resume``: when a fit continues from ``<run>/checkpoints/*.ckpt`` of an earlier run, it logs into ``<run>``
    again. ``metrics.csv`` then keeps the rows logged before the checkpoint's global step, drops the later
    ones (the steps the resumed fit redoes) and appends; Lightning's own writer would delete the file.

    Checkpoints land in ``<run>/checkpoints`` (ModelCheckpoint's default dirpath follows the logger).
    """

    def __init__(self, save_dir: str = "runs", name: str = "", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._resume_step: int | None = None

    def resume(self, ckpt_path: str | os.PathLike, global_step: int) -> bool:
        """Log into the run folder that holds ``ckpt_path`` (``<run>/checkpoints/x.ckpt``, ``<run>`` with the
        files of a run). Returns False, changing nothing, for a checkpoint outside such a folder."""
        if self._experiment is not None:
            raise RuntimeError("resume() must come before the logger writes anything")
        ckpt_dir = Path(ckpt_path).parent
        run_dir = ckpt_dir.parent
        if ckpt_dir.name != "checkpoints" or not any(
                (run_dir / f).is_file() for f in (ExperimentWriter.NAME_METRICS_FILE, ExperimentWriter.NAME_HPARAMS_FILE)):
            rank_zero_info(f"{ckpt_path} is not in a run folder; this run gets a new folder under {self.root_dir}")
            return False
        # A run under this logger's root keeps the root as configured: ModelCheckpoint reloads its state (best
        # score, files to replace) only when its dirpath string equals the one saved in the checkpoint.
        if os.path.realpath(run_dir.parent) != os.path.realpath(self.root_dir):
            self._save_dir = self._root_dir = str(run_dir.parent)
            self._name = ""
        self._version = run_dir.name
        self._resume_step = int(global_step)
        return True

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._resume_step is not None:
            if self._fs.isfile(os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)):
                self._experiment = _ContinuedWriter(self.log_dir, keep_before_step=self._resume_step)
        return super().experiment


class _ContinuedWriter(ExperimentWriter):
    """An ExperimentWriter that continues an existing metrics.csv instead of deleting it."""

    def __init__(self, log_dir: str, keep_before_step: int):
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__ where Lightning deletes the file
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < self._keep_before_step]
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header
