"""The shared backbone LightningModule: model construction, AdamW with layer-wise lr decay, warmup + cosine
schedule by step, optional EMA, torch.compile choices and gradient clipping that works with the fused optimizer.
Tasks subclass it and add only their heads, losses, data and metrics.

It lives in ``tasks`` rather than ``vil`` so that the model package never imports Lightning."""
from __future__ import annotations

import math
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import vil

CompileChoice = Literal["none", "blocks", "blocks-cudagraphs", "model", "auto"]
COMPILE_CHOICES = get_args(CompileChoice)


class BackboneModule(L.LightningModule):
    """Args:
        model: registered model name (``vil.list_models()``).
        model_kwargs: overrides for ``vil.create_model`` (num_classes, img_size, drop_path_rate, mlstm_form, ...).
        checkpoint: weights to start from (authors' .th, state dict or a Lightning checkpoint of this suite).
        lr: peak learning rate; multiplied by global_batch / lr_scale_divisor when the divisor is set.
        layer_decay: layer-wise lr decay factor; pairs of blocks form one layer, the patch and position
            embeddings are the deepest layer and everything after the blocks is undecayed. None disables it.
        warmup_epochs / warmup_steps: linear warmup length (steps win when both are given).
        min_lr: final learning rate of the cosine schedule (scaled along with ``lr``).
        ema_decay: keep an exponential moving average of all weights; evaluation then uses the EMA.
        compile: how to torch.compile the backbone (the EMA copy always stays eager):
            ``none``; ``blocks``: each block pair on its own (``VisionLSTM.compile_blocks``, one graph shared by
            all pairs, so compile time does not grow with depth); ``blocks-cudagraphs``: the same in
            ``mode="reduce-overhead"`` (CUDA graphs, for small per-step work where launch overhead dominates);
            ``model``: ``torch.compile`` of the whole backbone; ``auto``: ``blocks-cudagraphs`` on CUDA, else
            ``none``.
        compile_kwargs: further ``torch.compile`` arguments (``backend``, ``dynamic``, ``options``, ...);
            ``blocks-cudagraphs`` sets ``mode`` itself.
        optimizer_fused: use the fused AdamW kernel; None picks it when every parameter is on CUDA.
        library: where ``model`` is registered: ``vil`` (``vil.create_model``) or ``timm`` (any timm model, e.g.
            the DeiT-III baseline built with timm's VisionTransformer; one lr layer, its blocks compiled one by
            one). A ``checkpoint`` for a timm model is read with ``torch.load(weights_only=True)`` and passed
            through the model's checkpoint filter (timm's ViT filter resamples the position embedding).

    Checkpoints of a fit hold the random number generators of every process (torch, CUDA, numpy, Python), and a
    fit resumed from one continues them: batch mixing and stochastic depth then draw what the unbroken run drew.
    """

    def __init__(
        self,
        model: str = "vil2_tiny",
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        lr: float = 1e-3,
        lr_scale_divisor: int | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        min_lr: float = 1e-6,
        ema_decay: float | None = None,
        compile: CompileChoice = "auto",
        compile_kwargs: dict[str, Any] | None = None,
        optimizer_fused: bool | None = None,
        library: Literal["vil", "timm"] = "vil",
    ):
        super().__init__()
        if compile not in COMPILE_CHOICES:
            raise ValueError(f"compile={compile!r}: expected one of {', '.join(COMPILE_CHOICES)}")
        if library not in ("vil", "timm"):
            raise ValueError(f"library={library!r}: expected 'vil' or 'timm'")
        self.save_hyperparameters()
        self.backbone = self.create_backbone(model, checkpoint, dict(model_kwargs or {}))
        self.ema: AveragedModel | None = None
        self.compiled: str | None = None  # the compile choice applied, once resolved
        # Divergence check (check_finite): a device flag over the steps since the last read, and that read's step.
        self._all_finite: torch.Tensor | None = None
        self._checked_until = -1
        self._rng_states_to_restore: dict | None = None

    # -- model hooks for subclasses ------------------------------------------------------------------------------------
    def create_backbone(self, model: str, checkpoint: str | None, model_kwargs: dict[str, Any]) -> nn.Module:
        """The backbone: a ViL variant from ``vil.create_model``, or with ``library="timm"`` a timm model
        (``create_timm_model``). A task comparing against another timm backbone may override this; the module
        must offer what ``param_groups`` and ``configure_model`` use (``no_weight_decay``; for layer decay
        ``depth`` and ``lr_layer_id``; ``compile_blocks`` or ``blocks``)."""
        return create_backbone(self.hparams.library, model, checkpoint, **model_kwargs)

    def compile_choice(self) -> str:
        """``hparams.compile`` with ``auto`` resolved for the device the trainer runs the module on."""
        choice = self.hparams.compile
        if choice == "auto":
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            choice = "blocks-cudagraphs" if device.type == "cuda" else "none"
        return choice

    def configure_model(self):
        # Runs on every fit/validate/test call; compiling an already compiled backbone again would wrap it twice.
        if self.compiled is not None:
            return
        choice = self.compile_choice()
        kwargs = dict(self.hparams.compile_kwargs or {})
        if choice == "blocks":
            self._compile_blocks(**kwargs)
        elif choice == "blocks-cudagraphs":
            self._compile_blocks(**{**kwargs, "mode": "reduce-overhead"})
        elif choice == "model":
            self.backbone = torch.compile(self.backbone, **kwargs)
        self.compiled = choice

    def _compile_blocks(self, **kwargs):
        if hasattr(self.backbone, "compile_blocks"):
            self.backbone.compile_blocks(**kwargs)
        else:  # a timm model: its blocks one by one, like VisionLSTM.compile_blocks
            for block in self.backbone.blocks:
                block.compile(**kwargs)

    def _mark_cudagraph_step(self):
        # CUDA graph trees reuse their output buffers on the next replay; marking each step tells them the
        # previous step's outputs are no longer needed (else they warn and fall back or keep extra copies).
        if self.compiled == "blocks-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch, batch_idx):
        if self._rng_states_to_restore is not None:  # the first step after resuming: continue the saved streams
            _set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None
        self._mark_cudagraph_step()

    # -- random state in checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = _rng_state_tensors(_collect_rng_states())
        if self._trainer is not None and self.trainer.world_size > 1:
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        rank = self.global_rank if self._trainer is not None else 0
        if states and rank < len(states):
            self._rng_states_to_restore = _rng_state_from_tensors(states[rank])

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._mark_cudagraph_step()

    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._mark_cudagraph_step()

    def on_predict_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._mark_cudagraph_step()

    def setup(self, stage: str):
        # Before configure_model on purpose: the EMA copy is a deepcopy of the eager modules and stays uncompiled.
        if self.hparams.ema_decay is not None and self.ema is None:
            self.ema = AveragedModel(self._task_modules(), multi_avg_fn=get_ema_multi_avg_fn(self.hparams.ema_decay))
            self.ema.requires_grad_(False)

    def _task_modules(self) -> nn.Module:
        """Everything that trains (the backbone and any task heads), for EMA."""
        return nn.ModuleDict({name: m for name, m in self.named_children() if name != "ema"})

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self._task_modules())

    def evaluation_modules(self) -> nn.ModuleDict:
        """The modules evaluation should use: the EMA copy when EMA is on, else the live ones."""
        return self.ema.module if self.ema is not None else self._task_modules()

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise once a training loss was NaN or inf. The flag stays on the device and is read at Lightning's
        logging steps (every ``log_every_n_steps``) and at the end of each epoch: reading it at every step
        makes the CPU wait for the GPU before it can queue the next step (ViL-T at 224 on an H200: 0.86x the
        bare training step's img/s, see experiments/bench_fit.py)."""
        finite = torch.isfinite(loss.detach()).all()
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        every = max(self.trainer.log_every_n_steps, 1) if self._trainer is not None else 1
        if (self.global_step + 1) % every == 0:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        flag, first = self._all_finite, min(self._checked_until + 1, self.global_step)
        self._all_finite, self._checked_until = None, self.global_step
        if flag is not None and not bool(flag):
            raise FloatingPointError(
                f"the training loss was NaN or inf at a step in {first}..{self.global_step}: training diverged "
                f"(lower the learning rate, enable gradient clipping or check the inputs for NaN/inf)")

    def on_train_epoch_end(self):
        self.raise_if_diverged()

    # -- optimizer -----------------------------------------------------------------------------------------------------
    def _global_batch_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            return None
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def peak_lr(self) -> float:
        lr = self.hparams.lr
        if self.hparams.lr_scale_divisor:
            batch = self._global_batch_size()
            if batch is None:
                raise ValueError("lr_scale_divisor is set but the datamodule has no batch_size attribute")
            lr = lr * batch / self.hparams.lr_scale_divisor
        return lr

    def param_groups(self, lr: float) -> list[dict]:
        backbone = getattr(self.backbone, "_orig_mod", self.backbone)
        no_decay_keys = backbone.no_weight_decay()
        decay = self.hparams.layer_decay
        if hasattr(backbone, "lr_layer_id"):
            num_layers = backbone.depth + 2
        else:  # a timm model: one layer
            if decay is not None:
                raise ValueError(f"layer_decay needs a ViL backbone (lr_layer_id); {type(backbone).__name__} has none")
            num_layers = 1
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad or name.startswith("ema."):
                continue
            if name.startswith("backbone."):
                inner = name.split(".", 1)[1].removeprefix("_orig_mod.")
                layer_id = backbone.lr_layer_id(inner) if num_layers > 1 else 0
                skip_wd = param.ndim <= 1 or inner in no_decay_keys
            else:  # task heads sit above the backbone
                layer_id = num_layers - 1
                skip_wd = param.ndim <= 1
            scale = decay ** (num_layers - 1 - layer_id) if decay is not None else 1.0
            group = groups.setdefault(
                (layer_id, skip_wd),
                {"params": [], "lr": lr * scale, "weight_decay": 0.0 if skip_wd else self.hparams.weight_decay,
                 "lr_scale": scale, "name": f"layer{layer_id}_{'no_wd' if skip_wd else 'wd'}"},
            )
            group["params"].append(param)
        return [groups[k] for k in sorted(groups)]

    def configure_optimizers(self):
        lr = self.peak_lr()
        groups = self.param_groups(lr)
        # The fused kernel updates all tensors in a few launches: a ViL-T step on an H100 takes 2.1 ms instead
        # of 7.1 ms, mostly launch overhead. By default it is used when every parameter is on the GPU.
        fused = self.hparams.optimizer_fused
        if fused is None:
            fused = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(self.hparams.betas), fused=fused or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.hparams.warmup_steps is not None:
            warmup = self.hparams.warmup_steps
        else:
            warmup = int(round(self.hparams.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1)))
        schedule = WarmupCosine(warmup, total, min_ratio=self.hparams.min_lr / lr if lr > 0 else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's mixed-precision plugin refuses to clip for optimizers that unscale inside their step
        (fused AdamW), so clipping here covers them: with a GradScaler (fp16) the gradients are unscaled first;
        ``GradScaler.step`` then finds the optimizer unscaled and passes no scale to the fused kernel, so they
        are not unscaled twice. Other optimizers take Lightning's own path."""
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm"
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        return None


def create_backbone(library: str, model: str, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """``model`` from ``library``: ``vil`` (``vil.create_model``) or ``timm`` (``create_timm_model``)."""
    if library == "timm":
        return create_timm_model(model, checkpoint=checkpoint, **kwargs)
    return vil.create_model(model, checkpoint=checkpoint, **kwargs)


def create_timm_model(name: str, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; weights from ``checkpoint`` (a state dict or a Lightning checkpoint
    of this suite) read with ``torch.load(weights_only=True)``, passed through the model's own checkpoint filter
    (timm's ViT filter resamples the position embedding to the model's grid)."""
    import importlib

    import timm

    from vil.checkpoint import extract_state_dict, read_checkpoint

    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        sd = extract_state_dict(read_checkpoint(checkpoint))
        filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, model)
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear) and "head.weight" in sd and sd["head.weight"].shape != head.weight.shape:
            raise ValueError(f"{checkpoint}: head of {sd['head.weight'].shape[0]} classes, the model has "
                             f"{head.weight.shape[0]}")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{checkpoint} does not fit {name}: missing keys {missing[:10]}, unexpected keys "
                             f"{unexpected[:10]}")
    return model


def _rng_state_tensors(states: dict) -> dict:
    """The RNG states as tensors and plain containers only (checkpoints load with weights_only=True)."""
    out = {"torch": states["torch"], "python": [states["python"][0], list(states["python"][1]), states["python"][2]]}
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if states.get("torch.cuda"):
        out["torch.cuda"] = list(states["torch.cuda"])
    return out


def _rng_state_from_tensors(state: dict) -> dict:
    import numpy as np

    out = {"torch": state["torch"], "python": (state["python"][0], tuple(state["python"][1]), state["python"][2])}
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    if state.get("torch.cuda") and torch.cuda.is_available() and len(state["torch.cuda"]) == torch.cuda.device_count():
        out["torch.cuda"] = state["torch.cuda"]
    return out


class WarmupCosine:
    """Multiplier of the peak lr at a step: linear warmup from 0, then cosine decay to ``min_ratio``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
