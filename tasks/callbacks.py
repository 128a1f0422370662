"""Callbacks shared by the tasks."""
from __future__ import annotations

import csv
import os
from collections import defaultdict

import lightning as L


class LearningCurves(L.Callback):
    """Writes ``learning_curves.png`` beside the CSV logger's ``metrics.csv``: losses and the monitored
    accuracy per epoch, redrawn after every validation so an interrupted run still has its plot."""

    def __init__(self, filename: str = "learning_curves.png"):
        self.filename = filename

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.is_global_zero:
            trainer.logger.save()
            self.plot(trainer)

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            trainer.logger.save()
            self.plot(trainer)

    def plot(self, trainer) -> str | None:
        log_dir = getattr(trainer.logger, "log_dir", None)
        path = os.path.join(log_dir or "", "metrics.csv")
        if not log_dir or not os.path.isfile(path):
            return None
        series = read_metrics(path)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for key in ("train/loss_epoch", "val/loss"):
            if series[key]:
                ax_loss.plot(*zip(*series[key]), marker="o", label=key)
        for key in ("val/acc", "test/acc"):
            if series[key]:
                ax_acc.plot(*zip(*series[key]), marker="o", label=key)
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        out = os.path.join(log_dir, self.filename)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


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
