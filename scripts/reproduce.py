"""Small-scale reproduction on real CIFAR-10 JPEGs: SimCLR alone vs SimCLR + SuNCEt.

    python scripts/reproduce.py [--labels 10pct [1pct]] [--quick] [--out runs/reproduce]
        [--scratch /tmp/suncet-reproduce] [--tar ../shared/data/cifar10-jpeg.tar.gz]

Stages: unpack a class-balanced subset of CIFAR-10 from the tarball into a scratch folder,
convert it to FFCV, then per label split run train.py twice with the same model, seed, data
order, augmentations, steps and LR schedule (SimCLR is the same run with ``--sup-weight 0``),
the online monitor on. Both runs' SNN top-1 is drawn against images processed and against
training FLOPs (one PNG) and the ratio the paper reports is printed: the FLOPs SuNCEt needs to
first reach SimCLR's final SNN top-1, over the FLOPs SimCLR used in all (< 0.5 on ImageNet in
the paper). Results go to OUT/results.json and OUT/snn_vs_compute.png.

The default scale (`Scale`): 1,000 train and 100 test images per class (10,000 / 1,000),
32-px crops (two large views, no small crops, colour strength 0.5, no blur), a ResNet-18 with
its stride-4 stem (0.45 GFLOPs per unlabeled image per training step; the CIFAR 3x3 stem costs
16x more), a 512-128 head, batch 256 + 10 classes x 8 labeled images, LARS at base LR 1.0 with
2 warm-up epochs, NT-Xent tau 0.2, SuNCEt tau 0.1 in every epoch, 15 epochs (585 steps), the
monitor after every epoch on the labeled split and the 1,000 val images. Both runs take about
an hour on two idle CPU cores (SimCLR's step ran at ~110 img/s there; SuNCEt's is ~16% dearer)
and two to four times that on a busy machine. ``--quick`` runs 60 + 20 images per class for
2 epochs, a few minutes.

Images and FLOPs are the trainer's counts (`runner/loop.py`, `model/flops.py`): SuNCEt's
labeled batch and its forward/backward FLOPs are in them while SuNCEt is on; with
``--sup-weight 0`` no labeled image is forwarded or counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("reproduce")

DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_MEAN, CIFAR_STD = "0.4914,0.4822,0.4465", "0.2470,0.2435,0.2616"
RUNS = ("simclr", "suncet")
METRIC = "snn_top1"


@dataclass(frozen=True)
class Scale:
    """What the reproduction runs: data subset, model, crops, schedule."""

    train_per_class: int = 1000  # CIFAR-10 train images kept per class (of 5,000)
    val_per_class: int = 100  # CIFAR-10 test images kept per class, the val split
    image_size: int = 32  # crop and evaluation side (CIFAR's own size)
    arch: str = "resnet18"
    small_stem: bool = False  # stride-4 stem: 1/16 of the CIFAR stem's compute at 32 px
    hidden_dim: int = 512
    out_dim: int = 128
    batch_size: int = 256  # unlabeled images per step
    classes_per_batch: int = 10  # C: every class in each labeled batch
    images_per_class: int = 8  # K: 80 labeled images per step
    epochs: int = 15  # 39 steps each: 585 steps, ~1 h for both runs on 2 quiet cores
    supervised_epochs: int | None = None  # SuNCEt on for the first N epochs (None: all)
    warmup_epochs: float = 2.0
    base_lr: float = 1.0  # LARS, x batch/256
    temperature: float = 0.2  # NT-Xent
    monitor_every: int = 1  # the ratio's resolution is one evaluation interval
    monitor_val_subset: int = 1000


QUICK = Scale(
    train_per_class=60, val_per_class=20, hidden_dim=64, out_dim=32, batch_size=64,
    images_per_class=4, epochs=2, warmup_epochs=0.5, monitor_val_subset=200,
)  # fmt: skip


# ------------------------------------------------------------------------------- the data


def unpack_subset(tar_path: Path, dest: Path, scale: Scale) -> Path:
    """The first N train / M test JPEGs of each class as an ImageFolder tree (test -> val).

    Reused when `dest` already holds the same subset (a `subset.json` marker).
    """
    tree = dest / f"cifar10-{scale.train_per_class}-{scale.val_per_class}"
    want = {"train": scale.train_per_class, "test": scale.val_per_class}
    marker = tree / "subset.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return tree
    if not tar_path.is_file():
        raise SystemExit(f"error: --tar {tar_path}: not found (see ../shared/data/README.md)")
    taken: dict[tuple[str, str], int] = defaultdict(int)
    tmp = tree.with_name(tree.name + ".tmp")
    with tarfile.open(tar_path, "r:gz") as tar:
        for m in tar:
            parts = Path(m.name).parts  # cifar10/<split>/<class>/<file>.jpg
            if not m.isfile() or len(parts) != 4 or parts[1] not in want:
                continue
            if taken[parts[1:3]] >= want[parts[1]]:
                continue
            taken[parts[1:3]] += 1
            split = "val" if parts[1] == "test" else "train"
            target = tmp / split / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
    if not taken:
        raise SystemExit(f"error: --tar {tar_path}: no cifar10/<split>/<class>/<file> members")
    (tmp / "subset.json").write_text(json.dumps(want))
    if tree.exists():
        import shutil

        shutil.rmtree(tree)
    os.replace(tmp, tree)
    return tree


def convert(tree: Path, data_dir: Path) -> Path:
    """FFCV files + manifest of `tree` (skipped when `data_dir` holds this subset already)."""
    from convert import imagenet_to_ffcv

    subset, marker = (tree / "subset.json").read_text(), data_dir / "subset.json"
    if marker.is_file() and marker.read_text() == subset and (data_dir / "val.beton").is_file():
        return data_dir
    args = ["--src", str(tree), "--out", str(data_dir), "--max-resolution", "32", "--force"]
    imagenet_to_ffcv.main(args)
    marker.write_text(subset)
    return data_dir


# ------------------------------------------------------------------------------- the runs


def train_flags(scale: Scale, data_dir: Path, labels: str, device: str, workers: int) -> list:
    """The flags both runs share (SimCLR adds --sup-weight 0)."""
    s = scale
    n_labeled_per_class = labeled_per_class(s, labels)
    k = min(s.images_per_class, n_labeled_per_class)
    # One labeled image per class (1% of a small subset): SuNCEt's positives are then two
    # views of it (train.py refuses one image and one view: there are no positives).
    views = 2 if k == 1 else 1
    return [
        "--config", str(ROOT / "configs" / "cifar10.toml"),
        "--data", str(data_dir), "--labels", labels, "--device", device, "--precision", "fp32",
        "--arch", s.arch, "--small-stem" if s.small_stem else "--no-small-stem",
        "--hidden-dim", str(s.hidden_dim), "--out-dim", str(s.out_dim), "--head-layers", "2",
        "--large-size", str(s.image_size), "--n-small", "0", "--eval-size", str(s.image_size),
        "--eval-resize", str(s.image_size), "--mean", CIFAR_MEAN, "--std", CIFAR_STD,
        "--batch-size", str(s.batch_size), "--classes-per-batch", str(s.classes_per_batch),
        "--images-per-class", str(k), "--n-supervised-views", str(views),
        "--epochs", str(s.epochs),
        "--supervised-epochs", str(s.supervised_epochs),
        "--warmup-epochs", str(s.warmup_epochs),
        "--base-lr", str(s.base_lr), "--temperature", str(s.temperature),
        "--monitor-every", str(s.monitor_every),
        "--monitor-val-subset", str(s.monitor_val_subset),
        "--num-workers", str(workers), "--log-interval", "10", "--checkpoint-every", "0",
        "--seed", "0",
    ]  # fmt: skip


def labeled_per_class(scale: Scale, labels: str) -> int:
    """Labeled images of each class a stratified `<p>pct` draw keeps (at least 1)."""
    if not labels.endswith("pct"):
        raise ValueError(labels)
    fraction = float(labels.removesuffix("pct")) / 100
    if not 0 < fraction <= 1:
        raise ValueError(labels)
    return max(1, round(fraction * scale.train_per_class))


def run_train(flags: list[str], out: Path, resume: bool) -> float:
    """Runs train.py in its own process (output passes through); returns its wall seconds."""
    cmd = [sys.executable, str(ROOT / "train.py"), *flags, "--out", str(out)]
    cmd.append("--resume" if resume and (out / "config.json").is_file() else "--force")
    log.info("$ %s", " ".join(cmd))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"error: train.py exited with {done.returncode} for {out}")
    return time.perf_counter() - t0


def eval_records(run: Path) -> list[dict]:
    """The monitor's records of a run folder, in step order."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    recs = [json.loads(x) for x in lines if x.strip()]
    evals = sorted((r for r in recs if r.get("event") == "eval"), key=lambda r: r["step"])
    if not evals:
        raise SystemExit(f"error: {path}: no monitor records (was --monitor-every 0?)")
    return evals


