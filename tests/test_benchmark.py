import math

from experiments import benchmark, flops


def test_quick_benchmark_prints_ratios(tmp_path, capsys):
    table = benchmark.main(["--quick", "--sizes", "tiny", "--res", "32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ViL/DeiT" in out and "ViL/auth" in out
    assert {(r["task"], r["res"]) for r in table} == {("train", 32), ("infer", 32)}
    for row in table:
        assert row["vil_img_s"] > 0 and row["deit_img_s"] > 0 and row["authors_img_s"] > 0
        assert math.isfinite(row["vil_over_deit"]) and math.isfinite(row["vil_over_authors"])
    assert (tmp_path / "benchmark.csv").read_text().startswith("size,res,task")
    assert (tmp_path / "benchmark.png").stat().st_size > 5_000


def test_flops_table(capsys):
    (row,) = flops.main(["--sizes", "tiny", "--res", "64"])
    assert "ViL/DeiT" in capsys.readouterr().out
    # 16 tokens, where the linear layers dominate: per token and block ViL-T's 192 -> 2 x 384 -> 192
    # projections (~221k multiply-adds) against DeiT-T's qkv, output and 4x MLP (~442k), 24 blocks against 12.
    assert 1.05 < row["vil_flops"] / row["deit_flops"] < 1.5


def test_table_shows_kinds_left_out_as_dashes(capsys):
    nan = float("nan")
    benchmark.print_table([dict(size="tiny", res=224, task="train", vil_img_s=5424.7, deit_img_s=nan,
                                vil_over_deit=nan, authors_img_s=3183.0, vil_over_authors=1.704, quad_over_bi=nan,
                                vil_peak_gib=9.97, deit_peak_gib=nan)])
    row = capsys.readouterr().out.splitlines()[-1]
    assert "nan" not in row
    assert row.split() == ["tiny", "224", "train", "5424.7", "-", "-", "3183.0", "1.70x", "-", "9.97", "-"]
