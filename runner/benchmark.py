"""`train.py --benchmark`: is data ever the bottleneck? The loader alone, the model alone, and
the full training step, each timed after warm-up steps, printed as one table.

    python train.py --config FILE --data DIR --labels 10pct --out RUN_DIR \
        --benchmark [chosen|all] [--bench-warmup 2] [--bench-steps 10]

It runs after train.py's `setup()`, so every config check applies, and measures:
  1. loader alone: the chosen pipeline's batches and nothing else (with `all` also FFCV, DALI
     and the torchvision/PIL baseline of bench/, each built, timed and closed in turn);
  2. model alone: `Trainer.train_step` on one synthetic batch of the real batch's shapes, dtype
     and layout, already on the device (the compute limit at this precision and layout);
  3. the full step: `Trainer.train_step` on the chosen pipeline's batches, as training runs.
The table goes to stdout; RUN_DIR/benchmark.json holds every number, the config and the
machine. That file is all it writes: no config, split, log, metrics or checkpoint, so it needs
no `--force` and never clobbers a run already in RUN_DIR (it may sit beside one).

Timing: on CUDA, CUDA events at the two ends of each timed window and around every
`optimizer.step` (via the optimizer's step hooks), read after one synchronize at the end of the
window; on a CPU `time.perf_counter`. Data-wait is host time blocked in `next()` on the batch
iterator. Nothing in the timed loop reads the device per step (`SyncFreeLARS`, and the trainer
reads its finite flags late). Peak memory is per window: host RSS (Linux VmHWM, reset through
/proc/self/clear_refs; elsewhere the process's lifetime peak) and, on CUDA,
`torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.batch import Batch
from runner.config import ConfigError, to_dict
from runner.loop import Trainer
from runner.metrics import write_json

log = logging.getLogger(__name__)

BENCH_JSON = "benchmark.json"
MODES = ("chosen", "all")
ALL_LOADERS = ("ffcv", "dali", "torchvision")  # torchvision: the baseline in bench/
DEFAULT_WARMUP, DEFAULT_STEPS = 2, 10
# A loader row drains what the loader prefetched while it was built (DALI's queue, FFCV's
# batches ahead) before its clock starts, and times enough batches that a refilled queue does
# not dominate: with `--bench-warmup 1 --bench-steps 2` a DALI row read 3-4x its true rate.
LOADER_MIN_WARMUP, LOADER_MIN_STEPS = 4, 10
GOAL_FULL_OVER_MODEL = 0.95  # on a GPU: data costs at most 5% of the step
GOAL_OPTIMIZER_SHARE = 0.02  # on a GPU: the LARS step is at most 2% of the step


# ----------------------------------------------------------------------------- options


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags on train.py's parser."""
    g = p.add_argument_group("benchmark (writes only RUN_DIR/benchmark.json)")
    g.add_argument(
        "--benchmark",
        nargs="?",
        const="chosen",
        choices=MODES,
        help="time the loader alone, the model alone and the full step instead of training; "
        "`all` adds loader rows for ffcv, dali and the torchvision baseline",
    )
    g.add_argument(
        "--bench-warmup",
        type=int,
        metavar="N",
        help=f"untimed steps before each timed window (default {DEFAULT_WARMUP})",
    )
    g.add_argument("--bench-steps", type=int, metavar="N",
                   help=f"timed steps of each measurement (default {DEFAULT_STEPS})")  # fmt: skip


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """(warm-up, timed) steps; rejects bad counts and bench options without --benchmark."""
    given = {"--bench-warmup": args.bench_warmup, "--bench-steps": args.bench_steps}
    if args.benchmark is None:
        for flag, value in given.items():
            if value is not None:
                raise ConfigError(f"{flag}: only has a meaning with --benchmark")
        return DEFAULT_WARMUP, DEFAULT_STEPS
    for flag in ("resume", "force"):
        if getattr(args, flag, False):
            raise ConfigError(
                f"--benchmark with --{flag}: a benchmark leaves the run in --out as it is (it "
                "writes only benchmark.json); drop --" + flag
            )
    warmup = DEFAULT_WARMUP if args.bench_warmup is None else args.bench_warmup
    steps = DEFAULT_STEPS if args.bench_steps is None else args.bench_steps
    if warmup < 0:
        raise ConfigError(f"--bench-warmup: must be >= 0, got {warmup}")
    if steps < 1:
        raise ConfigError(f"--bench-steps: must be >= 1, got {steps}")
    return warmup, steps


