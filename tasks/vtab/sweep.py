"""`vil vtab`: the VTAB-1K protocol as one command (paper Tables 3 and 8, recipe of Table 11).

    vil vtab --config experiments/vtab/recipe.yaml --config experiments/vtab/vil2_tiny.yaml \\
             --checkpoint vil2_tiny16_e800_in1k.th --data-root /data/vtab-1k --out runs/vtab/vil2_tiny
    vil vtab ... --shard 0/4            # node 0 of 4 over a shared --out folder
    vil vtab report runs/vtab/vil2_tiny # results.csv, table.md, chart.png from the records (all shards)
    vil vtab prepare --from tfds --tfds-dir ~/tensorflow_datasets --out /data/vtab-1k   # folder format, PNG

Per task: len(lrs) x len(seeds) runs train800 -> val200 choose the lr (mean val accuracy over the seeds), then
len(seeds) runs train800val200 -> test at that lr give the result (mean test accuracy). Each finished run is a
JSON record in ``OUT/runs/<task>/`` written atomically; a restart skips the finished runs. A failed run is
retried once and then recorded as failed (a later restart tries it again). The runs go to long-lived worker
processes, ``--runs-per-gpu`` per visible GPU, which keep their compiled model between runs; on the CPU they
run one by one in this process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.strategies import SingleDeviceStrategy
from tqdm import tqdm

import vil
from tasks.callbacks import CPUThreads
from tasks.files import read_json, write_json_atomic
from tasks.vtab.data import VtabDataError, VtabDataModule, decode_split, open_source
from tasks.vtab.module import VtabModule
from tasks.vtab.report import select_lr, write_report
from tasks.vtab.tasks import SPLITS, TASKS, resolve_tasks
from vil.checkpoint import CheckpointError

RECIPE_KEYS = ("model", "model_kwargs", "epochs", "warmup_epochs", "batch_size", "img_size", "weight_decay",
               "layer_decay", "min_lr", "lrs", "seeds", "precision", "source")


@dataclasses.dataclass(frozen=True, order=True)
class RunSpec:
    """One fine-tuning run: ``val`` runs train on train800 and evaluate on val200, ``test`` runs train on
    train800val200 and evaluate on test."""
    task: str
    phase: str
    lr: float
    seed: int

    @property
    def train_split(self) -> str:
        return "train800" if self.phase == "val" else "train800val200"

    @property
    def eval_split(self) -> str:
        return "val200" if self.phase == "val" else "test"

    @property
    def name(self) -> str:
        return f"{self.task}/{self.phase}-lr{self.lr:g}-seed{self.seed}"


class SweepError(Exception):
    """A problem found before any run starts; printed as one line, exit code 2."""


# -- the command line --------------------------------------------------------------------------------------------------
def build_parser():
    p = ArgumentParser(prog="vil vtab", description="VTAB-1K fine-tuning sweep (lr search on val200 over seeds, "
                       "then test runs at the chosen lr). Subcommands: `vil vtab report DIR`, `vil vtab prepare`.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options (repeatable)")
    p.add_argument("--out", type=str, required=True, help="output folder: run records, results, table, chart")
    p.add_argument("--model", type=str, default="vil2_tiny", help="registered model (vil.list_models())")
    p.add_argument("--model-kwargs", type=dict, default={}, help="further vil.create_model arguments")
    p.add_argument("--checkpoint", type=str, default=None, help="pre-trained weights every run starts from")
    p.add_argument("--tasks", type=str, nargs="+", default=["all"], help="task names (default: all 19)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 7.5e-4, 5e-4, 2.5e-4, 1e-4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--data-root", type=str, default=None, help="folder format: <root>/<task>/{split}.txt")
    p.add_argument("--tfds-dir", type=str, default=None, help="tensorflow-datasets data dir (ArrayRecord)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine schedule")
    p.add_argument("--precision", type=str, default="auto", help="Trainer precision; auto: bf16-mixed on GPU, 32 on CPU")
    p.add_argument("--compile", type=str, default="auto", help="BackboneModule compile choice")
    p.add_argument("--accelerator", type=str, default="auto", help="auto (GPUs when there are), gpu or cpu")
    p.add_argument("--devices", type=int, nargs="+", default=None, help="GPU indices (default: all visible)")
    p.add_argument("--runs-per-gpu", type=int, default=2, help="concurrent runs (worker processes) per GPU")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes on the CPU (default 0: runs in this process); ignored with GPUs")
    p.add_argument("--cpu-threads", type=int, default=1, help="intra-op threads of a CPU run")
    p.add_argument("--shard", type=str, default="0/1", help="i/n: this node's part of the run list")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed run before it is reported")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="how often to look for other shards' records")
    p.add_argument("--progress", type=bool, default=True, help="show the progress bar")
    return p


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SweepError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise SweepError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def main(argv: list[str]) -> int:
    """VTAB-1K sweep: fine-tune on the 19 tasks with per-task lr search (also: report, prepare)."""
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    if argv and argv[0] == "prepare":
        from tasks.vtab.prepare import main as prepare_main

        return prepare_main(argv[1:])
    cfg = build_parser().parse_args(argv)
    cfg = {k.replace("-", "_"): v for k, v in vars(cfg).items() if k != "config"}
    try:
        return run_sweep(cfg)
    except SweepError as e:
        print(f"vil vtab: error: {e}", file=sys.stderr)
        return 2


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vil vtab report", description="Merge the run records of DIR (all shards) "
                                "into results.csv, runs.csv, table.md and chart.png")
    p.add_argument("out")
    p.add_argument("--paper-row", default=None, help="paper row for the deltas (default: by the sweep's model)")
    args = p.parse_args(argv)
    try:
        paths = write_report(args.out, paper_row=args.paper_row)
    except ValueError as e:
        print(f"vil vtab report: error: {e}", file=sys.stderr)
        return 2
    with open(paths["table.md"]) as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0


# -- checks before any run -------------------------------------------------------------------------------------------
def check_data(cfg: dict, tasks) -> list[str]:
    """Open every task's source and check its splits (list files, images, labels); SweepError for the first
    problem. Returns one line per task saying what was found."""
    if (cfg["data_root"] is None) == (cfg["tfds_dir"] is None):
        raise SweepError("give exactly one of --data-root (folder format) and --tfds-dir (tensorflow-datasets)")
    root = cfg["data_root"] or cfg["tfds_dir"]
    if not os.path.isdir(root):
        raise SweepError(f"data folder {root} does not exist")
    lines = []
    for task in tasks:
        try:
            source = open_source(task, cfg["data_root"], cfg["tfds_dir"])
            counts = source.check(SPLITS)
        except VtabDataError as e:
            raise SweepError(str(e)) from None
        lines.append(f"{source.describe()}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return lines


def check_model(cfg: dict) -> None:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*freshly initialized head")
            vil.create_model(cfg["model"], checkpoint=cfg["checkpoint"], num_classes=2,
                             **{"img_size": cfg["img_size"], **cfg["model_kwargs"]})
    except (ValueError, CheckpointError, TypeError, FileNotFoundError, RuntimeError) as e:
        raise SweepError(f"cannot build {cfg['model']} from {cfg['checkpoint']}: {e}") from None


def resolve_precision(cfg: dict, use_gpu: bool) -> str:
    if cfg["precision"] != "auto":
        return cfg["precision"]
    return "bf16-mixed" if use_gpu else "32-true"


# -- records ---------------------------------------------------------------------------------------------------------
class RecordStore:
    """Run records in ``out/runs/<task>/<phase>-lr<lr>-seed<seed>.json``, shared by all shards.

    A finished run's record (status ``ok``) never changes, so it is read from disk once and then kept: the
    scheduler asks for every lr-search record of every task at each turn of its loop."""

    def __init__(self, out: str):
        self.out = out
        self._finished: dict[RunSpec, dict] = {}

    def path(self, spec: RunSpec) -> str:
        return os.path.join(self.out, "runs", f"{spec.name}.json")

    def read(self, spec: RunSpec) -> dict | None:
        if spec in self._finished:
            return self._finished[spec]
        record = read_json(self.path(spec))
        if record is None:
            return None
        self._keep(spec, record)
        return record

    def write(self, spec: RunSpec, record: dict) -> None:
        write_json_atomic(self.path(spec), record)
        self._keep(spec, record)

    def _keep(self, spec: RunSpec, record: dict) -> None:
        if record.get("status") == "ok":
            self._finished[spec] = record


def check_settings(out: str, settings: dict) -> None:
    """``out/sweep.json`` holds the settings that decide a run's result; a restart (or another shard) with
    other settings would mix incomparable runs."""
    path = os.path.join(out, "sweep.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        differ = [k for k in RECIPE_KEYS if saved.get(k) != settings.get(k)]
        if differ:
            details = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise SweepError(f"{out} holds a sweep with other settings ({details}); use another --out")
        settings = {**saved, **settings, "tasks": sorted(set(saved.get("tasks", [])) | set(settings["tasks"]))}
    write_json_atomic(path, settings)


# -- one run ---------------------------------------------------------------------------------------------------------
class Runner:
    """Runs RunSpecs one after the other with one module: the model is built (and compiled, on the GPU) once;
    each run reloads the checkpoint weights into it and draws a fresh head from the run's seed. The decoded
    images of the task in use stay in memory."""

    def __init__(self, cfg: dict, accelerator: str):
        self.cfg, self.accelerator = cfg, accelerator
        self.precision = resolve_precision(cfg, accelerator == "gpu")
        device = torch.device("cuda", torch.cuda.current_device()) if accelerator == "gpu" else torch.device("cpu")

        class KeepOnDevice(SingleDeviceStrategy):
            """Lightning moves the module to the CPU after each fit; keeping it in place keeps the compiled
            blocks' CUDA graphs (recorded for these parameter addresses) valid for the next run."""

            def teardown(self):
                self.precision_plugin.teardown()
                self.accelerator.teardown()

        self.strategy_class, self.device = KeepOnDevice, device
        self.module = VtabModule(model=cfg["model"], checkpoint=cfg["checkpoint"], num_classes=2,
                                 model_kwargs={"img_size": cfg["img_size"], **cfg["model_kwargs"]},
                                 weight_decay=cfg["weight_decay"], layer_decay=cfg["layer_decay"],
                                 warmup_epochs=cfg["warmup_epochs"], min_lr=cfg["min_lr"], compile=cfg["compile"])
        self.module.to(device)
        self._arrays: dict[tuple[str, str], tuple] = {}
        self._sources: dict[str, object] = {}

    def arrays(self, task: str, split: str):
        key = (task, split)
        if key not in self._arrays:
            for other in [k for k in self._arrays if k[0] != task]:  # keep one task's images in memory
                del self._arrays[other]
            self._sources = {k: v for k, v in self._sources.items() if k == task}
            if task not in self._sources:
                self._sources[task] = open_source(task, self.cfg["data_root"], self.cfg["tfds_dir"])
            self._arrays[key] = decode_split(self._sources[task], split, self.cfg["img_size"])
        return self._arrays[key]

    def run(self, spec: RunSpec) -> dict:
        start = time.time()
        task = TASKS[spec.task]
        arrays = {s: self.arrays(spec.task, s) for s in (spec.train_split, spec.eval_split)}
        decoded = time.time()
        L.seed_everything(spec.seed, verbose=False)
        self.module.start_run(task.num_classes, spec.lr, spec.seed)
        data = VtabDataModule(task.name, img_size=self.cfg["img_size"], train_split=spec.train_split,
                              eval_split=spec.eval_split, batch_size=self.cfg["batch_size"],
                              eval_batch_size=self.cfg["eval_batch_size"], seed=spec.seed, arrays=arrays)
        epochs = self.cfg["epochs"]
        steps_per_epoch = math.ceil(len(arrays[spec.train_split][1]) / self.cfg["batch_size"])
        timer = PhaseTimer()
        callbacks = [timer] + ([CPUThreads(self.cfg["cpu_threads"])] if self.accelerator == "cpu" else [])
        trainer = L.Trainer(
            accelerator=self.accelerator, devices=1, strategy=self.strategy_class(device=self.device),
            precision=self.precision, max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            # the accuracy is that of the final epoch: evaluate once, after it
            check_val_every_n_epoch=epochs, log_every_n_steps=steps_per_epoch, callbacks=callbacks)
        trainer.fit(self.module, datamodule=data)
        metrics = trainer.callback_metrics
        return {
            "acc": float(metrics["val/acc"]), "eval_loss": float(metrics["val/loss"]),
            "train_loss": float(metrics["train/loss_epoch"]), "num_train": int(len(arrays[spec.train_split][1])),
            "num_eval": int(len(arrays[spec.eval_split][1])), "decode_seconds": round(decoded - start, 3),
            "train_seconds": round(timer.train_seconds, 3), "eval_seconds": round(timer.eval_seconds, 3),
            "seconds": round(time.time() - start, 3),
        }


