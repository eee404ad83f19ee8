"""SuNCEt pre-training: NT-Xent on unlabeled multi-crop views + SuNCEt on a labeled batch.

    python train.py --data DIR --labels 1pct|10pct|FILE [--out RUN_DIR]
        [--pipeline ffcv|dali|synthetic] [--device cpu|cuda] [--epochs N]
        [--config FILE.toml] [--resume] [--force] [--batch-size 64 ...] [--set run.seed=1]
        [--benchmark [chosen|all] [--bench-warmup 2] [--bench-steps 10]]

Under torchrun every rank runs this file; rank 0 alone logs, plots and checkpoints. This file
only wires the rooms together, in stages: config, run folder, labels, model, data, loop.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import sys
import typing
from dataclasses import dataclass, replace
from logging.handlers import MemoryHandler
from pathlib import Path

import numpy as np
import torch

from runner import checkpoint as ckpt
from runner import config as rc
from runner import metrics
from runner.distributed import (
    DistInfo,
    RanksFailed,
    agree,
    all_agree,
    barrier,
    cleanup,
    env_world,
    init_distributed,
    lost_peer,
    wrap_model,
)
from runner.sigterm import SigtermGuard, stop_line

log = logging.getLogger("train")

CONFIG_JSON = "config.json"
SPLIT_FILE = "labels.txt"
DATASET_JSON = "dataset.json"  # which training images the run is on (a resume checks them)
RUN_FILES = (CONFIG_JSON, SPLIT_FILE, DATASET_JSON, "train.log", metrics.METRICS, metrics.CSV,
             metrics.PLOT)  # fmt: skip
# Options a resumed run may change; every other one is read back from the run folder.
RESUMABLE = {
    ("run", "epochs"), ("run", "log_interval"), ("run", "checkpoint_every"),
    ("run", "max_nonfinite"), ("run", "out"), ("data", "data"), ("data", "num_workers"),
    ("run", "monitor_every"), ("data", "crops"),
}  # fmt: skip


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config field has a flag (below, by section), or use "
        "--set SECTION.FIELD=VALUE. Tuples take commas: --large-scale 0.08,1.0. "
        "Precedence: defaults < --config preset < flags. --resume reads RUN_DIR/config.json "
        "back; only --epochs, --log-interval, --checkpoint-every, --max-nonfinite, --data, "
        "--num-workers, --crops and --monitor-every may change on resume (a --config given "
        "with --resume is only checked against it).",
    )
    p.add_argument(
        "--config", help="preset TOML file (sections data, aug, model, loss, optim, run)"
    )
    p.add_argument(
        "--pipeline",
        dest="backend",
        metavar="NAME",
        help="data pipeline: ffcv | dali | synthetic (config field data.backend)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite the run already in --out")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any field (repeatable)",
    )
    from runner.benchmark import add_arguments

    add_arguments(p)  # --benchmark [chosen|all], --bench-warmup, --bench-steps
    flags = rc.flag_names()
    groups = {s: p.add_argument_group(f"[{s}] overrides") for s in rc.SECTIONS}
    for flag, (section, name) in flags.items():
        if flag == "--backend":
            continue  # --pipeline above
        kind = rc.section_types(rc.section_class(section))[name]
        default = getattr(getattr(rc.TrainConfig(), section), name)
        help_ = f"{section}.{name} (default {default})"
        if kind is bool:
            groups[section].add_argument(
                flag,
                dest=f"{section}.{name}",
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_,
            )
        else:
            arity = len(typing.get_args(kind))
            metavar = ",".join("XYZ"[:arity]) if arity else kind.__name__.upper()
            groups[section].add_argument(
                flag, dest=f"{section}.{name}", default=None, metavar=metavar, help=help_
            )
    return p


def explicit_updates(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """The fields set on the command line, as strings by section (flags, then --set)."""
    out: dict[str, dict[str, str]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = str(value)
    if args.backend is not None:
        out.setdefault("data", {})["backend"] = args.backend
    for section, values in rc.parse_set(args.set).items():
        out.setdefault(section, {}).update(values)
    return out


def resolve_config(args: argparse.Namespace, notes: list[str] | None = None) -> rc.TrainConfig:
    """defaults < preset < flags; with --resume, the run folder's config (+ RESUMABLE flags).

    On --resume, a preset's RESUMABLE field that differs from the run's is not applied; a line
    for each goes to `notes`, for the log."""
    if args.resume and args.force:
        raise rc.ConfigError(
            "--resume and --force: choose one (--resume continues the run in --out, --force "
            "deletes it and starts over)"
        )
    updates = explicit_updates(args)
    fresh = rc.TrainConfig()
    if args.config:
        fresh = rc.load_preset(args.config, fresh)
    fresh = rc.apply_strings(fresh, updates, "command line")
    if not args.resume:
        return fresh

    saved_path = Path(fresh.run.out) / CONFIG_JSON
    if not saved_path.is_file():
        raise rc.ConfigError(
            f"--resume: {saved_path} not found; no run to resume in {fresh.run.out}"
        )
    saved = rc.load_json(saved_path)
    saved = replace(saved, run=replace(saved.run, out=fresh.run.out))  # the folder it is in
    if args.config:  # checked, never applied: the run's own config goes on
        preset = rc.read_preset(args.config)
        for section, names in preset.items():
            for name in names if isinstance(names, dict) else ():
                key = (section, name)
                if name in updates.get(section, {}) or key == ("run", "out"):
                    continue  # a flag wins; the preset's out is where the run was found
                new, old = (getattr(getattr(c, section), name) for c in (fresh, saved))
                if key in RESUMABLE and new != old and notes is not None:
                    flag = rc.flag_of(section, name)
                    notes.append(
                        f"--config {args.config}: its {section}.{name} = {new!r} is not "
                        f"applied on --resume (the run keeps {old!r}); pass {flag} to change it"
                    )
                elif key not in RESUMABLE and new != old:
                    raise rc.ConfigError(
                        f"--config {args.config}: sets {section}.{name} = {new!r}, but it is "
                        f"{old!r} in {saved_path}; a resumed run keeps its config (resume "
                        "without --config, repeat the run's own flags after it, or start a "
                        "new run with another --out)"
                    )
    for section, names in updates.items():
        for name in names:
            new, old = (
                getattr(getattr(fresh, section), name),
                getattr(getattr(saved, section), name),
            )
            if (section, name) in RESUMABLE:
                saved = replace(saved, **{section: replace(getattr(saved, section), **{name: new})})
            elif new != old:
                raise rc.ConfigError(
                    f"{rc.flag_of(section, name)}: {section}.{name} is {old!r} in {saved_path}; "
                    "a resumed run keeps its config (start a new run with another --out)"
                )
    return saved


# ---------------------------------------------------------------------------------- stages


def setup_logging(info: DistInfo) -> None:
    """Rank 0 logs INFO to stdout (and, once the run folder exists, to train.log); the other
    ranks log only errors, each line marked with its rank."""
    root = logging.getLogger()
    close_logging()
    root.setLevel(logging.INFO if info.is_main else logging.ERROR)
    fmt = "%(message)s" if info.is_main else f"[rank {info.rank}] %(message)s"
    add_handler(logging.StreamHandler(sys.stdout), fmt)


def add_handler(handler: logging.Handler, fmt: str, datefmt: str | None = None) -> None:
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    handler.suncet = True  # ours: removed by close_logging, unlike a host's handlers
    logging.getLogger().addHandler(handler)


def close_logging() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "suncet", False)]:
        root.removeHandler(h)
        h.close()


RUN_LOCK = ".run.lock"  # held (flock) by the process that trains in the folder
_run_lock = None  # this process's open, locked RUN_LOCK file


def lock_run_dir(run_dir: Path) -> str | None:
    """Takes the run folder's lock for as long as this process trains; None, or who holds it.

    The OS drops the lock when the process ends, however it ends (kill -9 included)."""
    global _run_lock
    f = open(run_dir / RUN_LOCK, "a+")  # noqa: SIM115 (held until unlock_run_dir)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = (f.read().strip().splitlines() or ["another process"])[-1]
        f.close()
        return holder
    except OSError as e:  # a filesystem without locks (some network mounts): go on, unguarded
        log.warning("cannot lock %s (%s): a second run in this folder would not be refused",
                    run_dir / RUN_LOCK, e.strerror or e)  # fmt: skip
        f.close()
        return None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _run_lock = f
    return None


def unlock_run_dir() -> None:
    global _run_lock
    if _run_lock is not None:
        _run_lock.close()
        _run_lock = None


def make_run_dir(run_dir: Path) -> str | None:
    """Creates the folder, once a probe file shows it can be written (a read-only mount, a
    file on the path); None, or why it cannot be."""
    from convert.common import cannot_write

    if run_dir.exists() and not run_dir.is_dir():
        return "is a file, not a folder"
    problem = cannot_write(run_dir)
    if problem is not None:
        return problem
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder ({type(e).__name__}: {e.strerror or e})"
    return None


def prepare_run_dir(cfg: rc.TrainConfig, args: argparse.Namespace, info: DistInfo) -> Path:
    """Refuses a folder another run is training in (its lock), and to overwrite a run without
    --resume or --force. Nothing in it changes yet: `start_run_files` clears an old run
    (--force) and opens train.log once every check has passed; log lines wait until then.

    `--benchmark` writes only RUN_DIR/benchmark.json, so it takes no lock and refuses and
    clears nothing (it may sit beside a live run).
    """
    run_dir = Path(cfg.run.out)
    problem = None
    if info.is_main:
        problem = make_run_dir(run_dir)
        if problem is None and args.benchmark is None:
            holder = lock_run_dir(run_dir)
            if holder is not None:
                problem = (
                    f"a run is training there ({holder}); wait for it to end (then --resume) "
                    "or choose another --out"
                )
    if not all_agree(problem is None, info):
        raise rc.ConfigError(f"--out {run_dir}: {problem or 'refused by rank 0'}")
    if args.benchmark is not None:
        return run_dir
    holds_run = (run_dir / CONFIG_JSON).exists() or (run_dir / ckpt.LATEST).exists()
    if holds_run and not (args.resume or args.force):
        raise rc.ConfigError(
            f"--out {run_dir}: already holds a run; pass --resume to continue it or --force "
            "to overwrite it"
        )
    if info.is_main:
        add_handler(MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1), "%(message)s")
    return run_dir


def start_run_files(run_dir: Path, args: argparse.Namespace, info: DistInfo) -> None:
    """The start of a run that passed every check: --force clears the old run, train.log
    opens and receives the lines logged so far (a refused start leaves the folder as it was)."""
    if info.is_main:
        if args.force and not args.resume:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            for pattern in ("checkpoint*.pt", "eval-*.json", "finetune-*.json"):
                for old in run_dir.glob(pattern):  # the old run's checkpoints and results
                    old.unlink()
        file = logging.FileHandler(run_dir / "train.log")
        add_handler(file, "%(asctime)s %(message)s", "%X")
        for early in [h for h in logging.getLogger().handlers if isinstance(h, MemoryHandler)]:
            for record in early.buffer:
                file.handle(record)
            logging.getLogger().removeHandler(early)
            early.close()
    barrier()


@dataclass
class Labels:
    """The labeled split chosen for this run and what the synthetic pipeline needs."""

    indices: np.ndarray  # sorted labeled sample indices, [L]
    labels_of: np.ndarray  # class id of every train sample, [N]
    manifest: object | None


def choose_labels(cfg: rc.TrainConfig, run_dir: Path, resume: bool) -> Labels:
    """Resolves `--labels` against the manifest (the run folder's own list on --resume)."""
    d = cfg.data
    has_manifest = (Path(d.data) / "manifest.json").is_file()
    if d.backend == "synthetic" and not has_manifest:
        # No dataset: 2 steps per epoch of images in C classes, 4 labeled images per class.
        n_train = 2 * d.batch_size * env_world()[1]
        n_labeled = min(d.classes_per_batch * max(d.images_per_class, 4), n_train)
        labels_of = np.arange(n_train) % d.classes_per_batch
        return Labels(np.arange(n_labeled), labels_of, None)

    from convert.manifest import load_manifest
    from convert.splits import resolve_split

    if resume and not Path(d.data).is_dir():
        raise rc.ConfigError(
            f"--data {d.data}: no such folder (the run's dataset); if it has moved, pass "
            "--data DIR where it is now"
        )
    manifest = load_manifest(d.data)
    if resume:
        check_same_dataset(run_dir, manifest, d.data)
    spec, split_file = d.labels, d.split_file or None
    if resume and (run_dir / SPLIT_FILE).is_file():  # the list the run chose, as it was
        spec, split_file = str(run_dir / SPLIT_FILE), None
    indices = resolve_split(
        manifest, spec, seed=cfg.run.seed, data_dir=d.data, split_file=split_file
    )
    labels_of = np.asarray(manifest.splits["train"].labels, dtype=np.int64)
    return Labels(np.asarray(indices, dtype=np.int64), labels_of, manifest)


def dataset_identity(manifest) -> dict:
    """The training images' count and a digest of their file names and labels: the same on a
    moved copy of the data, another on another dataset."""
    train = manifest.splits["train"]
    return {"train_images": train.num_samples, "classes": manifest.num_classes,
            "train_digest": train.fingerprint()}  # fmt: skip


def check_same_dataset(run_dir: Path, manifest, data: str) -> None:
    """A resume goes on with the images the run started on (a moved copy is fine)."""
    path = run_dir / DATASET_JSON
    if not path.is_file():  # a run from before this check
        log.warning(
            "--resume: %s has no %s (a run from before this check): --data %s is not "
            "checked against the images the run started on",
            run_dir,
            DATASET_JSON,
            data,
        )
        return
    now = dataset_identity(manifest)
    try:
        was = json.loads(path.read_text())
        was = {key: was[key] for key in now}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise rc.ConfigError(
            f"--resume: cannot read {path} ({type(e).__name__}: {e}), which says which images "
            "the run is on; if --data is the run's own dataset, delete the file to resume "
            "without this check"
        ) from e
    if was != now:
        raise rc.ConfigError(
            f"--data {data}: not the dataset the run in {run_dir} started on "
            f"({now['train_images']} training images in {now['classes']} classes, against "
            f"{was['train_images']} in {was['classes']}, or other files; see {path}); a resume "
            "continues on the run's own data (start a new run with another --out)"
        )


def save_labels(labels: Labels, run_dir: Path) -> None:
    path = run_dir / SPLIT_FILE
    if labels.manifest is None:
        np.savetxt(path, labels.indices, fmt="%d")
        return
    from convert.splits import write_split

    write_split(path, labels.manifest, labels.indices)


def build_training(cfg: rc.TrainConfig, info: DistInfo):
    """The model (on its device, wrapped), its optimizer, and the FLOPs of one step."""
    from model.encoder import build_model
    from model.flops import train_flops_per_step
    from model.optim import build_optimizer

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    bare = build_model(cfg.model)
    d, a = cfg.data, cfg.aug
    views = [(d.batch_size, 3, a.large_size, a.large_size)] * a.n_large
    views += [(d.batch_size, 3, a.small_size, a.small_size)] * a.n_small
    n = d.classes_per_batch * d.images_per_class
    labeled = [(n, 3, a.large_size, a.large_size)] * d.n_supervised_views
    flops = {
        True: train_flops_per_step(bare, views, labeled),
        False: train_flops_per_step(bare, views, None),
    }
    model = wrap_model(bare, info, cfg.model.channels_last)
    optimizer = build_optimizer(model, cfg.optim, d.batch_size * info.world_size)
    return model, optimizer, flops


def build_data(cfg: rc.TrainConfig, info: DistInfo, labels: Labels, backend: str | None = None):
    """The run's pipeline (or `backend`'s: ffcv | dali | synthetic | torchvision, the bench/
    baseline that only `--benchmark all` builds)."""
    from pipelines.build import build_pipeline

    d = cfg.data
    backend = backend or d.backend
    on_cuda = info.device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision, torch.float32)
    kwargs = dict(
        device=info.device,
        dtype=dtype if on_cuda else torch.float32,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.run.seed,
    )
    if backend == "synthetic":
        steps = len(labels.labels_of) // (d.batch_size * info.world_size)
        kwargs.update(labels_of=labels.labels_of, steps_per_epoch=max(steps, 1))
    if backend == "torchvision":
        from bench.baseline_torchvision import TorchvisionPipeline

        return TorchvisionPipeline(d.data, d, cfg.aug, labels.indices, **kwargs)
    return build_pipeline(backend, d.data, d, cfg.aug, labels.indices, **kwargs)


