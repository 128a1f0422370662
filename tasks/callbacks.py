"""Callbacks shared by the tasks."""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence

from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class LearningCurves(L.Callback):
    """Writes ``learning_curves.png`` beside the logger's ``metrics.csv``: the ``losses`` in the left panel and
    the ``scores`` in the right one, per epoch.

    An epoch's metrics reach the file only after its validation and its training-epoch end, so the plot is
    redrawn when they are there: at the start of each training epoch (for the one before), at the end of
    training and after testing. An interrupted run keeps the plot of its last full epoch.

    Args:
        losses / scores: metric names (columns of metrics.csv); missing ones are left out of the plot.
        loss_label / score_label: the panels' y-axis labels.
    """

    def __init__(self, losses: Sequence[str] = ("train/loss_epoch", "val/loss"),
                 scores: Sequence[str] = ("val/acc", "test/acc"),
                 loss_label: str = "cross-entropy", score_label: str = "top-1 accuracy",
                 filename: str = "learning_curves.png"):
        self.losses, self.scores = list(losses), list(scores)
        self.loss_label, self.score_label = loss_label, score_label
        self.filename = filename

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self._redraw(trainer)

    def on_train_end(self, trainer, pl_module):
        self._redraw(trainer)

    def on_test_end(self, trainer, pl_module):
        self._redraw(trainer)

    def _redraw(self, trainer):
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.save()
            self.plot(trainer)

    def plot(self, trainer) -> dict[str, list[tuple[float, float]]] | None:
        """Draw the curves from metrics.csv; returns the series drawn, {metric: [(epoch, value), ...]}, or None
        when there is no metrics.csv yet."""
        log_dir = getattr(trainer.logger, "log_dir", None)
        path = os.path.join(log_dir or "", "metrics.csv")
        if not log_dir or not os.path.isfile(path):
            return None
        series = read_metrics(path)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        drawn = {}
        fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
        for ax, keys in ((ax_loss, self.losses), (ax_score, self.scores)):
            for key in keys:
                if series.get(key):
                    drawn[key] = series[key]
                    ax.plot(*zip(*series[key]), marker="o", label=key)
        ax_loss.set(xlabel="epoch", ylabel=self.loss_label, title="loss")
        ax_score.set(xlabel="epoch", ylabel=self.score_label, title="score")
        for ax in (ax_loss, ax_score):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(log_dir, self.filename), dpi=100)
        plt.close(fig)
        return drawn


def read_metrics(path: str) -> dict[str, list[tuple[float, float]]]:
    """(epoch, value) pairs per metric column of a Lightning CSVLogger file."""
    series = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None) and epoch not in ("", None):
                    series[key].append((float(epoch), float(value)))
    return series


class CPUThreads(L.Callback):
    """Sets PyTorch's intra-op threads for the run (and restores them after): a tiny model's ops are too small
    to split, and with the default one thread per core they collapse when the cores are shared (on 2 busy
    cores a tiny forward took 10 s with two threads, 0.27 s with one). OMP_NUM_THREADS in the environment
    wins: then the threads are left as set.

    Args:
        num_threads: intra-op threads while the Trainer runs.
    """

    def __init__(self, num_threads: int = 1):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self._before: int | None = None

    def setup(self, trainer, pl_module, stage):
        if "OMP_NUM_THREADS" in os.environ or self._before is not None:
            return
        self._before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)

    def teardown(self, trainer, pl_module, stage):
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, each file written to ``<name>.tmp`` and moved into place with
    ``os.replace``: a process killed while saving leaves the previous checkpoint whole."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("AtomicCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class ResumeCheckpoint(AtomicCheckpoint):
    """The newest state of a run in one file (``last.ckpt``), written atomically every ``every_n_train_steps``
    optimizer steps, at the end of each training epoch and at the end of training. Resuming from it with
    ``--ckpt_path`` continues mid-epoch where the data module keeps its position (``ImageNetDataModule``).

    Args:
        every_n_train_steps: steps between saves (besides those at epoch ends).
        filename: the file's name without ``.ckpt``.
    """

    def __init__(self, every_n_train_steps: int = 1000, filename: str = "last", dirpath: str | None = None):
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, filename=filename, every_n_train_steps=every_n_train_steps, save_top_k=1,
                         enable_version_counter=False)

    def _save_newest(self, trainer) -> None:
        if self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module):
        self._save_newest(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save_newest(trainer)