# --------------------------------------------------------------------------- the ratio


def first_reach(curve: list[tuple[float, float]], target: float) -> dict | None:
    """Where an accuracy curve `[(compute, acc), ...]` (compute ascending) first reaches
    `target`: the compute of that evaluation and, interpolated linearly from the one
    before, where it crossed. None if it never does."""
    for i, (x, acc) in enumerate(curve):
        if acc >= target:
            if i == 0:
                return {"at_eval": x, "interpolated": x}
            x0, a0 = curve[i - 1]
            cross = x0 + (x - x0) * (target - a0) / (acc - a0)
            return {"at_eval": x, "interpolated": cross}
    return None


def compute_ratio(simclr: list[dict], suncet: list[dict], axis: str = "flops") -> dict:
    """The paper's figure on `axis` (flops or images): SuNCEt's compute to first reach
    SimCLR's final SNN top-1, over SimCLR's total compute.

    ``ratio`` uses the first evaluation at or above the target (an upper bound, evaluations
    being every few epochs); ``ratio_interpolated`` the linear crossing before it. Both are
    None when SuNCEt never reaches the target.
    """
    target, total = simclr[-1][METRIC], simclr[-1][axis]
    if total <= 0:
        raise ValueError(f"SimCLR's final {axis} is {total}: the run did not train")
    hit = first_reach([(r[axis], r[METRIC]) for r in suncet], target)
    return {
        "axis": axis,
        "target": target,
        "simclr_total": total,
        "suncet_at_target": None if hit is None else hit["at_eval"],
        "ratio": None if hit is None else hit["at_eval"] / total,
        "ratio_interpolated": None if hit is None else hit["interpolated"] / total,
    }


