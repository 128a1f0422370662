"""Results of a VTAB-1K sweep from its run records: the lr chosen per task on val200 only, the mean test
accuracy of the final runs, ``results.csv`` (one row per task), ``runs.csv`` (one row per run), ``table.md``
(the paper's Table 8 layout: 19 columns + natural / specialized / structured / average, with the paper's rows,
ours and the deltas) and ``chart.png``."""
from __future__ import annotations

import csv
import glob
import json
import os
import statistics
from collections import defaultdict

from tasks.files import atomic_path, write_text_atomic
from tasks.vtab.tasks import GROUPS, TASKS

# Table 8 of the paper (top-1 %, mean over 5 seeds), columns in the order of tasks.vtab.tasks.TASKS.
PAPER_TABLE8: dict[str, tuple[float, ...]] = {
    "DeiT-T": (47.7, 86.4, 63.7, 85.6, 87.0, 78.4, 35.3, 83.0, 93.4, 80.9, 70.7, 71.7, 60.3, 43.1, 78.5, 67.9, 41.6, 30.6, 32.7),
    "DeiT-III-T": (52.3, 90.1, 62.7, 88.8, 87.5, 83.7, 37.9, 83.2, 93.1, 81.1, 72.9, 76.6, 60.8, 44.9, 79.1, 67.5, 48.1, 31.0, 33.3),
    "Vim-T": (46.7, 86.3, 60.7, 84.0, 88.8, 76.1, 33.7, 82.2, 92.9, 75.2, 72.6, 59.8, 49.9, 39.3, 78.2, 51.2, 43.9, 26.9, 27.2),
    "ViL-T": (54.2, 90.2, 67.4, 90.7, 89.9, 81.6, 41.1, 83.4, 94.2, 82.7, 73.1, 80.7, 61.8, 49.4, 81.3, 57.8, 51.8, 31.4, 34.8),
    "DeiT-S": (57.0, 88.9, 68.2, 90.9, 90.8, 75.4, 42.1, 83.3, 94.0, 83.8, 74.0, 74.6, 58.3, 45.6, 78.2, 61.9, 47.9, 27.1, 31.9),
    "DeiT-III-S": (58.8, 88.6, 67.5, 90.9, 91.7, 84.4, 43.3, 84.4, 92.6, 82.5, 73.5, 76.5, 57.9, 46.2, 78.9, 58.3, 49.7, 23.7, 27.5),
    "Vim-S": (53.0, 87.2, 64.1, 86.8, 90.3, 65.8, 39.7, 82.4, 93.4, 78.0, 73.1, 63.1, 53.2, 42.3, 78.2, 54.1, 47.6, 27.1, 29.3),
    "ViL-S": (61.4, 89.6, 69.2, 92.8, 91.7, 78.7, 43.8, 85.5, 93.9, 84.4, 73.5, 84.0, 63.4, 51.3, 83.3, 61.0, 55.4, 32.4, 35.5),
    "DeiT-B": (61.8, 89.8, 67.5, 93.7, 92.6, 84.4, 45.6, 85.3, 95.1, 86.3, 74.2, 77.7, 59.9, 47.2, 81.7, 61.7, 51.4, 30.0, 36.2),
    "DeiT-III-B": (62.9, 89.6, 69.6, 93.7, 93.2, 87.0, 47.1, 85.8, 94.1, 85.6, 73.7, 80.5, 61.4, 48.4, 80.9, 64.4, 55.1, 30.2, 31.8),
    "ViL-B": (64.3, 90.0, 71.1, 93.4, 91.4, 79.6, 46.6, 84.7, 94.3, 85.4, 74.4, 83.7, 62.1, 52.7, 81.0, 63.1, 57.6, 32.6, 39.9),
}
# The paper's row for a model of this suite (deltas are taken against it).
PAPER_ROW_OF_MODEL = {"vil2_tiny": "ViL-T", "vil2_small": "ViL-S", "vil2_base": "ViL-B"}


def paper_accuracies(row: str) -> dict[str, float]:
    if row not in PAPER_TABLE8:
        raise ValueError(f"no paper row {row!r}; rows of Table 8: {', '.join(PAPER_TABLE8)}")
    return dict(zip(TASKS, PAPER_TABLE8[row]))


