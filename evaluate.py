"""Evaluates a pre-trained checkpoint with soft nearest neighbours (SNN) and weighted kNN.

    python evaluate.py --checkpoint RUN/checkpoint.pt [--data DIR] [--labels 1pct|10pct|FILE]
        [--device cpu|cuda] [--method snn|knn|all] [--embedding backbone|head|all] [--out JSON]

The labeled split (default: the run folder's labels.txt) is embedded from centre crops and
is the bank; every validation image is classified against it. Top-1 and top-5 accuracy are
printed and written as JSON (default RUN/eval-<checkpoint name>.json). The default
embedding is the backbone's pooled features, the representation SuNCEt and PAWS evaluate.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("evaluate")

SPLIT_FILE = "labels.txt"  # the run folder's label split, written by train.py


def load_run(checkpoint: str | Path, device: str = "cpu"):
    """Reads a checkpoint written by train.py: (resolved TrainConfig, model with its weights,
    the checkpoint's state dict without the model)."""
    from model.encoder import build_model
    from runner import config as rc
    from runner.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(checkpoint, map_location="cpu", option="--checkpoint")
    if "config" not in state or "model" not in state:
        raise rc.ConfigError(f"{checkpoint}: not a train.py checkpoint (no model or config)")
    cfg = rc.from_dict(state["config"], str(checkpoint))
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state.pop("model"))
    except RuntimeError as e:  # missing or misshapen weights: the config and weights disagree
        raise CheckpointError(f"{checkpoint}: weights do not fit its config ({e})") from e
    return cfg, model.to(device), state


def data_folder(args: argparse.Namespace, cfg) -> str:
    """--data, or the run's data.data (which may be relative to where train.py ran)."""
    if args.data:
        return args.data
    data = cfg.data.data
    if Path(data).is_dir() or (Path(data).is_absolute() and Path(data).exists()):
        return data
    if not Path(data).is_absolute():
        raise ValueError(
            f"the run's dataset folder {data!r} is relative to where train.py ran and is not "
            f"below {Path.cwd()}; pass --data DIR (or run from that folder)"
        )
    raise ValueError(
        f"the run's dataset folder {data} (data.data in the checkpoint's config) does not exist: "
        "moved or deleted since the run; pass --data DIR where it is now"
    )


def labeled_indices(cfg, checkpoint: str | Path, data_dir: str, spec: str | None) -> np.ndarray:
    """The labeled split: `spec` if given, else the run folder's saved split."""
    from convert.manifest import load_manifest
    from convert.splits import STANDARD_FILES, resolve_split

    manifest = load_manifest(data_dir)
    if spec is None:
        saved = Path(checkpoint).parent / SPLIT_FILE
        if not saved.is_file():
            raise ValueError(f"{saved}: no saved label split beside the checkpoint; pass --labels")
        spec = str(saved)
    split_file = (cfg.data.split_file or None) if spec in STANDARD_FILES else None
    seed = cfg.run.seed
    return resolve_split(manifest, spec, seed=seed, data_dir=data_dir, split_file=split_file)


def count_classes(labels, num_classes: int, what: str) -> int:
    """How many of `num_classes` the labeled split holds; warns when some are missing."""
    held = int(np.unique(np.asarray(labels)).size)
    if held < num_classes:
        log.warning(
            "the labeled split holds %d of the %d classes: val images of the others are "
            "never right (%s)", held, num_classes, what,
        )  # fmt: skip
    return held


def common_parser(description: str) -> argparse.ArgumentParser:
    """The options evaluate.py and finetune.py share."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt written by train.py")
    p.add_argument("--data", help="dataset folder (default: the run's data.data)")
    p.add_argument(
        "--labels", help="1pct | 10pct | <p>pct | FILE (default: the run folder's labels.txt)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="FFCV decoding threads")
    p.add_argument("--out", help="JSON file for the results")
    return p


def out_path(args: argparse.Namespace, prefix: str) -> Path:
    """Where the results go: --out, or RUN/<prefix>-<checkpoint name>.json."""
    ckpt = Path(args.checkpoint)
    return Path(args.out) if args.out else ckpt.parent / f"{prefix}-{ckpt.stem}.json"


def check_common(args: argparse.Namespace, out: Path) -> str | None:
    """The first problem with the shared options (before any work), or None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available; use --device cpu"
    if args.batch_size < 1 or args.num_workers < 1:
        return "--batch-size and --num-workers must be >= 1"
    if out.is_dir():
        return f"--out {out}: is a folder; name the JSON file to write"
    from convert.common import cannot_write

    problem = cannot_write(out.parent)  # below a file, read-only: before hours of work
    if problem is not None:
        default = "" if args.out else " (the default, beside the checkpoint)"
        return f"--out {out}{default}: {problem}; pass --out FILE elsewhere"
    return None


