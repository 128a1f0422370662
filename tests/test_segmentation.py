"""ADE20K segmentation (tasks/segmentation): the mmcv.ops stand-in, ViL in mmseg's registry, position-embedding
interpolation, the data module's checks, mIoU, layer decay, and fit / validate / test / predict through the
`vil` command on a synthetic ADEChallengeData2016 folder."""
import csv
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.segmentation  # noqa: F401  (the mmcv.ops stand-in, before mmseg)
import vil
from tasks import cli
from tasks.segmentation import mmcv_ops
from tasks.segmentation.backbone import ViL
from tasks.segmentation.data import ADE20KDataModule, BadSampleError
from tasks.segmentation.module import SegmentationIoU, SegmentationModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "ade20k"
TINY_MODEL = dict(model="vil2_nano", model_kwargs=dict(dim=32, mlstm_form="chunkwise"), crop_size=32,
                  out_indices=(0, 1, 2, 3), channels=16, slide_stride=21, compile="none")


def make_ade20k(root: Path, n_train: int = 4, n_val: int = 2, size=(48, 64), seed: int = 0) -> Path:
    """A small folder in the ADEChallengeData2016 layout: JPEG images and PNG masks (0 = other, 1..5)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            labels = rng.choice(np.arange(1, 6), size=3, replace=False)
            mask = np.zeros((h, w), np.uint8)
            mask[: h // 2] = labels[0]
            mask[h // 2 :, : w // 2] = labels[1]
            mask[h // 2 :, w // 2 :] = labels[2]
            mask[:2] = 0
            img = np.zeros((h, w, 3), np.uint8)
            for c in range(1, 6):
                img[mask == c] = (40 * c, 255 - 40 * c, 20 * c)
            img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(mask).save(root / "annotations" / split / f"{stem}.png")
    return root


def test_mmcv_ops_stand_in_is_still_needed():
    assert mmcv_ops.needs_stand_in(), (
        "mmseg now imports without mmcv._ext: delete tasks/segmentation/mmcv_ops.py and its install() call")


def test_stand_in_serves_point_sample_and_names_missing_ops():
    from mmcv.ops import CrissCrossAttention, point_sample

    feats = torch.arange(16.0).view(1, 1, 4, 4)
    points = torch.tensor([[[0.125, 0.125], [0.875, 0.375]]])  # pixel centers (0, 0) and (row 1, col 3)
    assert point_sample(feats, points, align_corners=False).flatten().tolist() == [0.0, 7.0]
    with pytest.raises(ModuleNotFoundError, match="CrissCrossAttention needs mmcv's compiled extension"):
        CrissCrossAttention(8)


def test_vil_in_mmseg_registry_from_a_plain_config():
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData

    norm = dict(type="BN", requires_grad=True)
    cfg = dict(
        type="EncoderDecoder",
        backbone=dict(type="ViL", model="vil2_nano", img_size=32, out_indices=(0, 1, 2, 3),
                      model_kwargs=dict(dim=32, mlstm_form="chunkwise")),
        neck=dict(type="Feature2Pyramid", embed_dim=32, rescales=[4, 2, 1, 0.5], norm_cfg=norm),
        decode_head=dict(type="UPerHead", in_channels=[32] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=16, num_classes=5, norm_cfg=norm),
        auxiliary_head=dict(type="FCNHead", in_channels=32, in_index=2, channels=16, num_convs=1,
                            num_classes=5, norm_cfg=norm, loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4)),
        test_cfg=ConfigDict(mode="slide", crop_size=(32, 32), stride=(21, 21)))
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(cfg)
    assert type(model.backbone) is ViL and isinstance(model.backbone.model, vil.VisionLSTM)
    x = torch.randn(2, 3, 32, 32)
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 5, (1, 32, 32)))) for _ in range(2)]
    losses = model.loss(x, samples)
    assert set(losses) >= {"decode.loss_ce", "aux.loss_ce"}
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert model.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        pred = model.predict(torch.randn(1, 3, 40, 56))  # slide windows over a non-square image
    assert pred[0].pred_sem_seg.data.shape == (1, 40, 56)


def _bicubic_reference(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Separable cubic convolution (a = -0.75, half-pixel centers, edge-clamped taps), float64: PyTorch's
    bicubic with align_corners=False, computed independently."""
    def weights(t):
        a = -0.75
        t = np.abs(t)
        return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))

    def resize_axis(x, n_out, axis):
        n_in = x.shape[axis]
        out = []
        for i in range(n_out):
            src = (i + 0.5) * n_in / n_out - 0.5
            base = int(np.floor(src))
            taps = [base - 1, base, base + 1, base + 2]
            w = weights(src - np.array(taps, dtype=np.float64))
            idx = np.clip(taps, 0, n_in - 1)
            out.append(np.tensordot(w, np.take(x, idx, axis=axis), axes=([0], [axis])))
        return np.stack(out, axis=axis)

    return resize_axis(resize_axis(grid, out_h, 0), out_w, 1)