def describe(r: dict) -> str:
    if r["ratio"] is None:
        return f"not reached (SuNCEt never got to SimCLR's final {METRIC} {r['target']:.2f}%)"
    return (
        f"{r['ratio']:.3f} (interpolated {r['ratio_interpolated']:.3f}): "
        f"{r['suncet_at_target']:.3e} of SimCLR's {r['simclr_total']:.3e} {r['axis']}"
    )


# ---------------------------------------------------------------------------- the plot


def plot(curves: dict[str, dict[str, list[dict]]], ratios: dict, path: Path) -> Path:
    """One row per label split: SNN top-1 against images (left) and FLOPs (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(curves)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    for row, (labels, runs) in enumerate(curves.items()):
        for col, (axis, name) in enumerate((("images", "images processed"), ("flops", "FLOPs"))):
            ax = axes[row][col]
            for run in RUNS:
                evals = runs[run]
                label = "SimCLR" if run == "simclr" else "SimCLR + SuNCEt"
                ax.plot([r[axis] for r in evals], [r[METRIC] for r in evals], "o-", label=label)
            r = ratios[labels][axis]
            ax.axhline(r["target"], color="grey", ls="--", lw=1, label="SimCLR final")
            if r["suncet_at_target"] is not None:
                ax.axvline(r["suncet_at_target"], color="tab:orange", ls=":", lw=1)
            ratio = "not reached" if r["ratio"] is None else f"{r['ratio']:.2f}"
            ax.set_title(f"{labels} labels: SuNCEt / SimCLR {name} = {ratio}")
            ax.set_xlabel(f"training {name} (trainer's count)")
            ax.set_ylabel("val SNN top-1 (%)")
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--labels", nargs="+", default=["10pct"], help="label splits: 10pct 1pct")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (minutes)")
    p.add_argument(
        "--out", type=Path, help="results folder (runs/reproduce, --quick: runs/reproduce-quick)"
    )
    p.add_argument(
        "--scratch",
        type=Path,
        default=Path("/tmp/suncet-reproduce"),
        help="where the unpacked subset and its FFCV files go (reused when present)",
    )
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="cifar10-jpeg.tar.gz")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue (or reuse) runs in --out")
    p.add_argument("--epochs", type=int, help="pre-training epochs of both runs (15)")
    p.add_argument("--supervised-epochs", type=int, help="SuNCEt on for the first N epochs (all)")
    p.add_argument("--train-per-class", type=int, help="CIFAR train images per class")
    return p


def choose_scale(args: argparse.Namespace) -> Scale:
    scale = QUICK if args.quick else Scale()
    if args.train_per_class is not None:
        scale = replace(scale, train_per_class=args.train_per_class)
    if args.epochs is not None:
        scale = replace(scale, epochs=args.epochs)
    if args.supervised_epochs is not None:
        scale = replace(scale, supervised_epochs=args.supervised_epochs)
    if scale.supervised_epochs is None:
        scale = replace(scale, supervised_epochs=scale.epochs)
    for labels in args.labels:
        try:
            labeled_per_class(scale, labels)
        except ValueError:
            raise SystemExit(
                f"error: --labels {labels}: expected a fraction such as 10pct"
            ) from None
    if args.out is None:
        args.out = ROOT / "runs" / ("reproduce-quick" if args.quick else "reproduce")
    return scale


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    scale = choose_scale(args)
    t_start = time.perf_counter()

    # 1. Data: a class-balanced CIFAR-10 subset, converted to FFCV once (reused after).
    tree = unpack_subset(args.tar, args.scratch, scale)
    data_dir = convert(tree, args.scratch / f"{tree.name}-ffcv")
    log.info("data: %s (%d train, %d val per class)", data_dir, scale.train_per_class,
             scale.val_per_class)  # fmt: skip

    # 2. Per label split, the two runs: identical flags, SimCLR with the SuNCEt term off.
    curves, ratios, walls, commands = {}, {}, {}, {}
    for labels in args.labels:
        flags = train_flags(scale, data_dir, labels, args.device, args.num_workers)
        extra = {"simclr": ["--sup-weight", "0"], "suncet": []}
        curves[labels], walls[labels], commands[labels] = {}, {}, {}
        for run in RUNS:
            out = args.out / labels / run
            walls[labels][run] = run_train([*flags, *extra[run]], out, args.resume)
            commands[labels][run] = " ".join(["train.py", *flags, *extra[run], "--out", str(out)])
            curves[labels][run] = eval_records(out)
        simclr, suncet = curves[labels]["simclr"], curves[labels]["suncet"]
        ratios[labels] = {ax: compute_ratio(simclr, suncet, ax) for ax in ("flops", "images")}

    # 3. Curves, the ratio, and a results file.
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(curves, ratios, args.out / "snn_vs_compute.png")
    results = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "scale": asdict(scale),
        "data": str(data_dir),
        "wall_seconds": time.perf_counter() - t_start,
        "labels": {
            labels: {
                "ratio_flops": ratios[labels]["flops"],
                "ratio_images": ratios[labels]["images"],
                "final": {run: curves[labels][run][-1] for run in RUNS},
                "curves": curves[labels],
                "train_seconds": walls[labels],
                "commands": commands[labels],
            }
            for labels in args.labels
        },
    }
    out_json = args.out / "results.json"
    out_json.write_text(json.dumps(results, indent=2) + "\n")

    stem = "CIFAR 3x3" if scale.small_stem else "stride-4"
    print(f"\nCIFAR-10 subset: {scale.train_per_class} train + {scale.val_per_class} val images "
          f"per class, {scale.image_size} px; {scale.arch} ({stem} stem), {scale.epochs} epochs "
          f"of batch {scale.batch_size}")  # fmt: skip
    for labels in args.labels:
        final = results["labels"][labels]["final"]
        print(f"[{labels}] final SNN top-1: SimCLR {final['simclr'][METRIC]:.2f}% "
              f"({final['simclr']['flops']:.3e} FLOPs), SuNCEt {final['suncet'][METRIC]:.2f}% "
              f"({final['suncet']['flops']:.3e} FLOPs)")  # fmt: skip
        print(f"[{labels}] SuNCEt FLOPs to reach SimCLR's final / SimCLR's FLOPs: "
              f"{describe(ratios[labels]['flops'])}")  # fmt: skip
        print(f"[{labels}] same on images processed: {describe(ratios[labels]['images'])}")
    print(f"plot: {png}\nresults: {out_json}\nwall time: {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