def group_averages(accuracies: dict[str, float]) -> dict[str, float | None]:
    """Mean per category and over all 19 tasks (the paper's Table 3 columns); None where a task is missing."""
    out: dict[str, float | None] = {}
    for group in GROUPS:
        names = [n for n, t in TASKS.items() if t.group == group]
        out[group] = statistics.fmean(accuracies[n] for n in names) if all(n in accuracies for n in names) else None
    out["average"] = statistics.fmean(accuracies[n] for n in TASKS) if all(n in accuracies for n in TASKS) else None
    return out


# -- records -----------------------------------------------------------------------------------------------------------
def load_records(out: str) -> list[dict]:
    """Every run record under ``out/runs`` (of all shards that wrote there)."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


def select_lr(records: list[dict], task: str, lrs: list[float], seeds: list[int]) -> tuple[float | None, dict[float, float]]:
    """The lr with the best mean val200 accuracy over the seeds (the first in ``lrs`` on a tie), from the
    finished ``val`` records of ``task`` alone: test records never enter. (None, means) until every
    (lr, seed) of the grid has finished."""
    acc = {(r["lr"], r["seed"]): r["acc"] for r in records
           if r["task"] == task and r["phase"] == "val" and r["status"] == "ok"}
    means = {lr: statistics.fmean(acc[lr, s] for s in seeds) for lr in lrs if all((lr, s) in acc for s in seeds)}
    if len(means) < len(lrs):
        return None, means
    best = max(lrs, key=lambda lr: (means[lr], -lrs.index(lr)))
    return best, means


def summarize(records: list[dict], lrs: list[float], seeds: list[int]) -> dict[str, dict]:
    """Per task with records: chosen lr, val means per lr, test accuracies of the chosen lr's final runs."""
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    summary = {}
    for task in TASKS:
        if task not in by_task:
            continue
        rs = by_task[task]
        lr, means = select_lr(rs, task, lrs, seeds)
        tests = sorted((r["seed"], r["acc"]) for r in rs
                       if r["phase"] == "test" and r["status"] == "ok" and lr is not None and r["lr"] == lr)
        accs = [a for _, a in tests]
        summary[task] = {
            "chosen_lr": lr, "val_means": means, "test_accs": accs,
            "test_mean": statistics.fmean(accs) if accs and len(accs) == len(seeds) else None,
            "test_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0 if accs else None,
            "failed": [r for r in rs if r["status"] != "ok"],
        }
    return summary


