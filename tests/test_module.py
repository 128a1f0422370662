import math

import lightning as L
import pytest
import torch

import vil
from tasks.base import BackboneModule, WarmupCosine
from tasks.classification import ClassificationModule
from tasks.digits.data import DigitsDataModule

TINY = dict(model="vil2_digits", num_classes=10, model_kwargs=dict(dim=32, depth=3, mlstm_form="chunkwise"))


def _fit_groups(module, **trainer_kwargs):
    """Run one real optimizer step and return {parameter name: (peak lr, weight decay)}."""
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups
            for p in g["params"]}


def test_weight_decay_and_layer_decay_groups():
    module = ClassificationModule(**TINY, lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    seen = _fit_groups(module)
    assert len(seen) == len(list(module.parameters())), "every trainable parameter is in exactly one group"
    depth = 3
    # no weight decay on norms, biases, pos-embed, gate biases and the learnable skip
    for n, (lr, wd) in seen.items():
        no_wd = n.endswith(("bias", "norm.weight", "outnorm.weight", "learnable_skip", "pos_embed.embed"))
        assert (wd == 0.0) == no_wd, n
    assert seen["backbone.blocks.0.rowwise_from_top_left.layer.mlstm_cell.fgate.bias"][1] == 0.0
    # layer-wise decay: embeddings deepest, each pair one layer, head and final norms undecayed
    top = depth + 1
    assert seen["backbone.head.weight"][0] == pytest.approx(1e-3)
    assert seen["backbone.norm.weight"][0] == pytest.approx(1e-3)
    assert seen["backbone.patch_embed.proj.weight"][0] == pytest.approx(1e-3 * 0.5**top)
    assert seen["backbone.pos_embed.embed"][0] == pytest.approx(1e-3 * 0.5**top)
    for pair in range(depth):
        for sub in ("rowwise_from_top_left", "rowwise_from_bot_right"):
            lr = seen[f"backbone.blocks.{pair}.{sub}.layer.proj_up.weight"][0]
            assert lr == pytest.approx(1e-3 * 0.5 ** (top - 1 - pair))


def test_linear_lr_scaling_uses_global_batch():
    module = ClassificationModule(**TINY, lr=1e-3, lr_scale_divisor=1024)
    seen = _fit_groups(module, accumulate_grad_batches=4)
    assert seen["backbone.head.weight"][0] == pytest.approx(1e-3 * 32 * 4 / 1024)


def test_warmup_cosine_schedule():
    sched = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.01)
    assert sched(0) == pytest.approx(1 / 11)
    assert sched(9) == pytest.approx(10 / 11)
    assert sched(10) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert sched(110) == pytest.approx(0.01)
    values = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_nan_loss_is_a_clear_error():
    module = ClassificationModule(**TINY)
    module.check_finite(torch.tensor(1.0))  # no trainer: checked at once
    with pytest.raises(FloatingPointError, match=r"loss was NaN or inf at a step in 0\.\.0: training diverged"):
        module.check_finite(torch.tensor(math.nan))


