"""The embedded default job: train a small ViL on scikit-learn's digits on the CPU, then test it.

    python -m tasks.digits                              # the config in experiments/digits/vil_digits.yaml
    python -m tasks.digits --trainer.max_epochs 5       # any `vil fit` override
    python -m tasks.digits --ckpt_path runs/digits/version_0/checkpoints/last.ckpt   # resume that run

It is ``vil fit --config experiments/digits/vil_digits.yaml [overrides]`` followed by a test of the best
checkpoint. Each run writes its own folder, runs/digits/version_N: metrics.csv, hparams.yaml, config.yaml,
learning_curves.png, checkpoints/best.ckpt and checkpoints/last.ckpt.
"""
from __future__ import annotations

import os
import sys
import time

from tasks.cli import CommandLineError, VilCLI

DEFAULT_CONFIG = os.path.normpath(
    os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "experiments", "digits", "vil_digits.yaml"))


def run(args: list[str] | None = None) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the test metrics. Raises CommandLineError for a bad
    command line."""
    args = sys.argv[1:] if args is None else list(args)
    start = time.time()
    cli = VilCLI(args=["fit", "--config", DEFAULT_CONFIG, *args])
    trainer = cli.trainer
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")[0]
    if trainer.is_global_zero:
        log_dir = trainer.logger.log_dir
        print(f"\ndigits: test accuracy {results['test/acc']:.4f} with {trainer.checkpoint_callback.best_model_path} "
              f"({time.time() - start:.0f} s); run folder {log_dir}: metrics.csv, learning_curves.png, config, "
              f"checkpoints/")
    return results


def main(args: list[str] | None = None) -> int:
    try:
        run(args)
    except CommandLineError as e:
        print(f"python -m tasks.digits: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