# -- output --------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown_table(ours: dict[str, float], our_label: str, paper_row: str | None) -> str:
    """Table 8's layout: one column per task, then the category means and the 19-task average (%)."""
    columns = [t.paper_name for t in TASKS.values()] + ["Natural", "Specialized", "Structured", "Average"]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]

    def row(label: str, acc: dict[str, float], signed: bool = False) -> str:
        cells = [_fmt(acc.get(n), signed) for n in TASKS] + [_fmt(v, signed) for v in group_averages(acc).values()]
        return f"| {label} | " + " | ".join(cells) + " |"

    for name in PAPER_TABLE8:
        lines.append(row(f"{name} (paper)", paper_accuracies(name)))
    lines.append(row(f"**{our_label}**", ours))
    if paper_row is not None:
        paper = paper_accuracies(paper_row)
        delta = {n: ours[n] - paper[n] for n in ours}
        averages, paper_averages = group_averages(ours), group_averages(paper)
        cells = [_fmt(delta.get(n), True) for n in TASKS]
        cells += [_fmt(None if averages[k] is None else averages[k] - paper_averages[k], True) for k in averages]
        lines.append(f"| Δ vs {paper_row} (paper) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_report(out: str, lrs: list[float] | None = None, seeds: list[int] | None = None, model: str | None = None,
                 paper_row: str | None = None) -> dict[str, str]:
    """Write results.csv, runs.csv, table.md and chart.png into ``out`` from its records; the grid and model
    default to those in ``out/sweep.json``. Returns the paths written."""
    settings = {}
    if os.path.isfile(os.path.join(out, "sweep.json")):
        with open(os.path.join(out, "sweep.json")) as f:
            settings = json.load(f)
    lrs = list(lrs or settings.get("lrs") or [])
    seeds = list(seeds or settings.get("seeds") or [])
    if not lrs or not seeds:
        raise ValueError(f"{out} has no sweep.json: give the lrs and seeds of the sweep")
    model = model or settings.get("model", "ours")
    paper_row = paper_row or PAPER_ROW_OF_MODEL.get(model)
    records = load_records(out)
    summary = summarize(records, lrs, seeds)
    ours = {task: 100 * s["test_mean"] for task, s in summary.items() if s["test_mean"] is not None}
    paper = paper_accuracies(paper_row) if paper_row else {}

    header = ["task", "group", "num_classes", "chosen_lr", *[f"val_acc_lr{lr:g}" for lr in lrs], "test_acc_mean",
              "test_acc_std", "test_seeds", "paper_acc", "delta", "failed_runs"]
    rows = []
    for task, s in summary.items():
        mean = ours.get(task)
        rows.append([task, TASKS[task].group, TASKS[task].num_classes, s["chosen_lr"] if s["chosen_lr"] is not None else "",
                     *[f"{100 * s['val_means'][lr]:.2f}" if lr in s["val_means"] else "" for lr in lrs],
                     f"{mean:.2f}" if mean is not None else "", f"{100 * s['test_std']:.2f}" if s["test_std"] is not None else "",
                     len(s["test_accs"]), paper.get(task, ""),
                     f"{mean - paper[task]:+.2f}" if mean is not None and task in paper else "", len(s["failed"])])
    paths = {name: os.path.join(out, name) for name in ("results.csv", "runs.csv", "table.md", "chart.png")}
    write_text_atomic(paths["results.csv"], _csv_text(header, rows))
    run_keys = ["task", "phase", "lr", "seed", "status", "acc", "eval_loss", "train_loss", "num_train", "num_eval",
                "seconds", "attempts", "error"]
    write_text_atomic(paths["runs.csv"], _csv_text(run_keys, [[r.get(k, "") for k in run_keys] for r in records]))

    label = f"{model} (ours)"
    text = [f"# VTAB-1K: {model}\n", f"Top-1 test accuracy (%), mean over {len(seeds)} seeds at the lr chosen on val200 "
            f"(lrs {', '.join(f'{lr:g}' for lr in lrs)}).\n", markdown_table(ours, label, paper_row)]
    text.append("\n| task | chosen lr | " + " | ".join(f"val lr {lr:g}" for lr in lrs) + " | test mean ± std | seeds |\n")
    text.append("|---|---:|" + "---:|" * len(lrs) + "---:|---:|\n")
    for task, s in summary.items():
        vals = " | ".join(f"{100 * s['val_means'][lr]:.1f}" if lr in s["val_means"] else "-" for lr in lrs)
        test = f"{ours[task]:.1f} ± {100 * s['test_std']:.1f}" if task in ours else "-"
        chosen = f"{s['chosen_lr']:g}" if s["chosen_lr"] is not None else "-"
        text.append(f"| {task} | {chosen} | {vals} | {test} | {len(s['test_accs'])} |\n")
    failed = [r for s in summary.values() for r in s["failed"]]
    if failed:
        text.append(f"\n## Failed runs ({len(failed)})\n\n")
        for r in failed:
            first = (r.get("error") or "").strip().splitlines()
            text.append(f"- {r['task']} {r['phase']} lr {r['lr']:g} seed {r['seed']}: "
                        f"{first[-1] if first else 'unknown error'} (attempts: {r.get('attempts')})\n")
    write_text_atomic(paths["table.md"], "".join(text))
    _chart(paths["chart.png"], ours, label, paper_row)
    return paths


def _chart(path: str, ours: dict[str, float], label: str, paper_row: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(TASKS)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.4 if paper_row else 0.8
    ours_values = [ours.get(n, np.nan) for n in names]
    ax.bar(x - (width / 2 if paper_row else 0), ours_values, width, label=label)
    if paper_row:
        paper = paper_accuracies(paper_row)
        ax.bar(x + width / 2, [paper[n] for n in names], width, label=f"{paper_row} (paper)", alpha=0.7)
    ax.set_xticks(x, [TASKS[n].paper_name for n in names], rotation=45, ha="right")
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("VTAB-1K")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
