import math

import lightning as L
import pytest
import torch

import vil
from tasks.classification import ClassificationModule
from tasks.data.digits import DigitsDataModule
from vil.module import WarmupCosine

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
    with pytest.raises(FloatingPointError, match="loss is nan at step 7"):
        ClassificationModule.check_finite(torch.tensor(math.nan), 7)


def test_fit_with_ema_and_reload_lightning_checkpoint(tmp_path):
    module = ClassificationModule(**TINY, lr=2e-3, ema_decay=0.9, warmup_epochs=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, limit_val_batches=2, logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, log_every_n_steps=1,
                        num_sanity_val_steps=0)
    before = module.backbone.head.bias.detach().clone()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert not torch.equal(before, module.backbone.head.bias)
    ema_bias = module.ema.module["backbone"].head.bias
    assert not torch.equal(ema_bias, module.backbone.head.bias), "EMA weights lag the live weights"
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = vil.create_model("vil2_digits", checkpoint=str(ckpt), **TINY["model_kwargs"])
    x = torch.randn(3, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), module.backbone(x))
