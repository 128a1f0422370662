"""ImageNet-1K task: data module, transforms, module checks, configs and the `vil` command on generated trees."""
import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2

from tasks import cli
from tasks.imagenet import data as imagenet_data
from tasks.imagenet.data import DatasetLayoutError, ImageNetDataModule, ResumableSampler, three_augment
from tasks.imagenet.module import ImageNetClassificationModule, RecipeError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "imagenet"
TINY_KWARGS = {"dim": 32, "depth": 1, "patch_size": 4, "img_size": 16, "mlstm_form": "chunkwise"}


def make_tree(root: Path, classes=("n01440764", "n01443537", "n01484850"), n_train=5, n_val=3, seed=0,
              special=True) -> Path:
    """An ImageFolder tree of JPEGs of varied sizes; with ``special``, also a grayscale, a CMYK and a PNG file
    saved as .JPEG in the first training class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(18, 48, 2))
                arr = np.clip(rng.normal(70 * c + 40, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    if special:
        folder = root / "train" / classes[0]
        Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), "L").save(folder / "gray.JPEG")
        Image.new("CMYK", (33, 27), (10, 200, 30, 0)).save(folder / "cmyk.JPEG")
        Image.fromarray(rng.integers(0, 255, (25, 35, 3), dtype=np.uint8)).save(folder / "png.JPEG", format="PNG")
    return root


def tiny_args(command: str, tree: Path, out: Path, *extra: str, config: str = "vil2_tiny_e800.yaml") -> list[str]:
    return [command, "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / config),
            "--data.init_args.root", str(tree), "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", "0", "--data.init_args.img_size", "16",
            "--model.init_args.model", "vil2_nano", "--model.init_args.num_classes", "3",
            "--model.init_args.global_batch_size", "null", "--model.init_args.model_kwargs", json.dumps(TINY_KWARGS),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- data ----------------------------------------------------------------------------------------------------------------
def test_fit_validate_test_through_vil_on_an_image_folder(tmp_path):
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "runs"
    assert cli.main(tiny_args("fit", tree, out, "--trainer.max_epochs", "2")) == 0
    run = out / "version_0"
    assert sorted(os.listdir(run / "checkpoints")) == ["best.ckpt", "last.ckpt"]
    metrics = rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in metrics if r.get("val/acc")] == [0, 1]
    assert all(r.get("val/acc_top5") in (None, "") for r in metrics), "3 classes: no top-5"
    steps = [r for r in metrics if r.get("train/loss_step")]
    assert len(steps) == 2 * (18 // 4), "18 training images (incl. gray, CMYK, PNG-as-JPEG), batches of 4"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ImageNetDataModule"]["skipped_files"] == 0, "the gray, CMYK and PNG files decode"
    for command in ("validate", "test"):
        assert cli.main(tiny_args(command, tree, out, "--ckpt_path", str(run / "checkpoints" / "best.ckpt"))) == 0
    tested = [r for r in rows(out / "version_2" / "metrics.csv") if r.get("test/acc")]
    assert len(tested) == 1 and 0.0 <= float(tested[0]["test/acc"]) <= 1.0


def test_special_files_decode_to_rgb(tmp_path):
    tree = make_tree(tmp_path / "tree")
    samples, classes = imagenet_data.scan_split(str(tree), "train")
    assert classes == ["n01440764", "n01443537", "n01484850"]
    split = imagenet_data.ImageFolderSplit(samples, v2.Compose([v2.ToImage()]))
    by_name = {os.path.basename(p): i for i, (p, _) in enumerate(samples)}
    for name, size in (("gray.JPEG", (30, 40)), ("cmyk.JPEG", (27, 33)), ("png.JPEG", (25, 35))):
        image, label, skipped = split[by_name[name]]
        assert image.shape == (3, *size) and label == 0 and skipped == ""
    cmyk = split[by_name["cmyk.JPEG"]][0]
    assert cmyk[1].float().mean() < cmyk[0].float().mean(), "CMYK (10, 200, 30, 0): much magenta, so little green"


def test_eval_sampler_gives_every_image_once_and_train_sampler_resumes():
    data = list(range(11))
    shards = [list(ResumableSampler(data, 2, r, shuffle=False, pad=False)) for r in range(2)]
    assert sorted(i for s in shards for i, _ in s) == data and [len(s) for s in shards] == [6, 5]
    assert [len(ResumableSampler(data, 2, r, shuffle=False, pad=False)) for r in range(2)] == [6, 5]
    train = ResumableSampler(data, 2, 1, shuffle=True, seed=3)
    train.set_epoch(4)
    full = list(train)
    assert len(full) == 6 and len(set(i for i, _ in full)) >= 5
    resumed = ResumableSampler(data, 2, 1, shuffle=True, seed=3)
    resumed.resume(4, 2)
    resumed.set_epoch(4)
    assert list(resumed) == full[2:], "the rest of the epoch, with the same per-sample seeds"
    resumed.set_epoch(5)
    assert len(list(resumed)) == 6, "later epochs are whole"
    assert full != list(train.__class__(data, 2, 1, shuffle=True, seed=4)), "the seed changes the order"


def test_three_augment_picks_each_op_about_a_third_of_the_time():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    pixels = np.asarray(image).astype(int)
    solarized = np.where(pixels >= 128, 255 - pixels, pixels)
    aug = three_augment()
    counts = {"gray": 0, "solarize": 0, "blur": 0}
    n = 450
    for _ in range(n):
        out = np.asarray(aug(image)).astype(int)
        if (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all():
            counts["gray"] += 1
        elif (out == solarized).all():
            counts["solarize"] += 1
        else:
            assert out.std() <= pixels.std(), "a blur smooths (sigma 0.1 leaves the image as it is)"
            counts["blur"] += 1
    # binomial(450, 1/3): sd 10 images; 4.5 sd
    for name, c in counts.items():
        assert abs(c - n / 3) < 45, (name, counts)


def test_mixup_and_cutmix_targets_sum_to_one_and_switch_half_the_time():
    module = ImageNetClassificationModule(model="vil2_nano", num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0,
                                          model_kwargs=TINY_KWARGS)
    assert module.mixup.mixup_alpha == 0.8 and module.mixup.cutmix_alpha == 1.0
    assert module.mixup.switch_prob == 0.5 and module.mixup.mode == "batch" and module.mixup.label_smoothing == 0.0
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    np.random.seed(0)
    kinds, lams = [], []
    for _ in range(400):
        mixed, target = module.mixup(x.clone(), y)
        torch.testing.assert_close(target.sum(-1), torch.ones(8), rtol=0, atol=1e-6)
        lam = float(target[0, y[0]])  # y[0] != y[-1]: the first image's own class share
        expected = lam * torch.nn.functional.one_hot(y, 5) + (1 - lam) * torch.nn.functional.one_hot(y.flip(0), 5)
        torch.testing.assert_close(target, expected.float(), rtol=0, atol=1e-6)
        from_self = torch.isclose(mixed, x).all(1)  # (B, H, W): pixels left as they were
        if from_self.float().mean() < 1 and (from_self | torch.isclose(mixed, x.flip(0)).all(1)).all():
            kinds.append("cutmix")
            # correct_lam: the target share is the pixel share kept from the image itself
            assert lam == pytest.approx(float(from_self[0].float().mean()), abs=1e-6)
        else:
            kinds.append("mixup")
            torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0), rtol=0, atol=1e-5)
        lams.append(lam)
    share = kinds.count("cutmix") / len(kinds)
    assert abs(share - 0.5) < 0.1, share  # binomial(400, 0.5): sd 0.025
    mixup_lams = [lam for lam, k in zip(lams, kinds) if k == "mixup"]
    assert abs(np.mean(mixup_lams) - 0.5) < 0.06  # Beta(0.8, 0.8) has mean 0.5, sd 0.31


def test_eval_transform_is_resize_shorter_side_bicubic_and_center_crop():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    out = imagenet_data.eval_resize(20, 1.0)(image)
    resized = image.resize((33, 20), Image.BICUBIC)  # shorter side 30 -> 20, the other 50 * 20 / 30 = 33.3
    expected = resized.crop((6, 0, 26, 20))  # center crop: left = round((33 - 20) / 2)
    assert out.size == (20, 20)
    assert np.abs(np.asarray(out).astype(int) - np.asarray(expected).astype(int)).max() <= 1


# -- bad input -----------------------------------------------------------------------------------------------------------
def _setup(tree, stage="fit", **kwargs):
    dm = ImageNetDataModule(str(tree), batch_size=2, num_workers=0, img_size=16, **kwargs)
    dm.setup(stage)
    return dm


def test_missing_split_empty_class_and_differing_classes_are_clear_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="data root .*nowhere not found"):
        _setup(tmp_path / "nowhere")
    tree = make_tree(tmp_path / "a", special=False)
    (tree / "val").rename(tree / "validation")
    with pytest.raises(DatasetLayoutError, match=r"split folder .*val not found .* holds \['train', 'validation'\]"):
        _setup(tree)
    tree = make_tree(tmp_path / "b", special=False)
    (tree / "train" / "n09999999").mkdir()
    with pytest.raises(DatasetLayoutError, match="no valid file for the classes n09999999"):
        _setup(tree)
    tree = make_tree(tmp_path / "c", special=False)
    (tree / "val" / "n01484850").rename(tree / "val" / "n02000000")
    with pytest.raises(DatasetLayoutError, match=r"differ from the training classes: 1 not in training \[n02000000\], "
                                                 r"1 training classes missing \[n01484850\]"):
        _setup(tree)


def test_corrupt_jpeg_is_skipped_with_a_warning_and_counted(tmp_path):
    tree = make_tree(tmp_path / "tree", special=False)
    bad = tree / "train" / "n01443537" / "broken.JPEG"
    bad.write_bytes(Image.open(next((tree / "train" / "n01443537").iterdir())).tobytes()[:200])  # not a JPEG
    val_bad = tree / "val" / "n01440764" / "truncated.JPEG"
    val_bad.write_bytes((tree / "val" / "n01440764" / "n01440764_0.JPEG").read_bytes()[:100])
    out = tmp_path / "runs"
    with pytest.warns(UserWarning, match="skipping .*broken.JPEG: not a decodable image"):
        assert cli.main(tiny_args("fit", tree, out)) == 0
    ckpt = torch.load(out / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    # one epoch: the broken train file once (16 files, 4 batches of 4) and the truncated val file in the sanity
    # check and the epoch's validation
    assert ckpt["ImageNetDataModule"]["skipped_files"] >= 2
    dm = _setup(tree, "validate")
    x, y, skipped = imagenet_data.collate_skipping(
        [dm_item for dm_item in imagenet_data.ImageFolderSplit(dm.samples["val"], v2.Compose([imagenet_data.eval_resize(16), imagenet_data.to_normalized()]))])
    assert skipped == [str(val_bad)] and len(x) == len(y) == 9, "evaluation leaves the file out"


def test_checkpoint_head_of_other_classes_and_a_missing_checkpoint_are_errors(reference_dir):
    raw = str(reference_dir / "vil2_mini_raw.pt")  # 10 classes
    with pytest.raises(RecipeError, match="classifier of 10 classes, the model num_classes=1000"):
        ImageNetClassificationModule(model="vil2_nano", checkpoint=raw, num_classes=1000)
    with pytest.raises(RecipeError, match="pass --model.init_args.checkpoint"):
        ImageNetClassificationModule(model="vil2_nano", num_classes=3, require_checkpoint=True)


def test_num_classes_and_global_batch_mismatch_stop_the_fit(tmp_path):
    import lightning as L

    tree = make_tree(tmp_path / "tree", special=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    module = ImageNetClassificationModule(model="vil2_nano", num_classes=5, model_kwargs=TINY_KWARGS)
    with pytest.raises(RecipeError, match="the data has 3 classes, the model num_classes=5"):
        trainer.fit(module, datamodule=ImageNetDataModule(str(tree), batch_size=2, num_workers=0, img_size=16))
    module = ImageNetClassificationModule(model="vil2_nano", num_classes=3, global_batch_size=8,
                                          model_kwargs=TINY_KWARGS)
    with pytest.raises(RecipeError, match="global batch 2 .* differs from the recipe's 8: use "
                                          "--trainer.accumulate_grad_batches 4"):
        trainer.fit(module, datamodule=ImageNetDataModule(str(tree), batch_size=2, num_workers=0, img_size=16))


# -- released weights ----------------------------------------------------------------------------------------------------
def test_raw_fixture_validates_through_the_cli_like_a_reference_loop(tmp_path, reference_dir):
    """`vil validate --config eval.yaml` with the authors' raw-format fixture (10 classes, 32x32) gives the top-1
    of an independent loop: timm's eval transform from the model's pretrained_cfg, the model built by timm."""
    import timm
    from timm.data import create_transform, resolve_data_config

    classes = [f"n0{i:07d}" for i in range(10)]
    tree = make_tree(tmp_path / "tree", classes=classes, n_train=0, n_val=2, special=False)
    raw = str(reference_dir / "vil2_mini_raw.pt")
    out = tmp_path / "runs"
    args = ["validate", "--config", str(CONFIGS / "eval.yaml"), "--model.model", "vil2_nano", "--model.checkpoint", raw,
            "--model.num_classes", "10", "--data.root", str(tree), "--data.img_size", "32", "--data.batch_size", "3",
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--model.model_kwargs", '{"img_size": 32, "mlstm_form": "parallel"}',
            "--trainer.logger", json.dumps({"class_path": "tasks.loggers.RunLogger", "init_args": {"save_dir": str(out)}})]
    assert cli.main(args) == 0
    measured = [r for r in rows(out / "version_0" / "metrics.csv") if r.get("val/acc")][0]

    model = timm.create_model("vil2_nano", pretrained=True, pretrained_cfg_overlay={"file": raw}, num_classes=10,
                              mlstm_form="parallel").eval().double()
    transform = create_transform(**resolve_data_config({}, model=model))
    correct = top5 = losses = 0.0
    files = sorted((p, i) for i, c in enumerate(classes) for p in (tree / "val" / c).iterdir())
    with torch.no_grad():
        for path, label in files:
            logits = model(transform(Image.open(path).convert("RGB")).unsqueeze(0).double())[0]
            correct += float(logits.argmax() == label)
            top5 += float(label in logits.topk(5).indices)
            losses += float(torch.nn.functional.cross_entropy(logits, torch.tensor(label)))
    assert float(measured["val/acc"]) == pytest.approx(correct / len(files), abs=1e-6)
    assert float(measured["val/acc_top5"]) == pytest.approx(top5 / len(files), abs=1e-6)
    assert float(measured["val/loss"]) == pytest.approx(losses / len(files), rel=1e-4)


# -- configs -------------------------------------------------------------------------------------------------------------
def _parsed(capsys, *configs: str) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(CONFIGS / c))] + ["--print_config"]
    capsys.readouterr()
    assert cli.main(args) == 0
    return yaml.safe_load(capsys.readouterr().out)


# Table 1 (epochs), Table 10 (ViL) and Table 13 (DeiT-III-T): row config -> (model, epochs, drop path, warmup)
TABLE_1 = {
    "vil2_tiny_e800.yaml": ("vil2_tiny", 800, 0.0, 5), "vil2_tiny_e800_ft224.yaml": ("vil2_tiny", 20, 0.0, 5),
    "vil2_tiny_e400.yaml": ("vil2_tiny", 400, 0.0, 5), "vil2_tiny_e400_ft224.yaml": ("vil2_tiny", 20, 0.0, 5),
    "vil2_small_e400.yaml": ("vil2_small", 400, 0.05, 5), "vil2_small_e400_ft224.yaml": ("vil2_small", 20, 0.05, 5),
    "vil2_base_e400.yaml": ("vil2_base", 400, 0.2, 5), "vil2_base_e400_ft224.yaml": ("vil2_base", 5, 0.2, 1),
    "deit3_tiny_e800.yaml": ("vit_tiny_patch16_224", 800, 0.0, 5),
    "deit3_tiny_e800_ft224.yaml": ("vit_tiny_patch16_224", 20, 0.0, 5),
}


@pytest.mark.parametrize("row", sorted(TABLE_1))
def test_configs_hold_the_papers_hyperparameters(row, capsys):
    cfg = _parsed(capsys, "base.yaml", row)
    model_name, epochs, drop_path, warmup = TABLE_1[row]
    finetune, deit = row.endswith("_ft224.yaml"), row.startswith("deit3")
    t, m, d = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    res, batch, lr = (224, 1024, 1e-5) if finetune else (192, 2048, 1e-3)
    expected = {
        ("trainer", "max_epochs"): epochs, ("trainer", "precision"): "bf16-mixed",
        ("trainer", "gradient_clip_val"): None if deit else 1.0,
        ("model", "model"): model_name, ("model", "library"): "timm" if deit else "vil",
        ("model", "lr"): lr, ("model", "lr_scale_divisor"): 1024, ("model", "global_batch_size"): batch,
        ("model", "weight_decay"): 0.05, ("model", "betas"): [0.9, 0.999], ("model", "warmup_epochs"): warmup,
        ("model", "min_lr"): 1e-6, ("model", "label_smoothing"): 0.0, ("model", "layer_decay"): None,
        ("model", "mixup_alpha"): 0.8, ("model", "cutmix_alpha"): 1.0, ("model", "mixup_switch_prob"): 0.5,
        ("model", "mixup_mode"): "batch", ("model", "compile"): "auto", ("model", "num_classes"): 1000,
        ("model", "require_checkpoint"): finetune,
        ("data", "img_size"): res, ("data", "crop_pct"): 1.0, ("data", "scale"): [0.08, 1.0],
        ("data", "hflip"): 0.5, ("data", "three_augment"): True, ("data", "color_jitter"): 0.3,
    }
    sections = {"trainer": t, "model": m, "data": d}
    for (section, key), value in expected.items():
        assert sections[section][key] == value, (row, section, key)
    assert d["batch_size"] * 8 == batch, "the recipe's global batch on 8 GPUs"
    kwargs = m["model_kwargs"]
    assert kwargs["img_size"] == res and kwargs["drop_path_rate"] == drop_path
    if deit:  # Table 13: depth 12, dim 192 (timm's vit_tiny), [CLS] pooling, LayerScale 1e-4
        assert kwargs["init_values"] == 1e-4 and kwargs["global_pool"] == "token" and kwargs["class_token"]
    else:
        assert kwargs["drop_path_schedule"] == "constant"


def test_deit3_tiny_is_timms_vision_transformer_with_table_13_settings():
    module = ImageNetClassificationModule(library="timm", model="vit_tiny_patch16_224", num_classes=10,
                                          model_kwargs={"img_size": 32, "init_values": 1e-4, "class_token": True,
                                                        "no_embed_class": True, "global_pool": "token"})
    from timm.models.vision_transformer import VisionTransformer

    vit = module.backbone
    assert isinstance(vit, VisionTransformer) and len(vit.blocks) == 12 and vit.embed_dim == 192
    assert vit.global_pool == "token" and float(vit.blocks[0].ls1.gamma[0]) == pytest.approx(1e-4)
    groups = module.param_groups(1e-3)
    no_wd = {n for g in groups if g["weight_decay"] == 0 for n, p in module.named_parameters()
             if any(p is q for q in g["params"])}
    assert "backbone.pos_embed" in no_wd and "backbone.cls_token" in no_wd and "backbone.head.weight" not in no_wd
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_gpu_decode_path_on_the_cpu_device(tmp_path):
    """decode='gpu': the workers send file bytes, the batch is decoded (JPEGs in one batched call, the PNG and
    CMYK files through the fallbacks) and augmented on the given device; here the CPU."""
    tree = make_tree(tmp_path / "tree")
    dm = ImageNetDataModule(str(tree), batch_size=18, num_workers=0, img_size=16, decode="gpu")
    dm.setup("fit")
    datas, labels, _ = next(iter(dm.train_dataloader()))
    assert len(datas) == 18 and datas[0].dtype == torch.uint8 and datas[0].ndim == 1
    x, y = dm.gpu_batch(datas, labels, torch.device("cpu"), training=True)
    assert x.shape == (18, 3, 16, 16) and x.dtype == torch.float32 and torch.equal(y, labels)
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7 and dm.skipped_files == []
    datas, labels, _ = next(iter(dm.val_dataloader()))
    datas[1] = torch.frombuffer(bytearray(b"not an image"), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="skipping 1 files"):
        x, y = dm.gpu_batch(datas, labels, torch.device("cpu"), training=False)
    assert x.shape == (8, 3, 16, 16) and torch.equal(y, labels[[0, 2, 3, 4, 5, 6, 7, 8]])
    assert len(dm.skipped_files) == 1


def test_bench_input_quick_smoke_run(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(CONFIGS / "bench_input.py"), "--quick", "--root", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("model (synthetic batch)", "loader, cpu decode", "fit, cpu decode"):
        assert line in proc.stdout