def test_pos_embed_224_checkpoint_loads_as_bicubic_512_grid_and_runs_at_any_size(tmp_path):
    small = dict(patch_size=16, dim=32, depth=1, mlstm_form="chunkwise")
    source = vil.create_model("vil2_nano", img_size=224, num_classes=0, **small)
    ckpt = tmp_path / "vil_224.pth"
    torch.save(source.state_dict(), ckpt)
    backbone = ViL(model="vil2_nano", img_size=512, out_indices=(1,), checkpoint=str(ckpt), model_kwargs=small)
    stored = source.pos_embed.embed.detach().double()[0].numpy()  # (14, 14, dim)
    assert stored.shape[:2] == (14, 14)
    loaded = backbone.model.pos_embed.embed.detach().double()[0].numpy()
    assert loaded.shape[:2] == (32, 32)
    np.testing.assert_allclose(loaded, _bicubic_reference(stored, 32, 32), rtol=0, atol=1e-6)
    with torch.no_grad():
        (full,) = backbone(torch.randn(1, 3, 512, 512))
        (wide,) = backbone(torch.randn(1, 3, 384, 640))
    assert full.shape == (1, 32, 32, 32) and wide.shape == (1, 32, 24, 40)


def test_backbone_taps_match_the_authors_model_on_a_non_square_input(reference_dir):
    """The last tap plus the final norm is the authors' feature map at 48x40 (their model built for that grid,
    so its conv2d ran on the 12x10 grid); the adapter resizes the 8x8 position embedding on the fly."""
    expected = torch.load(reference_dir / "vil2_mini_raw.expected.pt", weights_only=True)
    kwargs = dict(dim=64, depth=2, patch_size=4, mlstm_form="parallel")
    full = vil.create_model("vil2_nano", checkpoint=reference_dir / "vil2_mini_raw.pt", img_size=32, num_classes=10,
                            **kwargs).double()
    backbone = ViL(model="vil2_nano", img_size=32, out_indices=(3,), checkpoint=str(reference_dir / "vil2_mini_raw.pt"),
                   model_kwargs=kwargs).double()
    x = expected["inputs"]["48x40"].double()
    with torch.no_grad():
        (tap,) = backbone(x)
        maps = full.norm(tap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    want = expected["features"]["48x40"].double()
    assert tap.shape == want.shape == (2, 64, 12, 10)
    assert ((maps - want).norm() / want.norm()).item() < 1e-6


def test_miou_equals_a_hand_calculation():
    # 3 classes; 255 is ignored. pred vs label, 2x4 pixels (the ignored one excluded):
    #   class 0: label at 3 px, pred at 3 px, both at 2 -> IoU 2 / 4, Acc 2 / 3
    #   class 1: label 3, pred 3, both 2 -> IoU 2 / 4, Acc 2 / 3; class 2: label 1, pred 1, both 1 -> 1, 1
    label = torch.tensor([[[0, 0, 0, 1], [1, 1, 2, 255]]])
    pred = torch.tensor([[[0, 0, 1, 1], [1, 0, 2, 2]]])
    metric = SegmentationIoU(num_classes=3)
    metric.update(pred, label)
    scores = metric.compute()
    assert scores["mIoU"].item() == pytest.approx(100 * (0.5 + 0.5 + 1) / 3, abs=0.005)
    assert scores["mAcc"].item() == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3, abs=0.005)
    assert scores["aAcc"].item() == pytest.approx(100 * 5 / 7, abs=0.005)
    # a class absent from labels and predictions is left out of the mean (mmseg's nanmean)
    metric = SegmentationIoU(num_classes=4)
    metric.update(pred, label)
    assert metric.compute()["mIoU"].item() == pytest.approx(100 * 2 / 3, abs=0.005)


