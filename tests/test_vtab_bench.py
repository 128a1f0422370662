import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_sweep_quick_runs_a_mini_sweep_and_projects_the_full_one():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "SLURM_"))}
    result = subprocess.run(["timeout", "-k", "10", "240", sys.executable, "experiments/vtab/bench_sweep.py", "--quick"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "bare training step" in out and "img/s" in out
    line = [l for l in out.splitlines() if l.startswith("runs-per-gpu 1:")][0]
    assert "18 runs in" in line and "projected full 570-run sweep" in line and "GPU-hours" in line