# ----------------------------------------------------------------------------- clocks


class Clock:
    """Marks on the device's timeline: CUDA events (read after one sync), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class OptimizerTimer:
    """Time inside `optimizer.step` (step pre/post hooks), while `active`; read at the end."""

    def __init__(self, optimizer: torch.optim.Optimizer, clock: Clock):
        self.clock, self.active = clock, False
        self.marks: list[tuple] = []
        self._start = None
        self.handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, *_) -> None:
        if self.active:
            self._start = self.clock.mark()

    def _post(self, *_) -> None:
        if self.active:
            self.marks.append((self._start, self.clock.mark()))

    def start(self) -> None:
        self.marks, self.active = [], True

    def stop(self) -> float:
        """Seconds spent in the optimizer since `start` (the window is already synchronized)."""
        self.active = False
        return sum(self.clock.seconds(a, b) for a, b in self.marks)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> str:
    """Starts a new peak window; returns its host scope: "window" or "process" (lifetime)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return "window"
    except OSError:
        return "process"


def peak_host_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def peak_device_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# ------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One measurement. Per-step counts are over all ranks; rates are counts / seconds."""

    name: str
    kind: str  # loader | model | full
    steps: int = 0
    seconds: float = 0.0
    unlabeled: int = 0  # unlabeled source images per step
    views: int = 0  # unlabeled views per step
    labeled: int = 0  # labeled images per step
    trained: int = 0  # images the model trains on per step (labeled only while SuNCEt is on)
    data_wait: float | None = None  # share of the window blocked on the next batch
    optimizer: float | None = None  # share of the window inside optimizer.step
    host_rss_mb: float | None = None
    host_peak_scope: str | None = None
    device_mb: float | None = None
    over_model: float | None = None  # full-step rate / model-alone rate
    skipped: str | None = None  # why a loader of `all` could not run

    def rates(self) -> dict[str, float]:
        per_s = self.steps / self.seconds
        return {
            "steps_per_s": per_s,
            "images_per_s": per_s * self.unlabeled,
            "views_per_s": per_s * self.views,
            "labeled_per_s": per_s * self.labeled,
            "trained_images_per_s": per_s * self.trained,
        }

    def record(self) -> dict:
        rec = asdict(self)
        if self.skipped is None:
            rec.update(self.rates())
        return rec


def endless(pipeline, epoch: int = 0) -> Iterator[Batch]:
    """The pipeline's batches, epoch after epoch."""
    while True:
        pipeline.set_epoch(epoch)
        n = 0
        for batch in pipeline:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the pipeline yields no batches")
        epoch += 1


def synthetic_like(batch: Batch) -> Batch:
    """Random views with `batch`'s shapes, dtype, device and memory format; its labels."""
    fake = lambda views: [torch.randn_like(v) for v in views]  # preserve_format: channels-last
    return Batch(
        unlabeled_views=fake(batch.unlabeled_views),
        labeled_views=fake(batch.labeled_views),
        labels=batch.labels.clone(),
        indices=batch.indices.clone(),
        labeled_indices=batch.labeled_indices.clone(),
    )


