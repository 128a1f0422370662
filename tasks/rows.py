"""``vil list``, ``vil run`` and ``vil report``: the paper's table rows of ``experiments/rows.py`` as commands.

A row's stages run in order, each as a subprocess (``vil fit ...``, ``vil vtab ...``), in ``OUT/<row>/<stage>/``:

    OUT/t1-vil-t/pretrain/version_0/...      the stage's run folder (RunLogger), checkpoints/last.ckpt
    OUT/t1-vil-t/pretrain/running.json       while the stage runs: pid, host, command
    OUT/t1-vil-t/pretrain/done.json          written atomically when the stage finished: its outputs

A stage with ``done.json`` is skipped; a ``fit`` stage without one but with a ``last.ckpt`` resumes from it
(``--ckpt_path``, the same run folder); the next stage gets the finished stage's checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from experiments.rows import ROWS, Row, Stage, get_row, rows_of_table
from tasks.files import atomic_path, read_json, write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "runs"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class RowError(Exception):
    """A mistake in the command line or a stage that failed; printed as one line."""


# -- markers and status -------------------------------------------------------------------------------------------------
def stage_dir(out: str | os.PathLike, row: Row, stage: Stage) -> Path:
    return Path(out) / row.id / stage.name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_status(out, row: Row, stage: Stage) -> str:
    """``done``, ``running`` (a live process on this host, or another host's marker), ``stopped`` (killed:
    ``vil run`` resumes it) or ``not run``."""
    folder = stage_dir(out, row, stage)
    if (folder / "done.json").is_file():
        return "done"
    running = read_json(folder / "running.json")
    if running:
        if running.get("host") != socket.gethostname() or _pid_alive(int(running.get("pid", -1))):
            return "running"
        return "stopped"
    return "stopped" if folder.is_dir() and any(folder.iterdir()) else "not run"


def row_status(out, row: Row) -> str:
    states = [stage_status(out, row, s) for s in row.stages]
    if all(s == "done" for s in states):
        return "done"
    if "running" in states:
        return f"running ({row.stages[states.index('running')].name})"
    done = sum(s == "done" for s in states)
    if done or "stopped" in states:
        return f"stopped ({done}/{len(states)} stages done)"
    return "not run"


# -- vil list -----------------------------------------------------------------------------------------------------------
def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 1 else f"{h:.2f}"


def format_cost(row: Row) -> tuple[str, str]:
    cost = row.cost
    loader = "-" if cost.loader is None else f"{_hours(cost.loader[0])}-{_hours(cost.loader[1])}"
    return _hours(cost.model), loader


def list_rows(table: str | None, out: str) -> list[dict]:
    rows = []
    for row in rows_of_table(table):
        model_h, loader_h = format_cost(row)
        rows.append(dict(row=row.id, tables=",".join(row.tables), label=row.label,
                         paper="; ".join(f"{n.column} {n.value:g}" for n in row.numbers),
                         stages=" -> ".join(s.name for s in row.stages), gpu_hours=model_h,
                         gpu_hours_with_loader=loader_h, status=row_status(out, row)))
    return rows


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def list_main(argv: list[str]) -> int:
    """Every paper table row: its paper numbers, stages, H200 cost and status (done / running / not run)."""
    p = argparse.ArgumentParser(prog="vil list", description=list_main.__doc__)
    p.add_argument("--table", default=None, help="only the rows of this paper table (1-9; 4 = 4a-4d, or 4a)")
    p.add_argument("--out", default=DEFAULT_OUT, help="the output folder of `vil run` (status)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    args = p.parse_args(argv)
    rows = list_rows(args.table, args.out)
    if not rows:
        print(f"vil list: error: no rows for table {args.table!r}; tables: 1-9 (4a-4d, 5a-5b)", file=sys.stderr)
        return 2
    header = list(rows[0])
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows([r[k] for k in header] for r in rows)
    else:
        print(markdown(["row", "tables", "label", "paper", "stages", "H200 GPU-h", "GPU-h with ImageNet loader",
                        "status"], [[r[k] for k in header] for r in rows]), end="")
        print("\nGPU-hours on one H200 from the suite's measured throughput (experiments/rows.py); the loader column "
              "with JPEG decoding at 1,100-1,400 img/s on 16 cores. ViL-S/B: 0.48x/0.20x of ViL-T's img/s (H100 ratios).")
    return 0


# -- vil run ------------------------------------------------------------------------------------------------------------
def _run_folders(folder: Path) -> list[Path]:
    runs = [p for p in folder.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
    return sorted(runs, key=lambda p: int(p.name[8:]))


def last_checkpoint(folder: Path) -> Path | None:
    """The newest run folder's ``checkpoints/last.ckpt`` under a stage folder (None when there is none)."""
    for run in reversed(_run_folders(folder)):
        ckpt = run / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            return ckpt
    return None


