"""The embedded default job: train a small ViL on scikit-learn's digits on the CPU, then test it.

    python -m tasks.digits                              # the config in experiments/digits/vil_digits.yaml
    python -m tasks.digits --trainer.max_epochs 5       # any LightningCLI override

Writes under trainer.default_root_dir (runs/digits): checkpoints/best.ckpt and last.ckpt, metrics.csv,
learning_curves.png and config.yaml.
"""
from __future__ import annotations

import os
import sys
import time

from lightning.pytorch.cli import LightningCLI

from tasks.classification import ClassificationModule

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "digits", "vil_digits.yaml")


def main(args: list[str] | None = None) -> dict[str, float]:
    args = sys.argv[1:] if args is None else list(args)
    cli = LightningCLI(ClassificationModule, subclass_mode_data=True, run=False,
                       save_config_kwargs={"overwrite": True}, args=["--config", os.path.normpath(DEFAULT_CONFIG), *args])
    start = time.time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    best = cli.trainer.checkpoint_callback.best_model_path or None
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best)[0]
    if cli.trainer.is_global_zero:
        log_dir = cli.trainer.logger.log_dir
        print(f"\ndigits: test accuracy {results['test/acc']:.4f} with {best} "
              f"({time.time() - start:.0f} s); metrics {os.path.join(log_dir, 'metrics.csv')}, "
              f"plot {os.path.join(log_dir, 'learning_curves.png')}")
    return results


if __name__ == "__main__":
    main()
