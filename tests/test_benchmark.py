import math

from experiments import benchmark


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
