"""ImageNet-1K classification: ``ClassificationModule`` with the checks a long recipe run needs before it
starts (the classes of the data, the global batch of the recipe, a checkpoint's head) and a count of the
files the data module skipped."""
from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_warn

from tasks.classification import ClassificationModule
from vil.checkpoint import extract_state_dict, read_checkpoint


class RecipeError(ValueError):
    """A run whose data, batch or checkpoint does not fit the configured recipe."""


class ImageNetClassificationModule(ClassificationModule):
    """Args (besides ``ClassificationModule``'s):
        global_batch_size: the recipe's batch over all processes and accumulation steps (Table 10: 2048 in
            pre-training, 1024 in fine-tuning). When set, a fit whose batch_size x devices x nodes x
            accumulate_grad_batches differs stops at once, naming the accumulate_grad_batches that gives it.
        require_checkpoint: refuse to start without ``checkpoint`` (fine-tuning and evaluation configs: a
            forgotten checkpoint would silently train or evaluate a fresh model).

    A ``checkpoint`` whose classifier has another number of classes than ``num_classes`` is an error here (the
    shared loader would keep a fresh head and evaluate at chance level).
    """

    def __init__(self, global_batch_size: int | None = None, require_checkpoint: bool = False, **kwargs):
        checkpoint, num_classes = kwargs.get("checkpoint"), kwargs.get("num_classes", 1000)
        if require_checkpoint and checkpoint is None:
            raise RecipeError("this config starts from weights: pass --model.init_args.checkpoint FILE (a stage-1 "
                              "last.ckpt of this suite, or released weights such as vil2_tiny16_e800_in1k.th)")
        if checkpoint is not None:
            _check_checkpoint_head(checkpoint, num_classes)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self._skipped_reported = 0

    def setup(self, stage: str):
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise RecipeError(f"the data has {data_classes} classes, the model num_classes={self.hparams.num_classes}"
                              f" (set --model.init_args.num_classes {data_classes} or point --data.init_args.root "
                              f"at the matching folder)")
        want = self.hparams.global_batch_size
        if stage == "fit" and want is not None:
            got = self._global_batch_size()
            if got != want:
                per_step = got // self.trainer.accumulate_grad_batches
                hint = (f"use --trainer.accumulate_grad_batches {want // per_step}" if want % per_step == 0
                        else f"choose a batch_size that divides {want} / (devices x nodes)")
                raise RecipeError(
                    f"global batch {got} (batch_size {dm.batch_size} x {self.trainer.world_size} processes x "
                    f"accumulate_grad_batches {self.trainer.accumulate_grad_batches}) differs from the recipe's "
                    f"{want}: {hint}, or set --model.init_args.global_batch_size null to run another batch")

    def _report_skipped(self):
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped_files", None)
        if skipped is not None and len(skipped) > self._skipped_reported:
            new = skipped[self._skipped_reported:]
            rank_zero_warn(f"{len(skipped)} files skipped so far, not decodable images (latest: {new[-1]})")
            self._skipped_reported = len(skipped)

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        self._report_skipped()

    def on_validation_epoch_end(self):
        self._report_skipped()

    def on_test_epoch_end(self):
        self._report_skipped()


def _check_checkpoint_head(checkpoint: str, num_classes: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = extract_state_dict(read_checkpoint(checkpoint))
    raw = any(k.startswith(("xlstm.", "post_blocks_norm")) or ".xlstm." in k for k in sd)
    head = sd.get("head.1.weight" if raw and "head.1.weight" in sd else "head.weight")
    if head is not None and head.shape[0] != num_classes:
        raise RecipeError(f"{checkpoint} has a classifier of {head.shape[0]} classes, the model num_classes="
                          f"{num_classes}: evaluate with --model.init_args.num_classes {head.shape[0]}, or load "
                          f"the backbone for another task through that task's module")