def check_monitor(cfg: rc.TrainConfig, labels: Labels) -> None:
    """Rejects `--monitor-every` on a dataset without a val split (every rank, before work)."""
    every, data = cfg.run.monitor_every, Path(cfg.data.data)
    if not every:
        return
    if labels.manifest is None or "val" not in labels.manifest.splits:
        raise rc.ConfigError(
            f"--monitor-every {every}: the dataset {data} has no val split to evaluate on; "
            "convert one (an ImageFolder val/ folder) or pass --monitor-every 0"
        )
    missing = [n for n in ("train.beton", "val.beton") if not (data / n).is_file()]
    if missing:
        raise rc.ConfigError(
            f"--monitor-every {every}: the monitor reads FFCV files and {data} lacks "
            f"{', '.join(missing)}; run convert/imagenet_to_ffcv.py or pass --monitor-every 0"
        )


def build_monitor(cfg: rc.TrainConfig, info: DistInfo, labels: Labels):
    """Rank 0's online SNN/kNN monitor (its loaders compile now); None when off or elsewhere."""
    if not cfg.run.monitor_every or not info.is_main:
        return None
    from runner.monitor import OnlineMonitor

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision)
    dtype = amp if amp is not None and info.device.type == "cuda" else torch.float32
    monitor = OnlineMonitor(
        cfg.data.data, labels.manifest, labels.indices, cfg.aug, info.device, dtype,
        val_subset=cfg.run.monitor_val_subset or None, num_workers=cfg.data.num_workers,
    )  # fmt: skip
    log.info(
        "monitor: SNN/kNN every %d epoch(s) | bank %d labeled images | %d val images",
        cfg.run.monitor_every, monitor.bank_loader.num_samples, monitor.val_loader.num_samples,
    )  # fmt: skip
    return monitor