def test_diverged_fit_stops_by_the_next_logging_step(tmp_path):
    """The check reads the device only every log_every_n_steps: a NaN at step 2 stops the fit at step 4."""

    class Diverging(ClassificationModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                batch = (batch[0] * math.nan, batch[1])
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(accelerator="cpu", max_steps=20, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
                        default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"at a step in 0\.\.4"):
        trainer.fit(Diverging(**TINY), datamodule=DigitsDataModule(batch_size=32))


def test_fit_with_ema_and_reload_lightning_checkpoint(tmp_path):
    module = ClassificationModule(**TINY, lr=2e-3, ema_decay=0.9, warmup_epochs=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, limit_val_batches=2, logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, log_every_n_steps=1,
                        num_sanity_val_steps=0)
    before = module.backbone.head.bias.detach().clone()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert not torch.equal(before, module.backbone.head.bias)
    ema_backbone = module.ema.module["backbone"]
    assert not torch.equal(ema_backbone.head.bias, module.backbone.head.bias), "EMA weights lag the live weights"
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = vil.create_model("vil2_digits", checkpoint=str(ckpt), **TINY["model_kwargs"])
    x = torch.randn(3, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        out, ema_out, live_out = reloaded.eval()(x), ema_backbone.eval()(x), module.backbone(x)
    assert not torch.allclose(ema_out, live_out)
    torch.testing.assert_close(out, ema_out)  # a checkpoint with EMA weights loads those


# -- compile ------------------------------------------------------------------------------------------------------------
def _short_fit(module, **trainer_kwargs):
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kwargs)
    data = DigitsDataModule(batch_size=32)
    trainer.fit(module, datamodule=data)
    return trainer, data


def test_compile_auto_is_eager_on_cpu_and_unknown_choices_fail():
    module = ClassificationModule(**TINY)
    assert module.hparams.compile == "auto"
    _short_fit(module)
    assert module.compiled == "none"
    assert not isinstance(module.backbone, torch._dynamo.eval_frame.OptimizedModule)
    assert all(pair._compiled_call_impl is None for pair in module.backbone.blocks)
    with pytest.raises(ValueError, match="compile='fast'"):
        ClassificationModule(**TINY, compile="fast")


def test_compile_blocks_cudagraphs_once_with_step_marks_and_eager_ema(monkeypatch):
    calls, marks = [], []
    monkeypatch.setattr(vil.VisionLSTM, "compile_blocks", lambda self, **kw: calls.append((self, kw)) or self)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    module = ClassificationModule(**TINY, compile="blocks-cudagraphs", ema_decay=0.9)
    trainer, data = _short_fit(module)
    trainer.validate(module, datamodule=data, verbose=False)  # a second run must not compile again
    assert len(calls) == 1 and calls[0][0] is module.backbone and calls[0][1] == {"mode": "reduce-overhead"}
    assert module.ema.module["backbone"] is not module.backbone
    assert len(marks) == 2 + 1  # each train step and the validation batch (fit stops at max_steps before validating)


def test_compile_blocks_and_model_for_real_with_the_eager_backend(tmp_path):
    tiny = {**TINY, "model_kwargs": {**TINY["model_kwargs"], "depth": 1}}
    module = ClassificationModule(**tiny, compile="blocks", compile_kwargs={"backend": "eager"}, ema_decay=0.9)
    _short_fit(module)
    assert all(pair._compiled_call_impl is not None for pair in module.backbone.blocks)
    assert all(pair._compiled_call_impl is None for pair in module.ema.module["backbone"].blocks), "EMA stays eager"

    module = ClassificationModule(**tiny, compile="model", compile_kwargs={"backend": "eager"})
    trainer, data = _short_fit(module)
    trainer.validate(module, datamodule=data, verbose=False)
    assert isinstance(module.backbone, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(module.backbone._orig_mod, torch._dynamo.eval_frame.OptimizedModule), "compiled once"
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    reloaded = vil.create_model("vil2_digits", checkpoint=str(tmp_path / "compiled.ckpt"), **tiny["model_kwargs"])
    x = torch.randn(2, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), module.backbone._orig_mod(x))


# -- optimizer and gradient clipping ------------------------------------------------------------------------------------
def test_optimizer_fused_choice():
    trainer, _ = _short_fit(ClassificationModule(**TINY))
    assert not trainer.optimizers[0].defaults["fused"], "None: fused only when all parameters are on CUDA"
    trainer, _ = _short_fit(ClassificationModule(**TINY, optimizer_fused=True))
    assert trainer.optimizers[0].defaults["fused"]


def _grad_norm(module) -> float:
    grads = [p.grad.float() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


class ClipRecorder(ClassificationModule):
    """Records the gradient norm before clipping (on_before_optimizer_step, unscaled) and after it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.before, self.after = [], []

    def on_before_optimizer_step(self, optimizer):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0  # fused: still scaled here
        self.before.append(_grad_norm(self) / scale)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.after.append(_grad_norm(self))


def test_gradient_clipping_with_the_fused_optimizer_on_cpu():
    """Lightning's mixed-precision plugin raises for clipping with a fused optimizer; BackboneModule clips."""
    module = ClipRecorder(**TINY, optimizer_fused=True)
    before = [p.detach().clone() for p in module.parameters()]
    _short_fit(module, precision="bf16-mixed", gradient_clip_val=1.0)
    assert len(module.after) == 2
    assert all(b > 1.05 for b in module.before), f"the test needs gradients above the clip value: {module.before}"
    assert all(a <= 1.0 + 1e-3 for a in module.after), module.after
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))

    module = ClipRecorder(**TINY, optimizer_fused=True)  # by value
    _short_fit(module, precision="bf16-mixed", gradient_clip_val=1e-4, gradient_clip_algorithm="value")
    assert all(p.grad.abs().max() <= 1e-4 for p in module.parameters() if p.grad is not None)


class FusedStepReference(ClipRecorder):
    """On the first step, also computes that step independently: unscale, clip by norm, fused AdamW."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if self.global_step == 0:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            scale = scaler.get_scale() if scaler is not None else 1.0
            params = [p for g in optimizer.param_groups for p in g["params"]]
            copies = [p.detach().clone().requires_grad_() for p in params]
            for c, p in zip(copies, params):
                c.grad = p.grad.detach().clone() / scale
            torch.nn.utils.clip_grad_norm_(copies, self.trainer.gradient_clip_val)
            groups, i = [], 0
            for g in optimizer.param_groups:
                n = len(g["params"])
                groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": copies[i:i + n]})
                i += n
            torch.optim.AdamW(groups, fused=True).step()
            self.reference = [c.detach() for c in copies]
            self.stepped = params

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step == 1:
            self.after_step = [p.detach().clone() for p in self.stepped]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_gradient_clipping_with_the_fused_optimizer_on_gpu(precision):
    module = FusedStepReference(**TINY, compile="none")
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision=precision, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert trainer.optimizers[0].defaults["fused"], "None picks the fused AdamW on CUDA"
    assert trainer.global_step == 2 and len(module.after) == 2
    assert all(b > 1.05 for b in module.before), module.before
    assert all(a <= 1.0 + 1e-3 for a in module.after), module.after
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # the first step equals manual unscale + clip + fused AdamW on the same gradients
    for got, want in zip(module.after_step, module.reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_auto_on_gpu_trains_with_cudagraph_blocks():
    module = ClassificationModule(**TINY, ema_decay=0.9)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=4, val_check_interval=2, limit_val_batches=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision="bf16-mixed", gradient_clip_val=1.0)
    data = DigitsDataModule(batch_size=32)
    trainer.fit(module, datamodule=data)
    assert module.compiled == "blocks-cudagraphs"
    assert all(pair._compiled_call_impl is not None for pair in module.backbone.blocks)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss_step"])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["val/acc"] <= 1.0