def split_overrides(tokens: list[str], row: Row) -> dict[str, list[str]]:
    """Overrides per stage: tokens before any ``@NAME`` go to every stage; ``@NAME`` (a stage name, a command
    such as ``@fit`` / ``@vtab``, ``@all``, or several joined by commas) directs the tokens after it to those
    stages."""
    names = {s.name for s in row.stages} | {s.command for s in row.stages} | {"all"}
    per_stage: dict[str, list[str]] = {s.name: [] for s in row.stages}
    targets = {"all"}
    for tok in tokens:
        if tok.startswith("@") and len(tok) > 1:
            targets = set(tok[1:].split(","))
            if targets - names:
                raise RowError(f"{tok}: row {row.id} has no stage or command {', '.join(sorted(targets - names))} "
                               f"(stages: {', '.join(s.name for s in row.stages)})")
            continue
        for s in row.stages:
            if targets & {"all", s.name, s.command}:
                per_stage[s.name].append(tok)
    return per_stage


def _launcher_ranks() -> tuple[int, int, int]:
    """(global rank, world size, local rank) of this process under torchrun / fabric run / srun; (0, 1, 0) alone."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def stage_command(row: Row, stage: Stage, out: Path, handed: Path | None, overrides: list[str],
                  devices: int | None, num_nodes: int | None) -> list[str]:
    """The argv of one stage (a Python subprocess)."""
    folder = stage_dir(out, row, stage)
    if stage.command == "python":
        script, *script_args = stage.configs
        return [sys.executable, str(REPO / script), *script_args, *stage.args, "--out", str(folder), *overrides]
    argv = [sys.executable, "-m", "tasks.cli", stage.command]
    for config in stage.configs:
        argv += ["--config", str(REPO / config)]
    argv += list(stage.args)
    if handed is not None:
        argv += [stage.takes_flag, str(handed)]
    rank, world, local_rank = _launcher_ranks()
    if stage.command in LIGHTNING_COMMANDS:
        argv += ["--trainer.logger.init_args.save_dir", str(folder), "--trainer.default_root_dir", str(folder)]
        if devices is not None:
            argv += ["--trainer.devices", str(devices)]
        if num_nodes is not None:
            argv += ["--trainer.num_nodes", str(num_nodes)]
        resume = last_checkpoint(folder) if stage.command == "fit" else None
        if resume is not None:
            argv += ["--ckpt_path", str(resume)]
    elif stage.command == "vtab":
        argv += ["--out", str(folder)]
        if world > 1:  # one shard per launched process, on its own GPU
            argv += ["--shard", f"{rank}/{world}", "--devices", str(local_rank)]
        elif devices is not None:
            argv += ["--devices", *map(str, range(devices))]
    elif stage.command == "robustness":
        argv += ["--out", str(folder)]
    return argv + overrides


def stage_output(row: Row, stage: Stage, out: Path) -> dict:
    """What a finished stage hands on: its run folder and checkpoint (fit), or its output folder."""
    folder = stage_dir(out, row, stage)
    outputs: dict = {"folder": str(folder)}
    if stage.command == "fit":
        runs = _run_folders(folder)
        if not runs:
            raise RowError(f"stage {stage.name} of {row.id} finished without a run folder under {folder}")
        run = runs[-1]
        ckpt = run / "checkpoints" / f"{stage.hands}.ckpt"
        if not ckpt.is_file():
            ckpt = run / "checkpoints" / "last.ckpt"
        outputs.update(run=str(run), checkpoint=str(ckpt) if ckpt.is_file() else None)
    elif stage.command in LIGHTNING_COMMANDS:
        runs = _run_folders(folder)
        outputs.update(run=str(runs[-1]) if runs else None)
    return outputs


def run_row(row: Row, out: str | os.PathLike, overrides: list[str] = (), devices: int | None = None,
            num_nodes: int | None = None, stages: list[str] | None = None, dry_run: bool = False) -> int:
    """Run the row's stages in order (or only ``stages``), skipping finished ones; returns the exit code."""
    out = Path(out).resolve()
    per_stage = split_overrides(list(overrides), row)
    for name in stages or ():
        row.stage(name)  # unknown names: KeyError with the row's stages
    rank, world, _ = _launcher_ranks()
    handed: dict[str, Path | None] = {}
    for i, stage in enumerate(row.stages):
        folder = stage_dir(out, row, stage)
        done = read_json(folder / "done.json")
        selected = not stages or stage.name in stages
        if stage.takes is not None and stage.takes not in handed:
            raise RowError(f"stage {stage.name} of {row.id} takes the checkpoint of {stage.takes}, which comes later")
        source = handed.get(stage.takes) if stage.takes else None
        if done is not None:
            print(f"[{row.id}] {i + 1}/{len(row.stages)} {stage.name}: done, skipped ({folder}/done.json)", flush=True)
            handed[stage.name] = Path(done["checkpoint"]) if done.get("checkpoint") else None
            continue
        if not selected:
            handed[stage.name] = None
            continue
        if stage.takes is not None and source is None:
            raise RowError(f"stage {stage.name} of {row.id} needs the checkpoint of stage {stage.takes}, which is not "
                           f"done: run it first (vil run {row.id})")
        argv = stage_command(row, stage, out, source, per_stage[stage.name], devices, num_nodes)
        resumed = "--ckpt_path" in argv and stage.command == "fit"
        print(f"[{row.id}] {i + 1}/{len(row.stages)} {stage.name}: {'resuming' if resumed else 'starting'}: "
              f"{shlex.join(argv)}", flush=True)
        if dry_run:
            handed[stage.name] = folder / "<checkpoint>"
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if world > 1 and rank != 0 and stage.command not in (*LIGHTNING_COMMANDS, "vtab"):
            # A single-process stage (robustness, a benchmark) runs on rank 0; the other ranks wait for it.
            while not (folder / "done.json").is_file():
                time.sleep(10)
            handed[stage.name] = None
            continue
        if rank == 0:
            write_json_atomic(folder / "running.json", dict(pid=os.getpid(), host=socket.gethostname(),
                                                             started=time.time(), argv=argv))
        start = time.time()
        rc = subprocess.call(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": _pythonpath()})
        if rc != 0:
            print(f"[{row.id}] {stage.name} failed with exit code {rc}; `vil run {row.id}` resumes it", file=sys.stderr)
            return rc
        outputs = stage_output(row, stage, out)
        if rank == 0:
            write_json_atomic(folder / "done.json", dict(row=row.id, stage=stage.name, argv=argv,
                                                          seconds=round(time.time() - start, 1), finished=time.time(),
                                                          world_size=world, **outputs))
            (folder / "running.json").unlink(missing_ok=True)
        handed[stage.name] = Path(outputs["checkpoint"]) if outputs.get("checkpoint") else None
    print(f"[{row.id}] all stages done; `vil report {out}` collects the results", flush=True)
    return 0


def _pythonpath() -> str:
    parts = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def run_main(argv: list[str]) -> int:
    """Run a paper table row's stages in order, skipping finished stages and resuming a killed one."""
    p = argparse.ArgumentParser(
        prog="vil run", description=run_main.__doc__,
        epilog="Overrides (after the options) go to every stage; after @STAGE (or @fit, @vtab, ...) only to that "
               "stage (@a,b: several), e.g. vil run t7-vil-t-e800 --devices 8 @pretrain,finetune --data.init_args.root "
               "/data/imagenet @vtab --data-root /data/vtab-1k @ade20k,ade20k-ms --data.init_args.root /data/ADEChallengeData2016")
    p.add_argument("row", help="row id (vil list)")
    p.add_argument("--devices", type=int, default=None, help="GPUs per node (default: the configs' choice)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes (Lightning's --trainer.num_nodes)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder: OUT/<row>/<stage>/")
    p.add_argument("--stages", type=lambda v: [s for s in v.split(",") if s], default=None,
                   help="run only these stages, comma-separated (the stages they take checkpoints from must be done)")
    p.add_argument("--dry-run", action="store_true", help="print the stages' commands, run nothing")
    args, overrides = p.parse_known_args(argv)
    try:
        return run_row(get_row(args.row), args.out, overrides, args.devices, args.num_nodes, args.stages, args.dry_run)
    except (RowError, KeyError) as e:
        print(f"vil run: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2


# -- metrics of finished stages -----------------------------------------------------------------------------------------
def read_metrics_csv(path: Path) -> dict[str, float]:
    """The last logged value of every column of a run's metrics.csv."""
    from tasks.callbacks import read_metrics

    return {key: series[-1][1] for key, series in read_metrics(str(path)).items()}


def _percent(key: str, value: float) -> float:
    # Accuracies are logged as fractions, mIoU / aAcc / mAcc in percent already.
    return 100.0 * value if key.split("/")[-1].startswith("acc") else value


def stage_metrics(out, row: Row, stage: Stage) -> dict[str, float]:
    """The numbers a finished stage produced, in the paper's units (percent, hours)."""
    folder = stage_dir(out, row, stage)
    if stage.command in LIGHTNING_COMMANDS:
        runs = _run_folders(folder)
        path = runs[-1] / "metrics.csv" if runs else None
        if path is None or not path.is_file():
            return {}
        return {k: _percent(k, v) for k, v in read_metrics_csv(path).items()}
    if stage.command == "vtab":
        from tasks.vtab.report import group_averages

        path = folder / "results.csv"
        if not path.is_file():
            return {}
        with open(path, newline="") as f:
            accs = {r["task"]: float(r["test_acc_mean"]) for r in csv.DictReader(f) if r["test_acc_mean"]}
        return {**accs, **{k: v for k, v in group_averages(accs).items() if v is not None}}
    if stage.command == "robustness":
        from tasks.imagenet.robustness import build_table

        results = read_json(folder / "results.json") or {}
        return build_table({k: v for k, v in results.items() if k != "_meta"})[1]
    if stage.command == "python":
        path = folder / "benchmark.csv"
        return benchmark_hours(path) if path.is_file() else {}
    return {}


def read_benchmark(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def benchmark_hours(path: Path, epochs: int = 10) -> dict[str, float]:
    """Table 6's number from benchmark.csv: hours for ``epochs`` ImageNet-1K epochs at the ViL training img/s at 224."""
    from experiments.rows import IMAGENET_TRAIN_IMAGES

    hours = {}
    for r in read_benchmark(path):
        img_s = float(r.get("vil_img_s") or "nan")
        if r.get("task") == "train" and int(r["res"]) == 224 and img_s > 0:
            hours[f"hours{epochs}_{r['size']}"] = epochs * IMAGENET_TRAIN_IMAGES / img_s / 3600
    return hours


# -- vil report ---------------------------------------------------------------------------------------------------------
TABLE_TITLES = {"1": "Table 1: ImageNet-1K", "2": "Table 2: ADE20K (UperNet)", "3": "Table 3: VTAB-1K",
                "4": "Table 4: architecture ablations", "5": "Table 5: classification design",
                "6": "Table 6: runtime", "7": "Table 7: 400 vs 800 epochs", "8": "Table 8: VTAB-1K per task",
                "9": "Table 9: robustness"}


def collect(out) -> list[dict]:
    """One record per paper number of every row with a finished stage: paper value, ours, delta."""
    records = []
    for row in ROWS.values():
        metrics = {s.name: stage_metrics(out, row, s) for s in row.stages if stage_status(out, row, s) == "done"}
        if not metrics:
            continue
        for n in row.numbers:
            ours = metrics.get(n.stage, {}).get(n.metric)
            records.append(dict(row=row.id, tables=n.tables or row.tables, label=row.label, column=n.column, paper=n.value,
                                ours=ours, delta=None if ours is None else ours - n.value,
                                lower_is_better=n.lower_is_better, status=row_status(out, row)))
    return records


def _fmt(v, signed=False):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:+.2f}" if signed else f"{v:.2f}")


def report_markdown(records: list[dict]) -> str:
    parts = ["# Paper vs ours\n", "Finished stages of `vil run` rows; ours in the paper's units; delta = ours - paper "
             "(for IN-C mCE and hours lower is better).\n"]
    for table, title in TABLE_TITLES.items():
        recs = [r for r in records if any(t.rstrip("abcd") == table for t in r["tables"])]
        if not recs:
            continue
        parts.append(f"\n## {title}\n\n")
        parts.append(markdown(["row", "label", "column", "paper", "ours", "delta", "status"],
                              [[r["row"], r["label"], r["column"], f"{r['paper']:g}", _fmt(r["ours"]),
                                _fmt(r["delta"], True), r["status"]] for r in recs]))
    return "".join(parts)


def _run_config(run: Path) -> dict:
    import yaml

    path = run / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def accuracy_vs_flops(out) -> list[dict]:
    """Points (model, GFLOPs at the stage's resolution, top-1) of finished ImageNet classification stages."""
    import vil
    from tasks.base import create_backbone

    points = []
    for row in ROWS.values():
        for n in row.numbers:
            stage = row.stage(n.stage)
            if n.metric != "val/acc" or stage_status(out, row, stage) != "done":
                continue
            ours = stage_metrics(out, row, stage).get("val/acc")
            runs = _run_folders(stage_dir(out, row, stage))
            init = (_run_config(runs[-1]).get("model") or {}).get("init_args", {}) if runs else {}
            if ours is None or not init:
                continue
            kwargs = dict(init.get("model_kwargs") or {})
            res = kwargs.get("img_size", 224)
            try:
                model = create_backbone(init.get("library", "vil"), init["model"],
                                        num_classes=init.get("num_classes", 1000), **kwargs)
                flops = vil.count_flops(model, res) / 1e9
            except Exception as e:  # a model the counter cannot build is left out of the plot, named
                print(f"vil report: no FLOPs for {row.id}/{stage.name}: {e}", file=sys.stderr)
                continue
            points.append(dict(row=row.id, label=row.label, gflops=flops, acc=ours, paper=n.value,
                               paper_gflops=float(row.flops.rstrip("G")) if row.flops else None))
    return points


def plot_accuracy_vs_flops(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p["gflops"] for p in points], [p["acc"] for p in points], color="tab:blue", label="ours", zorder=3)
    paper = [p for p in points if p["paper_gflops"]]
    ax.scatter([p["paper_gflops"] for p in paper], [p["paper"] for p in paper], marker="x", color="tab:red",
               label="paper", zorder=3)
    for p in points:
        ax.annotate(p["row"], (p["gflops"], p["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="GFLOPs per image (forward, vil.count_flops)", ylabel="ImageNet-1K top-1 (%)",
           title="accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_throughput(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for size in dict.fromkeys(r["size"] for r in rows):
        for task in ("train", "infer"):
            sel = sorted((int(r["res"]), r) for r in rows if r["size"] == size and r["task"] == task)
            for key, style in (("vil_img_s", "-o"), ("deit_img_s", "--s")):
                pts = [(res, float(r[key])) for res, r in sel if r.get(key) and not math.isnan(float(r[key]))]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{key.split('_')[0]} {size} {task}")
    ax.set(xlabel="resolution (px)", ylabel="img/s", yscale="log", title="throughput vs resolution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_report(out, dest=None, benchmark: str | None = None) -> dict[str, Path]:
    """report.md, report.csv, accuracy_vs_flops.png and (with a benchmark.csv) throughput.png into ``dest``."""
    out = Path(out)
    dest = Path(dest or out)
    dest.mkdir(parents=True, exist_ok=True)
    records = collect(out)
    written = {}
    path = dest / "report.md"
    write_text_atomic(path, report_markdown(records))
    written["report.md"] = path
    path = dest / "report.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "tables", "label", "column", "paper", "ours", "delta"])
        for r in records:
            writer.writerow([r["row"], " ".join(r["tables"]), r["label"], r["column"], r["paper"],
                             "" if r["ours"] is None else f"{r['ours']:.4f}",
                             "" if r["delta"] is None else f"{r['delta']:.4f}"])
    written["report.csv"] = path
    points = accuracy_vs_flops(out)
    if points:
        written["accuracy_vs_flops.png"] = dest / "accuracy_vs_flops.png"
        plot_accuracy_vs_flops(points, written["accuracy_vs_flops.png"])
    candidates = [Path(benchmark)] if benchmark else sorted(out.glob("*/*/benchmark.csv"))
    bench = [r for c in candidates if c.is_file() for r in read_benchmark(c)]
    if benchmark and not bench:
        raise RowError(f"--benchmark {benchmark}: no such file or no rows")
    if bench:
        written["throughput.png"] = dest / "throughput.png"
        plot_throughput(bench, written["throughput.png"])
    return written


def report_main(argv: list[str]) -> int:
    """Finished rows' metrics as Markdown tables beside the paper's numbers with deltas, plus PNG plots."""
    p = argparse.ArgumentParser(prog="vil report", description=report_main.__doc__)
    p.add_argument("out", nargs="?", default=DEFAULT_OUT, help="the output folder of `vil run` (default: runs)")
    p.add_argument("--dest", default=None, help="where to write report.md and the plots (default: OUT)")
    p.add_argument("--benchmark", default=None, help="a benchmark.csv of experiments/benchmark.py "
                   "(default: those of the t6-runtime row under OUT)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        print(f"vil report: error: {args.out} is not a folder (the --out of vil run)", file=sys.stderr)
        return 2
    try:
        written = write_report(args.out, args.dest, args.benchmark)
    except RowError as e:
        print(f"vil report: error: {e}", file=sys.stderr)
        return 2
    print(Path(written["report.md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