def test_layer_decay_groups_over_block_pairs_and_undecayed_heads():
    module = SegmentationModule(layer_decay=0.65, **{**TINY_MODEL, "model_kwargs": dict(dim=32, depth=3),
                                                     "out_indices": (1, 3, 4, 5)})
    groups = module.param_groups(lr=1.0)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == sum(1 for p in module.parameters() if p.requires_grad)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(module.named_parameters())
    num_layers = 3 + 2  # embeddings, 3 pairs, heads
    assert scale_of[id(named["backbone.patch_embed.proj.weight"])] == pytest.approx(0.65 ** (num_layers - 1))
    pair1 = next(n for n in named if n.startswith("backbone.blocks.1.") and n.endswith("proj_up.weight"))
    assert scale_of[id(named[pair1])] == pytest.approx(0.65 ** (num_layers - 1 - 2))
    assert scale_of[id(named["segmentor.decode_head.conv_seg.weight"])] == 1.0
    assert wd_of[id(named["backbone.pos_embed.embed"])] == 0.0
    assert wd_of[id(named["segmentor.decode_head.conv_seg.weight"])] == 0.05
    assert not any(n.startswith("segmentor.backbone") for n in named)  # one copy of the backbone


def _setup(root, split_stage="fit", **kwargs):
    dm = ADE20KDataModule(str(root), batch_size=2, num_workers=0, crop_size=32, scale=(64, 32), **kwargs)
    dm.setup(split_stage)
    return dm


def test_bad_input_errors_and_skipped_training_samples(tmp_path):
    root = make_ade20k(tmp_path / "ade", n_train=3, n_val=2)
    val_masks = root / "annotations" / "validation"
    # an image without a mask: an error for validation, skipped (counted) for training
    os.remove(root / "annotations" / "training" / "ADE_train_00000002.png")
    with pytest.warns(UserWarning, match=r"1 of 3 images in images/training have no mask.*ADE_train_00000002\.jpg"):
        dm = _setup(root, "fit")
    assert len(dm.datasets["train"]) == 2
    os.remove(val_masks / "ADE_valid_00000001.png")
    with pytest.raises(BadSampleError, match=r"1 of 2 images in images/validation have no mask.*ADE_valid_00000001"):
        _setup(root, "validate")

    # a mask of another size, labels above 150, an unreadable image: errors naming the file in validation
    root = make_ade20k(tmp_path / "ade2", n_train=3, n_val=3)
    val_masks, val_images = root / "annotations" / "validation", root / "images" / "validation"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(val_masks / "ADE_valid_00000000.png")
    mask = np.array(Image.open(val_masks / "ADE_valid_00000001.png"))
    mask[5, 5] = 151
    Image.fromarray(mask).save(val_masks / "ADE_valid_00000001.png")
    (val_images / "ADE_valid_00000002.jpg").write_bytes(b"not a jpeg")
    val = _setup(root, "validate").datasets["val"]
    for index, message in ((0, r"ADE_valid_00000000\.png is 10x10 but its image .* is 64x48"),
                           (1, r"ADE_valid_00000001\.png holds label 151"),
                           (2, r"unreadable image .*ADE_valid_00000002\.jpg")):
        with pytest.raises(BadSampleError, match=message):
            val[index]
    # in training the same samples are skipped with a counted warning
    train_images = root / "images" / "training"
    (train_images / "ADE_train_00000000.jpg").write_bytes(b"not a jpeg")
    train = _setup(root, "fit").datasets["train"]
    with pytest.warns(UserWarning, match=r"skipping a training sample: unreadable image .*ADE_train_00000000\.jpg "
                                         r"\(1 skipped"):
        sample = train[0]
    assert sample["inputs"].shape == (3, 32, 32) and train.skipped == 1