class Bench:
    """The measurements of one `--benchmark` run on a set-up trainer."""

    def __init__(self, trainer: Trainer, warmup: int, steps: int, epoch: int = 0):
        self.trainer, self.warmup, self.steps, self.epoch = trainer, warmup, steps, epoch
        self.device = trainer.info.device
        self.world = trainer.info.world_size
        self.clock = Clock(self.device)
        self.sup = trainer.sup_active(epoch)
        # A flat LR (the schedule's first, smallest step) for any number of steps.
        total = trainer.step + 2 * (warmup + steps)
        trainer.schedule = np.full(total, float(trainer.schedule[0]))

    def fill(self, row: Row, batch: Batch) -> Row:
        row.unlabeled = batch.batch_size * self.world
        row.views = row.unlabeled * len(batch.unlabeled_views)
        row.labeled = batch.n_labeled * self.world
        row.trained = self.trainer.step_images(batch, self.sup)
        row.host_rss_mb = peak_host_rss_mb()
        row.device_mb = peak_device_mb(self.device)
        return row

    def loader(self, name: str, pipeline) -> tuple[Row, Batch]:
        """Batches only; returns the row and a synthetic copy of the last batch (made before
        the loader may reuse that batch's memory)."""
        it = endless(pipeline, self.epoch)
        steps = max(self.steps, LOADER_MIN_STEPS)
        try:
            for _ in range(max(self.warmup, LOADER_MIN_WARMUP)):
                next(it)
            self.clock.sync()
            scope = reset_peak_memory(self.device)
            start = self.clock.mark()
            for _ in range(steps):
                batch = next(it)
            seconds = self.clock.seconds(start, self.clock.mark())
            fake = synthetic_like(batch)
        finally:
            it.close()
        row = Row(name, "loader", steps, seconds, host_peak_scope=scope)
        return self.fill(row, fake), fake

    def train(self, name: str, kind: str, next_batch: Callable[[], Batch]) -> Row:
        """`warmup` then `steps` training steps; data-wait and the optimizer's share."""
        trainer = self.trainer
        timer = OptimizerTimer(trainer.optimizer, self.clock)
        wait = 0.0
        try:
            for i in range(self.warmup + self.steps):
                if i == self.warmup:
                    trainer.resolve_flags(wait_all=True)  # the warm-up's late flag reads
                    self.clock.sync()
                    scope = reset_peak_memory(self.device)
                    wait, start = 0.0, self.clock.mark()
                    timer.start()
                t = time.perf_counter()
                batch = next_batch()
                wait += time.perf_counter() - t
                trainer.train_step(batch, self.epoch)
                trainer.step += 1
            seconds = self.clock.seconds(start, self.clock.mark())
            optimizer = timer.stop()
        finally:
            timer.close()
        trainer.resolve_flags(wait_all=True)  # after the window: every flag read, acted on
        row = Row(name, kind, self.steps, seconds, host_peak_scope=scope)
        row.data_wait = min(wait / seconds, 1.0)
        row.optimizer = optimizer / seconds
        return self.fill(row, batch)


# ------------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    """Where the figures come from."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {
        "device": str(device),
        "cpu": name,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }  # fmt: skip
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    else:
        out["device_name"] = name
    return out


def _cell(value: float | None, fmt: str, unit: str = "") -> str:
    return "" if value is None else f"{format(value, fmt)}{unit}"


def format_table(rows: list[Row]) -> str:
    """Markdown: one line per row; rates per second, shares in %, memory in MB."""
    head = (
        "| measurement | steps/s | img/s | views/s | labeled img/s | data-wait | optimizer "
        "| peak host RSS | peak device | x model alone |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    body = []
    for r in rows:
        if r.skipped is not None:
            body.append(f"| {r.name} | skipped: {r.skipped} |" + " |" * 8)
            continue
        x = r.rates()
        cells = [
            r.name,
            _cell(x["steps_per_s"], ",.2f"),
            _cell(x["images_per_s"], ",.1f"),
            _cell(x["views_per_s"], ",.1f"),
            _cell(x["labeled_per_s"], ",.1f"),
            _cell(None if r.data_wait is None else 100 * r.data_wait, ".1f", "%"),
            _cell(None if r.optimizer is None else 100 * r.optimizer, ".1f", "%"),
            _cell(r.host_rss_mb, ",.0f", " MB"),
            _cell(r.device_mb, ",.0f", " MB"),
            _cell(r.over_model, ".3f"),
        ]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, *body])


def title(trainer: Trainer, warmup: int, steps: int, sup: bool) -> str:
    cfg, info = trainer.cfg, trainer.info
    d, a, m = cfg.data, cfg.aug, cfg.model
    layout = "channels-last" if m.channels_last else "contiguous"
    views = f"{a.n_large}x{a.large_size}" + (f" + {a.n_small}x{a.small_size}" if a.n_small else "")
    return (
        f"benchmark | {m.arch} {cfg.run.precision} {layout} on {info.device} "
        f"({os.cpu_count()} cores, torch {torch.__version__}) | {d.backend} pipeline, batch "
        f"{d.batch_size} x {info.world_size} rank(s), views {views}, labeled "
        f"{d.classes_per_batch}x{d.images_per_class} x {d.n_supervised_views} view(s), SuNCEt "
        f"{'on' if sup else 'off'} | {warmup} warm-up + {steps} timed steps per row (loader "
        f"rows: {max(warmup, LOADER_MIN_WARMUP)} + {max(steps, LOADER_MIN_STEPS)})"
    )