class PhaseTimer(L.Callback):
    """Seconds spent training and evaluating in one fit (for the benchmark's projection)."""

    train_seconds = eval_seconds = 0.0

    def _now(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, module):
        self.t_train = self._now(module)

    def on_validation_start(self, trainer, module):
        self.t_eval = self._now(module)
        self.train_seconds += self.t_eval - self.t_train

    def on_validation_end(self, trainer, module):
        self.eval_seconds += self._now(module) - self.t_eval
        self.t_train = self._now(module)


def quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in ("does not have many workers", "The number of training batches", "Trying to infer the `batch_size`",
                    "GPU available but not used", "keeping the model's freshly initialized head"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")


# -- executors -------------------------------------------------------------------------------------------------------
class InProcess:
    """One slot: the runs go one by one through a Runner in this process (the CPU path)."""

    def __init__(self, cfg: dict, accelerator: str = "cpu"):
        quiet_lightning()
        self.runner = Runner(cfg, accelerator)
        self.slots = {0: None}  # slot -> running spec
        self.last_task = {0: None}

    def free_slots(self) -> list[int]:
        return [s for s, spec in self.slots.items() if spec is None]

    def submit(self, slot: int, spec: RunSpec) -> None:
        self.slots[slot] = spec
        self.last_task[slot] = spec.task

    def wait(self, timeout: float) -> list[tuple[RunSpec, dict | None, str | None]]:
        spec = self.slots[0]
        if spec is None:
            time.sleep(timeout)
            return []
        self.slots[0] = None
        try:
            return [(spec, self.runner.run(spec), None)]
        except Exception:
            return [(spec, None, traceback.format_exc())]

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the sweep process dies, so a killed sweep leaves no runs behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(slot: int, gpu: int | None, cfg: dict, inbox, outbox) -> None:
    """A long-lived worker: one Runner (one compiled model) for all the runs it is sent."""
    _die_with_parent()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    quiet_lightning()
    try:
        runner = Runner(cfg, "gpu" if gpu is not None else "cpu")
    except Exception:
        outbox.put(("init_failed", slot, None, traceback.format_exc()))
        return
    outbox.put(("ready", slot, None, None))
    parent = mp.parent_process()
    while True:
        try:
            spec = inbox.get(timeout=5)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if spec is None:
            return
        try:
            outbox.put(("done", slot, spec, runner.run(spec)))
        except Exception:
            outbox.put(("failed", slot, spec, traceback.format_exc()))


class WorkerPool:
    """Worker processes (spawned: ArrayRecord readers and CUDA do not survive a fork), one per slot; a worker
    that dies is replaced and its run counts as a failed attempt."""

    def __init__(self, cfg: dict, gpus: Sequence[int | None]):
        self.cfg, self.ctx = cfg, mp.get_context("spawn")
        self.outbox = self.ctx.Queue()
        self.gpus = list(gpus)
        self.procs, self.inboxes = {}, {}
        self.slots: dict[int, RunSpec | None] = {}
        self.ready: set[int] = set()
        self.last_task: dict[int, str | None] = {}
        for slot in range(len(self.gpus)):
            self._start(slot)

    def _start(self, slot: int) -> None:
        self.inboxes[slot] = self.ctx.Queue()
        self.procs[slot] = self.ctx.Process(target=worker_main, name=f"vtab-worker-{slot}", daemon=True,
                                            args=(slot, self.gpus[slot], self.cfg, self.inboxes[slot], self.outbox))
        self.procs[slot].start()
        self.slots[slot], self.last_task[slot] = None, None
        self.ready.discard(slot)

    def free_slots(self) -> list[int]:
        return [s for s, spec in self.slots.items() if spec is None and s in self.ready]

    def submit(self, slot: int, spec: RunSpec) -> None:
        self.slots[slot] = spec
        self.last_task[slot] = spec.task
        self.inboxes[slot].put(spec)

    def wait(self, timeout: float) -> list[tuple[RunSpec, dict | None, str | None]]:
        results = []
        try:
            message = self.outbox.get(timeout=timeout)
        except queue.Empty:
            message = None
        while message is not None:
            kind, slot, spec, payload = message
            if kind == "ready":
                self.ready.add(slot)
            elif kind == "init_failed":
                raise RuntimeError(f"worker {slot} could not start:\n{payload}")
            else:
                self.slots[slot] = None
                results.append((spec, payload if kind == "done" else None, payload if kind == "failed" else None))
            try:
                message = self.outbox.get_nowait()
            except queue.Empty:
                message = None
        for slot, proc in self.procs.items():
            if not proc.is_alive():
                if slot not in self.ready:
                    raise RuntimeError(f"worker {slot} exited with code {proc.exitcode} before it was ready")
                spec = self.slots[slot]
                if spec is not None:
                    results.append((spec, None, f"worker process exited with code {proc.exitcode} during the run"))
                self._start(slot)
        return results

    def close(self) -> None:
        for slot, inbox in self.inboxes.items():
            if self.procs[slot].is_alive():
                inbox.put(None)
        for proc in self.procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


# -- the sweep -------------------------------------------------------------------------------------------------------
def plan(tasks, lrs: list[float], seeds: list[int], shard: tuple[int, int]) -> tuple[list[RunSpec], dict[str, list[int]]]:
    """This shard's val runs, and per task the seeds of its test runs (their lr is known only once the task's val
    runs are done). Runs are dealt round-robin over the shards in a fixed order, so the shards are disjoint."""
    i, n = shard
    val = [RunSpec(t.name, "val", lr, seed) for t in tasks for lr in lrs for seed in seeds]
    val = [spec for k, spec in enumerate(val) if k % n == i]
    test_seeds, k = {}, 0
    for t in tasks:
        test_seeds[t.name] = []
        for seed in seeds:
            if k % n == i:
                test_seeds[t.name].append(seed)
            k += 1
    return val, test_seeds


def run_sweep(cfg: dict) -> int:
    try:
        tasks = resolve_tasks(cfg["tasks"])
    except ValueError as e:
        raise SweepError(str(e)) from None
    shard = parse_shard(cfg["shard"])
    lrs, seeds = list(cfg["lrs"]), list(cfg["seeds"])
    if not lrs or not seeds or len(set(lrs)) != len(lrs) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--lrs {lrs} and --seeds {seeds} must be non-empty without repeats")
    for line in check_data(cfg, tasks):
        print(line, flush=True)
    check_model(cfg)

    if cfg["accelerator"] not in ("auto", "gpu", "cpu"):
        raise SweepError(f"--accelerator {cfg['accelerator']!r}: expected auto, gpu or cpu")
    gpus = [] if cfg["accelerator"] == "cpu" else list(
        cfg["devices"] if cfg["devices"] is not None else range(torch.cuda.device_count()))
    if cfg["accelerator"] == "gpu" and not gpus:
        raise SweepError("--accelerator gpu but no GPU is visible")
    use_gpu = bool(gpus)
    settings = {k: cfg[k] for k in RECIPE_KEYS if k in cfg}
    settings.update(precision=resolve_precision(cfg, use_gpu), source="tfds" if cfg["tfds_dir"] else "folder",
                    checkpoint=cfg["checkpoint"], tasks=[t.name for t in tasks])
    os.makedirs(cfg["out"], exist_ok=True)
    check_settings(cfg["out"], settings)

    store = RecordStore(cfg["out"])
    val_specs, test_seeds = plan(tasks, lrs, seeds, shard)
    total = len(val_specs) + sum(len(v) for v in test_seeds.values())
    attempts: dict[RunSpec, int] = {}
    given_up: set[RunSpec] = set()
    running: set[RunSpec] = set()

    if use_gpu:
        pool = WorkerPool(cfg, [g for g in gpus for _ in range(cfg["runs_per_gpu"])])
    elif cfg["workers"]:
        pool = WorkerPool(cfg, [None] * cfg["workers"])
    else:
        pool = InProcess(cfg, "cpu")
    slots = len(pool.slots)
    print(f"vil vtab: {total} runs in shard {shard[0]}/{shard[1]} ({len(val_specs)} lr-search runs, test runs "
          f"after each task's search), {slots} slot(s) on {'GPU ' + str(gpus) if use_gpu else 'CPU'}; "
          f"records in {os.path.join(cfg['out'], 'runs')}", flush=True)

    def status(spec: RunSpec) -> str | None:
        record = store.read(spec)
        return None if record is None else record["status"]

    done = {spec for spec in val_specs if status(spec) == "ok"}
    bar = tqdm(total=total, initial=0, desc="vtab runs", unit="run", dynamic_ncols=True,
               disable=not cfg["progress"], file=sys.stderr)
    failed_count, skipped, blocked = 0, len(done), {}
    try:
        while True:
            pending = [s for s in val_specs if s not in done and s not in running and s not in given_up]
            # A task's test runs are known once all its lr-search records (of any shard) are in.
            blocked, waiting = {}, False
            for task in tasks:
                if not test_seeds[task.name]:
                    continue
                records = [store.read(RunSpec(task.name, "val", lr, s)) for lr in lrs for s in seeds]
                records = [r for r in records if r is not None]
                lr, _ = select_lr(records, task.name, lrs, seeds)
                if lr is None:
                    mine_left = any(s.task == task.name and s not in done and s not in given_up for s in val_specs)
                    if any(r["status"] != "ok" for r in records) and not mine_left:
                        blocked[task.name] = "its lr search has failed runs"
                    else:
                        waiting = True
                    continue
                for seed in test_seeds[task.name]:
                    spec = RunSpec(task.name, "test", lr, seed)
                    if spec in done or spec in running or spec in given_up:
                        continue
                    if status(spec) == "ok":
                        done.add(spec)
                        skipped += 1
                    else:
                        pending.append(spec)
            bar.n = len(done)
            bar.set_postfix(running=len(running), failed=failed_count, left=total - len(done) - len(given_up),
                            refresh=False)
            bar.refresh()
            if not pending and not running:
                if waiting:  # other shards' lr-search runs are still going
                    time.sleep(cfg["poll_seconds"])
                    continue
                break
            # assign: a slot keeps the task it had (its decoded images stay in memory)
            for slot in pool.free_slots():
                if not pending:
                    break
                same = [s for s in pending if s.task == pool.last_task[slot]]
                spec = (same or pending)[0]
                pending.remove(spec)
                running.add(spec)
                attempts[spec] = attempts.get(spec, 0) + 1
                pool.submit(slot, spec)
            for spec, result, error in pool.wait(timeout=0.5):
                running.discard(spec)
                record = {**dataclasses.asdict(spec), "train_split": spec.train_split, "eval_split": spec.eval_split,
                          "attempts": attempts[spec], "host": socket.gethostname(), "finished_at": time.time()}
                if result is not None:
                    store.write(spec, {**record, "status": "ok", **result})
                    done.add(spec)
                else:
                    failed_count += 1
                    tqdm.write(f"vil vtab: {spec.name} failed (attempt {attempts[spec]}): "
                               f"{error.strip().splitlines()[-1]}", file=sys.stderr)
                    if attempts[spec] > cfg["retries"]:
                        store.write(spec, {**record, "status": "failed", "error": error})
                        given_up.add(spec)
    finally:
        bar.close()
        pool.close()

    paths = write_report(cfg["out"], lrs=lrs, seeds=seeds, model=cfg["model"])
    with open(paths["table.md"]) as f:
        print(f.read())
    print(f"vil vtab: {len(done)} of {total} runs finished ({skipped} from earlier), {len(given_up)} failed"
          + (f"; blocked tasks: {blocked}" if blocked else "") + f"; wrote {', '.join(paths.values())}")
    return 1 if given_up or blocked else 0