def _tiny_config(tmp_path: Path, root: Path) -> Path:
    out = tmp_path / "runs"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: 3
  val_check_interval: 3
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_model_summary: false
  enable_progress_bar: false
  default_root_dir: {out}
  logger:
    class_path: tasks.loggers.RunLogger
    init_args:
      save_dir: {out}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: val/mIoU
        mode: max
        filename: best
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        filename: last
        every_n_train_steps: 2
    - class_path: tasks.callbacks.CPUThreads
      init_args:
        num_threads: 1
model:
  init_args:
    model: vil2_nano
    checkpoint: null
    compile: none
    lr: 1.0e-3
    warmup_steps: 1
    crop_size: 32
    out_indices: [0, 1, 2, 3]
    channels: 16
    slide_stride: 21
    test_scales: [0.75, 1.0]
    model_kwargs:
      dim: 32
      mlstm_form: chunkwise
data:
  init_args:
    root: {root}
    batch_size: 2
    num_workers: 0
    crop_size: 32
    scale: [64, 32]
""")
    return config


def test_fit_validate_test_and_predict_through_the_vil_command(tmp_path, capsys):
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    configs = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "vil_tiny.yaml"),
               "--config", str(_tiny_config(tmp_path, root))]
    assert cli.main(["fit", *configs]) == 0
    run = tmp_path / "runs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    assert cli.main(["validate", *configs, "--ckpt_path", str(last)]) == 0  # sliding window, single scale
    assert cli.main(["test", *configs, "--ckpt_path", str(last)]) == 0  # scales 0.75, 1 with flips
    rows = []  # fit in version_0, then validate and test in runs of their own
    for version in ("version_0", "version_1", "version_2"):
        with open(tmp_path / "runs" / version / "metrics.csv", newline="") as f:
            rows += list(csv.DictReader(f))
    for key in ("train/loss_step", "val/mIoU", "val/mAcc", "val/aAcc", "test/mIoU"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(np.isfinite(values)), key
        if key.endswith(("mIoU", "mAcc", "aAcc")):
            assert all(0 <= v <= 100 for v in values)
    capsys.readouterr()

    out = tmp_path / "pred"
    args = ["segment", "predict", "--checkpoint", str(last), "--input", str(root / "images" / "validation"),
            "--out", str(out), "--resize", "64", "32", "--scales", "1.0", "--device", "cpu"]
    assert cli.main(args) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    color = Image.open(out / "color" / "ADE_valid_00000000.png")
    labels = np.array(Image.open(out / "labels" / "ADE_valid_00000000.png"))
    assert color.mode == "P" and color.size == (64, 48) and labels.shape == (48, 64)
    assert labels.min() >= 1 and labels.max() <= 150 and (np.array(color) + 1 == labels).all()
    assert cli.main(args) == 0 and "wrote 0 images" in capsys.readouterr().out  # resumes: outputs exist


def test_predict_rejects_a_non_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    code = cli.main(["segment", "predict", "--checkpoint", str(bad), "--input", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vil segment: error:") and "bad.ckpt" in err


def test_deit_backbone_trains_with_the_same_heads():
    module = SegmentationModule(model="deit_tiny_patch16_224", model_kwargs=dict(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2), crop_size=32, out_indices=(0, 1, 2, 3),
        channels=16, slide_stride=21, compile="none", layer_decay=0.65)
    x = torch.randn(2, 3, 32, 32)
    feats = module.segmentor.extract_feat(x)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]
    groups = module.param_groups(lr=1.0)
    named = {id(p): n for n, p in module.named_parameters()}
    scales = {named[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scales["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.65 ** 5)
    assert scales["backbone.vit.blocks.3.mlp.fc1.weight"] == pytest.approx(0.65)


DDP_SCRIPT = '''
import sys
import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from mmengine.dataset import pseudo_collate
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

import tasks.segmentation  # noqa: F401
from tasks.segmentation.module import SegmentationModule

OUT = sys.argv[1]
TINY = dict(model="vil2_nano", model_kwargs=dict(dim=32, mlstm_form="chunkwise"), crop_size=32,
            out_indices=(0, 1, 2, 3), channels=16, slide_stride=21, compile="none", dropout=0.0, lr=1e-3,
            warmup_steps=0)


def samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 150, (1, 32, 32), generator=g)))
        sample.set_metainfo(dict(img_shape=(32, 32), ori_shape=(32, 32), pad_shape=(32, 32)))
        out.append(dict(inputs=torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8), data_samples=sample))
    return out


class Data(L.LightningDataModule):
    batch_size = 2

    def train_dataloader(self):
        return torch.utils.data.DataLoader(samples(), batch_size=2, shuffle=False, collate_fn=pseudo_collate)


class Record(L.Callback):
    def on_train_start(self, trainer, module):
        if trainer.global_rank == 0:
            torch.save(module.state_dict(), f"{OUT}/init.pt")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # after the step of max_steps=1 the gradients (averaged over the processes by DDP) are still there
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        types = sorted({type(m).__module__ + "." + type(m).__name__ for m in module.segmentor.modules()
                        if "BatchNorm" in type(m).__name__})
        torch.save(dict(grads=grads, loss=outputs["loss"].detach(), bn_types=types), f"{OUT}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    L.seed_everything(0)
    module = SegmentationModule(**TINY)
    trainer = L.Trainer(accelerator="cpu", devices=int(sys.argv[2]),
                        strategy=DDPStrategy(process_group_backend="gloo") if int(sys.argv[2]) > 1 else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, datamodule=Data())
'''


def _clean_env() -> dict:
    drop = ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PL_", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_ddp_two_processes_with_sync_batchnorm_match_one_process_on_the_full_batch(tmp_path):
    import subprocess
    import sys

    from mmengine.dataset import pseudo_collate

    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(["timeout", "-k", "10", "240", sys.executable, str(script), str(tmp_path), "2"],
                          env=_clean_env(), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert "tasks.segmentation.sync_bn.AllReduceBatchNorm" in ranks[0]["bn_types"]
    assert not any(t.endswith(("BatchNorm2d", "BatchNorm1d")) for t in ranks[0]["bn_types"])

    namespace: dict = {}
    exec(compile(DDP_SCRIPT.split('if __name__ == "__main__":')[0], "ddp_step", "exec"), namespace)
    module = SegmentationModule(**namespace["TINY"])
    module.load_state_dict(torch.load(tmp_path / "init.pt", weights_only=True))
    module.train()

    def loss_and_grads(samples):
        module.zero_grad()
        data = module.preprocess(pseudo_collate(samples), module.segmentor, training=True)
        loss, _ = module.segmentor.parse_losses(module.segmentor.loss(data["inputs"], data["data_samples"]))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    batch = namespace["samples"]()
    loss, grads = loss_and_grads(batch)
    ddp_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert ddp_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert set(ranks[0]["grads"]) == set(grads)
    for name, grad in grads.items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # per-process statistics (plain BatchNorm on each half, DistributedSampler's split) would differ
    half_losses = [loss_and_grads(batch[r::2])[0] for r in (0, 1)]
    assert abs(float(sum(half_losses) / 2) - loss.item()) > 1e-4


def test_upernet_benchmark_quick_run(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_upernet", CONFIGS / "bench_upernet.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for line in ("ViL-T   UperNet:", "DeiT-T  UperNet:", "ViL-T / DeiT-T training speed:", "160,000 iterations in"):
        assert line in out