def summary(full: Row) -> str:
    return (
        f"full step / model alone: {full.over_model:.3f} (goal >= {GOAL_FULL_OVER_MODEL} on a "
        f"GPU) | optimizer share of the full step: {100 * full.optimizer:.1f}% (goal <= "
        f"{100 * GOAL_OPTIMIZER_SHARE:g}%) | data-wait {100 * full.data_wait:.1f}%"
    )


# --------------------------------------------------------------------------------- run


def run_benchmark(
    args: argparse.Namespace,
    trainer: Trainer,
    pipeline,
    make_pipeline: Callable[[str], object],
    command: list[str] | None = None,
) -> dict:
    """Times loader, model and full step; prints the table, writes RUN_DIR/benchmark.json.

    Args:
        args: train.py's parsed arguments (`--benchmark`, `--bench-warmup`, `--bench-steps`).
        trainer: from train.py's `setup()`.
        pipeline: the chosen pipeline, from the same `setup()`.
        make_pipeline: builds another pipeline by name (ffcv | dali | torchvision) with the
            run's settings, for `--benchmark all`.
        command: the command line, for the record.

    Returns:
        The JSON record.
    """
    warmup, steps = check_args(args)
    cfg, chosen = trainer.cfg, trainer.cfg.data.backend
    bench = Bench(trainer, warmup, steps)
    rows: list[Row] = []

    # 1. The chosen loader alone; its last batch gives the model-alone batch its shapes.
    log.info("benchmark: loader alone (%s)", chosen)
    row, fake = bench.loader(f"loader alone: {chosen} (chosen)", pipeline)
    rows.append(row)

    # 2. The model alone on that synthetic on-device batch, then 3. the full training step.
    log.info("benchmark: model alone")
    model = bench.train(f"model alone: synthetic batch on {bench.device}", "model", lambda: fake)
    model.over_model = 1.0
    log.info("benchmark: full step (%s)", chosen)
    batches = endless(pipeline, bench.epoch)
    try:
        full = bench.train(f"full step: {chosen}", "full", lambda: next(batches))
    finally:
        batches.close()
    full.over_model = full.rates()["steps_per_s"] / model.rates()["steps_per_s"]
    rows += [model, full]

    # 4. With `all`: every other loader, one at a time (built, timed, closed).
    if args.benchmark == "all":
        for name in (n for n in ALL_LOADERS if n != chosen):
            label = "torchvision/PIL baseline" if name == "torchvision" else name
            log.info("benchmark: loader alone (%s)", label)
            try:
                other = make_pipeline(name)
            except (ValueError, OSError, ImportError) as e:  # a format this dataset lacks
                rows.insert(len(rows) - 2, Row(f"loader alone: {label}", "loader", skipped=str(e)))
                continue
            try:
                rows.insert(len(rows) - 2, bench.loader(f"loader alone: {label}", other)[0])
            finally:
                other.close()

    result = {
        "command": command or [Path(sys.argv[0]).name, *sys.argv[1:]],
        "mode": args.benchmark,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "sup_active": bench.sup,
        "world_size": trainer.info.world_size,
        "machine": machine(bench.device),
        "config": to_dict(cfg),
        "rows": [r.record() for r in rows],
        "full_over_model": full.over_model,
        "optimizer_share": full.optimizer,
        "data_wait": full.data_wait,
        "goals": {"full_over_model": GOAL_FULL_OVER_MODEL, "optimizer_share": GOAL_OPTIMIZER_SHARE},
    }
    if trainer.info.is_main:
        path = trainer.run_dir / BENCH_JSON
        write_json(path, result)
        text = f"{title(trainer, warmup, steps, bench.sup)}\n\n{format_table(rows)}\n\n"
        print(f"{text}{summary(full)}\nwrote {path}", flush=True)
    return result