def check_resume_steps(state: dict, path: Path, steps_per_epoch: int, world: int) -> None:
    """Refuses a checkpoint made with another number of steps per epoch (ranks or data).

    The LR schedule is indexed by the global step, so a resumed run must make as many steps
    per epoch as the one that wrote the checkpoint.
    """
    epoch, step = int(state["epoch"]), int(state["step"])
    if epoch > 0 and step != epoch * steps_per_epoch:
        raise rc.ConfigError(
            f"--resume: {path} is at step {step} after {epoch} epoch(s) ({step / epoch:g} "
            f"steps per epoch), but {world} rank(s) on this data make {steps_per_epoch} per "
            "epoch; resume with the number of ranks (and the data) the run started with"
        )


def warn_schedule_change(
    state: dict, cfg: rc.TrainConfig, schedule: np.ndarray, world: int
) -> None:
    """Names the LR jump of a run resumed with another --epochs (its cosine is recomputed)."""
    from model.optim import lr_schedule

    before = int(state.get("config", {}).get("run", {}).get("epochs", cfg.run.epochs))
    step, epoch = int(state["step"]), int(state["epoch"])
    if before == cfg.run.epochs or epoch == 0:
        return
    old = lr_schedule(cfg.optim, step // epoch, before, cfg.data.batch_size * world)
    was = f"{old[step]:.4g}" if step < len(old) else f"none (it ended at {old[-1]:.4g})"
    log.warning(
        "--epochs %d: the run was set for %s; its LR schedule is recomputed for %d: "
        "step %d gets LR %.4g, where the old schedule gave %s",
        cfg.run.epochs, metrics.count(before, "epoch"), cfg.run.epochs, step + 1,
        schedule[step], was,
    )  # fmt: skip


def check_data(cfg: rc.TrainConfig, run_dir: Path, resume: bool, world: int):
    """Stage 3 on one rank: the labeled split (on --resume the run's own, on the data it
    started on) checked against C x K, the epoch's steps, the data files (none missing,
    truncated or swapped) and the checkpoint to resume from. Returns (labels, classes in the
    split, checkpoint state or None)."""
    from pipelines.common import steps_per_epoch

    d = cfg.data
    labels = choose_labels(cfg, run_dir, resume)
    n_classes = len(np.unique(labels.labels_of[labels.indices]))
    rc.check_split(cfg, len(labels.indices), n_classes, world)
    if d.backend != "synthetic":  # a batch each rank can fill; a last step with negatives
        steps_per_epoch(len(labels.labels_of), d.batch_size, world, d.drop_last)
    check_monitor(cfg, labels)
    if labels.manifest is not None and d.backend != "synthetic":
        from convert.manifest import check_files

        check_files(d.data, labels.manifest, d.backend)
    state = None
    if resume and (run_dir / ckpt.LATEST).is_file():
        state = ckpt.load_checkpoint(run_dir / ckpt.LATEST)
    return labels, n_classes, state


# ------------------------------------------------------------------------------------ main


def setup(args: argparse.Namespace):
    """Stages 1-5: everything before the first step. Impossible settings fail here."""
    from model.optim import lr_schedule, peak_lr
    from runner.loop import Trainer

    # 1. Config: preset < flags (or the run folder's, on --resume); reject impossible settings.
    notes: list[str] = []
    cfg = resolve_config(args, notes)
    _, world, _ = env_world()
    rc.validate(cfg, torch.cuda.is_available(), world)

    # 2. Processes and the run folder.
    info = init_distributed(cfg.run.device)
    setup_logging(info)
    run_dir = prepare_run_dir(cfg, args, info)
    for note in notes:
        log.warning(note)

    # 3. The data, the labeled split and the checkpoint, checked on every rank before any work;
    #    the ranks agree, so that one error stops them all (and is reported once).
    labels, n_classes, state = agree(
        lambda: check_data(cfg, run_dir, args.resume, world),
        info,
        (ValueError, ckpt.CheckpointError, OSError),
    )

    # 4. Model, optimizer, data, and the per-step LR schedule (LR scales with the global batch).
    model, optimizer, flops = build_training(cfg, info)
    pipeline = build_data(cfg, info, labels)
    global_batch = cfg.data.batch_size * world
    schedule = lr_schedule(cfg.optim, len(pipeline), cfg.run.epochs, global_batch)
    if cfg.optim.warmup_epochs >= cfg.run.epochs:
        log.warning(
            "--warmup-epochs %g >= --epochs %d: the LR rises for the whole run and never "
            "decays (its peak, %.4g, is the last step's)",
            cfg.optim.warmup_epochs, cfg.run.epochs, schedule[-1],
        )  # fmt: skip
    peak = peak_lr(cfg.optim, global_batch)
    if cfg.optim.final_lr > peak:
        log.warning(
            "--final-lr %g is above the peak LR %.4g (--base-lr x global batch / "
            "--lr-batch-ref): the schedule rises to it after the warm-up instead of decaying",
            cfg.optim.final_lr, peak,
        )  # fmt: skip
    monitor = None if args.benchmark is not None else build_monitor(cfg, info, labels)
    if state is not None:
        check_resume_steps(state, run_dir / ckpt.LATEST, len(pipeline), world)
    finished = state is not None and int(state["epoch"]) >= cfg.run.epochs
    if args.benchmark is None and not finished:  # only now: a failed start changes nothing
        start_run_files(run_dir, args, info)
        if info.is_main:
            rc.save_json(cfg, run_dir / CONFIG_JSON)
            save_labels(labels, run_dir)
            if labels.manifest is not None:
                metrics.write_json(run_dir / DATASET_JSON, dataset_identity(labels.manifest))
    trainer = Trainer(cfg, model, optimizer, schedule, info, run_dir, flops, monitor)
    log.info(
        "run %s | %s pipeline, %d steps/epoch | %d labeled images, %d classes | global batch "
        "%d | %d rank(s) on %s", run_dir, cfg.data.backend, len(pipeline), len(labels.indices),
        n_classes, global_batch, world, info.device,
    )  # fmt: skip

    if args.benchmark is not None:  # times the model as built; the run folder stays as it is
        return trainer, pipeline, 0

    # 5. Resume at the last epoch boundary: every rank loads the same checkpoint.
    start_epoch = 0
    if finished:  # the folder is left as it was
        log.warning(
            "the run in %s is at epoch %d of %d: nothing left to train (pass a larger "
            "--epochs to extend it)", run_dir, int(state["epoch"]), cfg.run.epochs,
        )  # fmt: skip
    elif state is not None:
        warn_schedule_change(state, cfg, schedule, world)
    if state is not None:
        start_epoch = trainer.resume_from(state)
        log.info("resumed from %s at epoch %d, step %d", run_dir / ckpt.LATEST, start_epoch,
                 trainer.step)  # fmt: skip
    elif args.resume:  # killed before its first checkpoint: start over, dropping its metrics
        trainer.metrics.truncate_after(0)
        log.info("--resume: no %s in %s yet; starting at epoch 0", ckpt.LATEST, run_dir)
    return trainer, pipeline, start_epoch


def benchmark(args: argparse.Namespace, trainer, pipeline, argv: list[str]) -> int:
    """`--benchmark`: loaders, model and full step timed by runner/benchmark.py (0 done, 1
    stopped by non-finite losses); the other pipelines of `all` come from `build_data`."""
    from runner.benchmark import run_benchmark
    from runner.loop import NonFiniteLossError

    labels = Labels(np.asarray(pipeline.labeled), np.empty(0, np.int64), None)  # setup's split
    make = lambda name: build_data(trainer.cfg, trainer.info, labels, backend=name)
    try:
        run_benchmark(args, trainer, pipeline, make, command=["train.py", *argv])
    except NonFiniteLossError as e:
        log.error("error: %s", e)
        return 1
    finally:
        pipeline.close()
    return 0


def report_setup_error(e: Exception) -> None:
    """One `error:` line on stderr. Under torchrun an error of the checks the ranks agree on
    (stage 3) is said once, by rank 0, and by another rank only where its own differs; rank 0
    alone reports a config error of the earlier stages (every rank checks the same config;
    the others would repeat it, or say "refused by rank 0"); a later error may be a rank's
    own, so every rank reports it, marked with its rank."""
    rank, world, _ = env_world()
    if isinstance(e, RanksFailed):
        line = e.report()
    elif rank != 0 and isinstance(e, rc.ConfigError):
        line = None
    else:
        line = f"{f'[rank {rank}] ' if world > 1 and rank != 0 else ''}error: {e}"
    if line is not None:
        sys.stderr.write(line + "\n")  # one write: ranks' lines do not run together
        sys.stderr.flush()


def lost_peer_line(e: RuntimeError, kept: str) -> str:
    """What each rank that saw the group fail says (any rank may be the one that stopped, so
    each says what it saw; the one that stopped said why, or was killed)."""
    first = (str(e).splitlines() or [""])[0]
    return (
        f"error: lost the other ranks ({first}): one of them stopped, and its own lines say "
        f"why; last checkpoint: {kept}; rerun with --resume once it is fixed"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the program; returns the exit status (0 done, 1 stopped, 2 bad settings, 130
    interrupted, 143 terminated)."""
    from pipelines.errors import PipelineError
    from runner.loop import NonFiniteLossError

    args = build_parser().parse_args(argv)
    guard = SigtermGuard(last_checkpoint=lambda: "none yet")  # SIGTERM raises Terminated
    guard.install()
    stage = "before the first step"
    try:
        try:
            from runner.benchmark import check_args

            check_args(args)
            trainer, pipeline, start_epoch = setup(args)
        except (ValueError, ckpt.CheckpointError, RanksFailed, OSError) as e:  # Config/...
            report_setup_error(e)
            return 2

        if args.benchmark is not None:
            stage = "during the benchmark (no benchmark.json written)"
            return benchmark(args, trainer, pipeline, sys.argv[1:] if argv is None else argv)

        # 6. Train; the run folder is printed however the run ends.
        guard.last_checkpoint = lambda: trainer.last_checkpoint or "none yet"
        status = 0
        try:
            trainer.fit(pipeline, start_epoch)
        except KeyboardInterrupt as e:  # Ctrl-C reaches every rank: rank 0 alone says so
            what, status = stop_line(e)
            if trainer.info.is_main:
                kept = trainer.last_checkpoint or "none yet"
                log.error("%s; last checkpoint: %s; rerun with --resume to continue", what, kept)
        except (ckpt.CheckpointError, NonFiniteLossError) as e:  # the same on every rank (losses
            if trainer.info.is_main:  # are the global batch's), or rank 0's own (checkpoints)
                log.error("error: %s", e)
            status = 1
        except (PipelineError, OSError) as e:  # data damaged after conversion (met in mid-run),
            # a full disk or a lost mount while writing metrics or the plot
            kept = trainer.last_checkpoint or "none"
            log.error("error: %s; last checkpoint: %s; fix it and rerun with --resume", e, kept)
            status = 1
        except RuntimeError as e:  # another rank stopped, and this one's collective failed
            if not lost_peer(e):
                raise
            latest = trainer.run_dir / ckpt.LATEST  # written, if this rank was at the barrier
            kept = trainer.last_checkpoint or (latest if latest.is_file() else "none")
            log.error(lost_peer_line(e, kept))  # marked with the rank; in train.log on rank 0
            status = 1
        finally:
            pipeline.close()
        if trainer.info.is_main:
            print(f"run folder: {trainer.run_dir.resolve()}", flush=True)
        return status
    except KeyboardInterrupt as e:  # before training: nothing to keep
        what, status = stop_line(e)
        if env_world()[0] == 0:
            print(f"{what} {stage}", file=sys.stderr)
        return status
    except RuntimeError as e:  # another rank stopped during setup (the DDP wrap's broadcast)
        if not lost_peer(e):
            raise
        rank = env_world()[0]
        mark = f"[rank {rank}] " if rank != 0 else ""
        print(mark + lost_peer_line(e, "unchanged by this start"), file=sys.stderr, flush=True)
        return 1
    finally:
        guard.uninstall()
        unlock_run_dir()
        close_logging()
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
