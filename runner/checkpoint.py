"""Checkpoints written atomically, so a crash or a full disk never costs the previous one.

A checkpoint holds the model, optimizer and scaler states, the next epoch to run, the global
step, the RNG states (torch, CUDA, numpy, python) and the resolved config.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipelines.labeled_store import fsync_dir

log = logging.getLogger(__name__)

LATEST = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written or read; the message says what survived."""


def periodic_name(epoch: int) -> str:
    """`checkpoint-ep0010.pt` for the state after `epoch` completed epochs."""
    return f"checkpoint-ep{epoch:04d}.pt"


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        n = min(len(state["cuda"]), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(state["cuda"][:n])


def _write(obj: dict, f) -> None:
    """Serialises into an open file (the one place that touches the disk; tests patch it)."""
    torch.save(obj, f)


def _failure(path: Path, e: OSError, survivor: str | None = None) -> CheckpointError:
    if survivor is None:
        survivor = (
            f"the previous {path.name} is intact" if path.exists() else "no earlier one exists"
        )
    full = e.errno == errno.ENOSPC
    todo = "free some space" if full else "fix the cause"
    return CheckpointError(
        f"writing checkpoint {path} failed{' (disk full)' if full else ''}: {e}; {survivor}; "
        f"{todo} and rerun with --resume"
    )


def cause_in(e: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The exception of `kind` behind `e`, if any: torch.save's writer turns whatever stopped
    a write (a full disk's OSError, Ctrl-C, SIGTERM) into a RuntimeError ("unexpected pos
    ...") raised while that exception is handled."""
    while e is not None:
        if isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_save(obj: dict, path: str | Path) -> Path:
    """Writes `obj` to a temporary name beside `path`, fsyncs it, then renames it over `path`.

    Raises:
        CheckpointError: the write failed; `path` still holds the previous checkpoint.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C / SIGTERM in mid-write
        tmp.unlink(missing_ok=True)
        interrupt = cause_in(e, KeyboardInterrupt)
        if interrupt is not None:
            raise interrupt from None  # Ctrl-C / SIGTERM, as the caller handles them
        cause = cause_in(e, OSError)
        if cause is not None:
            raise _failure(path, cause) from e
        raise
    fsync_dir(path.parent)
    return path


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copies a finished checkpoint to another name, atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as e:  # a full disk, or Ctrl-C / SIGTERM in mid-write
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _failure(dst, e, f"{src} (the same state) is complete") from e
        raise
    return dst


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    epoch: int,
    step: int,
    config: dict,
    keep: bool = False,
) -> Path:
    """Saves the state after `epoch` completed epochs as checkpoint.pt (and a kept copy).

    Args:
        model: the bare model (not the DDP wrapper).
        scaler: a GradScaler or None.
        epoch: completed epochs, i.e. the epoch a resumed run starts with.
        step: global steps done.
        keep: also keep `checkpoint-epXXXX.pt`.
    """
    run_dir = Path(run_dir)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_state(),
        "config": config,
    }
    path = atomic_save(state, run_dir / LATEST)
    if keep:
        atomic_copy(path, run_dir / periodic_name(epoch))
    return path


def load_checkpoint(path: str | Path, map_location="cpu", option: str = "--resume") -> dict:
    """Reads a checkpoint written by `save_checkpoint`; errors name `option`, the command-line
    option that named the file (train.py's --resume, evaluate.py's --checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{option}: no checkpoint at {path}")
    todo = (
        "copy a kept checkpoint-epNNNN.pt over it to resume from there, or start again with --force"
        if option == "--resume"
        else "pass a checkpoint.pt or checkpoint-epNNNN.pt that train.py wrote"
    )
    try:
        # torch.load does not check the CRC-32 its zip format stores for every record: bytes
        # damaged in place would load as wrong weights. Reading them back costs ~0.1 s/GB.
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError):  # not a zip: torch.load below says what it is
        damaged = None
    if damaged is not None:
        raise CheckpointError(
            f"{option}: checkpoint {path} is damaged (record {damaged} fails its CRC-32 "
            f"check); {todo}"
        )
    try:
        # Checkpoints hold numpy and python RNG states, hence weights_only=False: only load
        # checkpoints this program wrote.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(
            f"{option}: cannot read checkpoint {path} ({type(e).__name__}: {first}); {todo}"
        ) from e


def restore(state: dict, *, model, optimizer, scaler) -> tuple[int, int]:
    """Loads a checkpoint's states in place; returns (next epoch, global step)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"])