def check_args(args: argparse.Namespace, out: Path) -> str | None:
    """The first problem with evaluate.py's options, or None."""
    if not all(0 < t < math.inf for t in (args.snn_temperature, args.knn_temperature)):
        return "--snn-temperature and --knn-temperature must be finite and > 0"
    if args.knn_k < 1:
        return f"--knn-k: must be >= 1, got {args.knn_k}"
    return check_common(args, out)


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", default="all", choices=("snn", "knn", "all"))
    p.add_argument(
        "--embedding",
        default="backbone",
        choices=("backbone", "head", "all"),
        help="backbone features (default) or projection-head output",
    )
    p.add_argument("--snn-temperature", type=float, default=0.1)
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    return p


def evaluate(args: argparse.Namespace) -> dict:
    """Embeds the labeled split and the val split, classifies val; returns the results."""
    from convert.manifest import load_manifest
    from pipelines.eval_loader import CenterCropLoader
    from runner.monitor import EMBEDDINGS, METHODS, NeighbourConfig, embed, neighbour_accuracy

    # 1. The run: config, weights, labeled split.
    cfg, model, state = load_run(args.checkpoint, args.device)
    data_dir = data_folder(args, cfg)
    labeled = labeled_indices(cfg, args.checkpoint, data_dir, args.labels)

    # 2. Centre crops of the labeled training images (the bank) and of every val image.
    kw = dict(device=args.device, batch_size=args.batch_size, num_workers=args.num_workers)
    bank = embed(model, CenterCropLoader(data_dir, "train", labeled, cfg.aug, **kw))
    val = embed(model, CenterCropLoader(data_dir, "val", None, cfg.aug, **kw))

    # 3. SNN / kNN on each embedding.
    methods = METHODS if args.method == "all" else (args.method,)
    embeddings = EMBEDDINGS if args.embedding == "all" else (args.embedding,)
    nb = NeighbourConfig(args.snn_temperature, args.knn_k, args.knn_temperature)
    num_classes = load_manifest(data_dir).num_classes
    filler = "top-5 fills up with classes of score 0 in class-id order"
    bank_classes = count_classes(bank.labels.cpu().numpy(), num_classes, filler)
    if nb.knn_k > len(bank.labels) and "knn" in methods:
        log.warning(
            "--knn-k %d: the bank holds %d images; kNN votes with all of them",
            nb.knn_k, len(bank.labels),
        )  # fmt: skip
    results = {
        name: neighbour_accuracy(
            val.get(name), val.labels, bank.get(name), bank.labels, num_classes, methods, nb
        )
        for name in embeddings
    }
    return {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "data": str(data_dir),
        "labels": args.labels or SPLIT_FILE,
        "n_labeled": len(labeled),
        "bank_classes": bank_classes,
        "n_val": len(val.labels),
        "eval_size": cfg.aug.eval_size,
        "eval_resize": cfg.aug.eval_resize,
        "neighbours": vars(nb),
        "results": results,
    }


def save_results(record: dict, path: Path) -> int:
    """Writes the results file (its folder was checked before the work, `check_common`); a
    write that fails even so (a full disk) is one error line, status 1, the results standing
    printed above it."""
    from runner.metrics import write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"results: {write_json(path, record)}")
    except OSError as e:
        print(f"error: results not written to {path} ({e.strerror or e}); they are printed "
              "above", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def run_work(work: Callable[[], dict], failures: tuple[type[Exception], ...] = ()) -> dict | int:
    """The record `work` returns, or, after one line on stderr, the exit status: 2 for bad
    settings or input, 1 for `failures`, 130 / 143 for Ctrl-C / SIGTERM (handled alike)."""
    from runner.checkpoint import CheckpointError
    from runner.sigterm import SigtermGuard, stop_line

    guard = SigtermGuard()
    guard.install()
    try:
        return work()
    except (ValueError, CheckpointError) as e:  # config, manifest, pipeline, split, checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what, status = stop_line(e)
        print(f"{what}; no results written", file=sys.stderr)
        return status
    finally:
        guard.uninstall()


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation; returns the exit status (0 done, 2 bad settings or input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    out = out_path(args, "eval")
    problem = check_args(args, out)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    record = run_work(lambda: evaluate(args))
    if isinstance(record, int):
        return record

    print(f"{record['n_labeled']} labeled, {record['n_val']} val images")
    for name, accs in record["results"].items():
        line = "  ".join(f"{k} {v:.2f}" for k, v in accs.items())
        print(f"{name:8s} | {line}")
    return save_results(record, out)


if __name__ == "__main__":
    sys.exit(main())
