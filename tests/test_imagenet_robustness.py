"""Table 9 robustness: mCE against a hand calculation, the A/R 200-class subsets, and `vil robustness` end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import cli
from tasks.imagenet import robustness
from tasks.imagenet.robustness import ALEXNET_ERR, CORRUPTIONS, mean_corruption_error


def test_mce_of_a_hand_made_example_equals_the_hand_calculation():
    # model errors per severity: 0.2 0.3 0.4 0.5 0.6 (mean 0.4) for every corruption except fog (all 0.8)
    errors = {c: [0.2, 0.3, 0.4, 0.5, 0.6] for c in CORRUPTIONS}
    errors["fog"] = [0.8] * 5
    # by hand: CE_c = 100 * 0.4 / AlexNet_c (fog: 100 * 0.8 / 0.819324), mCE = their mean over 15
    by_hand = (sum(100 * 0.4 / ALEXNET_ERR[c] for c in CORRUPTIONS if c != "fog") + 100 * 0.8 / 0.819324) / 15
    assert mean_corruption_error(errors) == pytest.approx(by_hand, rel=1e-12)
    # one corruption in numbers: gaussian noise 0.4 / 0.886428 = 45.1249...%
    assert robustness.corruption_errors({"gaussian_noise": [0.4] * 5})["gaussian_noise"] == pytest.approx(
        45.12492, abs=1e-4)
    assert len(CORRUPTIONS) == 15 and "speckle_noise" not in CORRUPTIONS
    del errors["fog"]
    with pytest.raises(ValueError, match=r"missing \['fog'\]"):
        mean_corruption_error(errors)


# (wnid, ImageNet-1K index) pairs from ../shared/reference/imagenet-variants.md
A_PAIRS = [("n01498041", 6), ("n01531178", 11), ("n02099601", 207), ("n02445715", 361), ("n03452741", 579), ("n12267677", 988)]
R_PAIRS = [("n01443537", 1), ("n01484850", 2), ("n10565667", 983), ("n12267677", 988), ("n07920052", 967)]


@pytest.mark.parametrize("name, pairs, first, last", [("a", A_PAIRS, 6, 988), ("r", R_PAIRS, 1, 988)])
def test_subsets_map_the_documented_wnids_to_their_logit_indices(name, pairs, first, last):
    wnids = robustness.imagenet_wnids()
    indices = robustness.subset_indices(name)
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    assert len(indices) == 200 and indices == sorted(set(indices)) and (indices[0], indices[-1]) == (first, last)
    for wnid, index in pairs:
        assert wnids.index(wnid) == index and index in indices


def _images(folder, n, rng, size=(20, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")


def test_robustness_command_writes_the_table_and_resumes(tmp_path, capsys):
    import vil

    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        for s in range(1, 6):
            _images(tmp_path / "c" / c / str(s) / "n01440764", 1, rng)
    _images(tmp_path / "a" / "n01498041", 2, rng)  # A index 6 -> subset class 0
    _images(tmp_path / "a" / "n12267677", 1, rng)  # 988 -> subset class 199
    _images(tmp_path / "sketch" / "val" / "n01443537", 2, rng)  # the authors' layout with a val/ level
    model = vil.create_model("vil2_nano", num_classes=1000, dim=32, depth=1, patch_size=4, img_size=16)
    with torch.no_grad():  # always predict class 6: right on A's n01498041, wrong elsewhere
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[6] = 10.0
        model.head.bias[0] = 20.0  # class 0 (n01440764, not in the A subset) wins over all 1000 logits
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    args = ["robustness", "--model", "vil2_nano", "--checkpoint", str(ckpt), "--model-kwargs",
            json.dumps({"dim": 32, "depth": 1, "patch_size": 4, "mlstm_form": "chunkwise"}), "--img-size", "16",
            "--imagenet-c", str(tmp_path / "c"), "--imagenet-a", str(tmp_path / "a"),
            "--imagenet-sketch", str(tmp_path / "sketch"), "--batch-size", "4", "--num-workers", "0",
            "--device", "cpu", "--precision", "32", "--out", str(out)]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    # C: every image is n01440764 = class 0, predicted 0: error 0 -> mCE 0
    assert all(results[f"imagenet_c/{c}/{s}"]["acc"] == 1.0 for c in CORRUPTIONS for s in range(1, 6))
    # A: restricted to the 200 subset logits, class 0 is out, 6 (subset 0) wins: 2 of 3 right
    assert results["imagenet_a"] == {**results["imagenet_a"], "acc": pytest.approx(2 / 3), "images": 3}
    assert results["imagenet_sketch"]["acc"] == 0.0 and results["imagenet_sketch"]["images"] == 2
    table = (out / "table.md").read_text()
    assert "| IN-C mCE | 0.00 |" in table and "| IN-A top-1 | 66.67 |" in table and "| Sketch top-1 | 0.00 |" in table
    (out / "table.md").unlink()
    stamp = (out / "results.json").stat().st_mtime_ns
    assert cli.main(args) == 0, "a rerun reuses the results"
    assert (out / "results.json").stat().st_mtime_ns == stamp and (out / "table.md").is_file()
    capsys.readouterr()
    assert cli.main(["robustness", "--checkpoint", str(ckpt), "--out", str(out),
                     "--imagenet-r", str(tmp_path / "nowhere")]) == 2
    assert "--imagenet-r" in capsys.readouterr().err
