"""The ``vil`` command line: LightningCLI's ``fit``, ``validate``, ``test`` and ``predict`` for any task module
(a ``tasks.base.BackboneModule`` subclass, given by class_path like the data module), plus extra commands
registered in ``COMMANDS``.

    vil fit --config experiments/digits/vil_digits.yaml --trainer.devices 1
    vil fit --config experiments/digits/vil_digits.yaml --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    vil test --config experiments/digits/vil_digits.yaml --ckpt_path runs/digits/version_0/checkpoints/best.ckpt

A fit resumed from a checkpoint inside a run folder of ``tasks.loggers.RunLogger`` logs into that folder;
its config is written beside the original as ``config_resume_1.yaml`` (then ``_2``, ...), the original
``config.yaml`` is kept.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from tasks.base import BackboneModule
from tasks.loggers import RunLogger
from vil.checkpoint import CheckpointError, read_checkpoint

# Extra commands besides the Trainer's: name -> callable(argv) -> exit code, or "module:function" naming one
# (imported only when the command runs, so that `vil fit` does not import every task's dependencies). The first
# line of the callable's docstring is its help.
COMMANDS: dict[str, str | Callable[[list[str]], int]] = {
    "vtab": "tasks.vtab.sweep:main",
    "segment": "tasks.segmentation.predict:main",
    "robustness": "tasks.imagenet.robustness:main",
    "list": "tasks.rows:list_main",
    "run": "tasks.rows:run_main",
    "report": "tasks.rows:report_main",
}


def command(name: str) -> Callable[[list[str]], int]:
    """The callable registered in ``COMMANDS`` under ``name``."""
    target = COMMANDS[name]
    if isinstance(target, str):
        module, _, function = target.partition(":")
        target = getattr(importlib.import_module(module), function)
    return target

_DESCRIPTION = "Vision-LSTM training and evaluation (LightningCLI)."
_EXAMPLES = {"model": "--model tasks.classification.ClassificationModule", "data": "--data tasks.digits.data.DigitsDataModule"}

# ckpt_path values that Lightning resolves to a file itself.
_LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")


class CommandLineError(Exception):
    """A mistake in the command line or the config; ``main`` prints it as one line and exits with 2."""


class RunConfig(SaveConfigCallback):
    """Saves the parsed config into the run folder as ``config.yaml``; when the folder already has one (a
    resumed run), as ``config_resume_1.yaml`` (``_2``, ...) beside it, so the original stays."""

    def setup(self, trainer, pl_module, stage):
        if not self.already_saved:
            self.config_filename = _free_filename(trainer.log_dir, self.config_filename)
        super().setup(trainer, pl_module, stage)


def _free_filename(folder: str | None, filename: str) -> str:
    if folder is None or not os.path.exists(os.path.join(folder, filename)):
        return filename
    stem, ext = os.path.splitext(filename)
    n = 1
    while os.path.exists(os.path.join(folder, f"{stem}_resume_{n}{ext}")):
        n += 1
    return f"{stem}_resume_{n}{ext}"


class VilCLI(LightningCLI):
    """LightningCLI with the task module and data module chosen by class_path, a config saved per run
    (``RunConfig``), and checks that turn a missing data module or an unreadable ``--ckpt_path`` into a
    ``CommandLineError`` before anything is instantiated or written."""

    def __init__(self, args: list[str] | None = None, **kwargs):
        kwargs.setdefault("save_config_callback", RunConfig)
        # The list of extra commands imports their modules (and the extras they need): only for the help text.
        wants_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if args is None else args))
        epilog = _extra_commands_help() if wants_help else None
        kwargs.setdefault("parser_kwargs", {"prog": "vil", "description": _DESCRIPTION, "epilog": epilog})
        super().__init__(BackboneModule, subclass_mode_model=True, subclass_mode_data=True, args=args, **kwargs)

    def add_core_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        # The model is optional while parsing so that a run without one gets the same one-line error as a run
        # without data (parse_arguments) instead of the parser's.
        parser.add_lightning_class_args(BackboneModule, "model", subclass_mode=True, required=False)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True, required=False)

    def parse_arguments(self, parser, args):
        with warnings.catch_warnings():
            # main() always passes the arguments explicitly, also when they come from sys.argv.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        missing = [key for key in ("model", "data") if config.get(key) is None]
        if missing:
            flags = " and ".join(f"--{key} CLASS_PATH" for key in missing)
            examples = " ".join(_EXAMPLES[key] for key in missing)
            raise CommandLineError(
                f"no {' and no '.join(missing)} configured: pass a config that sets {'them' if len(missing) > 1 else 'it'}"
                f" (e.g. --config experiments/digits/vil_digits.yaml) or {flags} (e.g. {examples})"
            )
        # Lightning torch.loads the checkpoint's hyperparameters right after parsing; check the file first.
        self.ckpt_global_step = None
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in _LIGHTNING_CKPT_NAMES:
            self.ckpt_global_step = _checkpoint_step(ckpt_path)

    def before_fit(self):
        if self.ckpt_global_step is not None and isinstance(self.trainer.logger, RunLogger):
            self.trainer.logger.resume(self.config.fit.ckpt_path, self.ckpt_global_step)


def _checkpoint_step(path: str) -> int:
    """The global step of a Lightning checkpoint file; CommandLineError for anything else."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise CommandLineError(f"--ckpt_path: {e}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CommandLineError(
            f"--ckpt_path {path} is not a Lightning checkpoint of a run (no state_dict / global_step); "
            f"to start from other weights, use --model.init_args.checkpoint"
        )
    return int(ckpt["global_step"])


def _extra_commands_help() -> str | None:
    if not COMMANDS:
        return None
    lines = []
    for name in sorted(COMMANDS):
        try:
            doc = (command(name).__doc__ or "").strip().splitlines()
        except ImportError as e:  # an optional extra that is not installed
            doc = [f"unavailable: {e}"]
        lines.append(f"{name} ({doc[0].rstrip('.')})" if doc else name)
    return f"other commands: {'; '.join(lines)}. Run `vil COMMAND --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vil`` (and ``vil-classify``) console scripts; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return command(argv[0])(argv[1:])
    try:
        VilCLI(args=argv or ["--help"])
    except CommandLineError as e:
        print(f"vil: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # jsonargparse's errors (already printed) and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 2 if not argv else code
    return 0


if __name__ == "__main__":
    sys.exit(main())
