"""Fine-tunes a pre-trained encoder with a new linear classifier on the labeled split.

    python finetune.py --checkpoint RUN/checkpoint.pt --epochs N [--data DIR]
        [--labels 1pct|10pct|FILE] [--lr 0.05] [--weight-decay 0] [--device cpu|cuda]

The SimCLR/SuNCEt fine-tuning recipe: the whole backbone plus a zero-initialised linear head,
random-resized crops and horizontal flips only, Nesterov SGD (momentum 0.9), no weight decay
by default, a cosine learning rate with no warm-up, cross-entropy. Top-1 and top-5 on the
validation split (centre crops) are printed and written as JSON (default
RUN/finetune-<checkpoint name>.json), with the same measured on the labeled images (fit).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluate import (
    check_common,
    common_parser,
    count_classes,
    data_folder,
    labeled_indices,
    load_run,
    out_path,
    run_work,
    save_results,
)
from runner.metrics import count

log = logging.getLogger("finetune")


class Classifier(nn.Module):
    """A pre-trained backbone and a new linear head, `[B, 3, S, S] -> [B, C]`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.fc.weight)  # SimCLR's fine-tuning head starts at zero
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))  # [B, C]


class DivergedError(RuntimeError):
    """The fine-tuning loss stopped being finite; the message names the epoch and --lr."""


def check_args(args: argparse.Namespace, out: Path) -> str | None:
    """The first problem with finetune.py's options, or None."""
    if args.epochs < 1:
        return f"--epochs: must be >= 1, got {args.epochs}"
    if not 0 < args.lr < math.inf:
        return f"--lr: must be finite and > 0, got {args.lr}"
    if not 0 <= args.momentum < 1:
        return f"--momentum: must be in [0, 1), got {args.momentum}"
    if not 0 <= args.weight_decay < math.inf or args.eval_every < 0:
        return "--weight-decay and --eval-every must be >= 0"
    if not 0 <= args.seed < 2**63:
        return f"--seed: must be in [0, 2**63), got {args.seed}"
    return check_common(args, out)


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n\n")[0])
    p.set_defaults(batch_size=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine to 0)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="epochs between val reports")
    return p


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> dict[str, float]:
    """Top-1 / top-5 (percent) of `model` on a centre-crop loader, in eval mode."""
    from model.evaluation import topk_accuracy

    was_training = model.training
    model.eval()
    scores, labels = [], []
    for batch in loader:
        scores.append(model(batch.images).float().cpu())  # [B, C]
        labels.append(batch.labels.cpu())
    model.train(was_training)
    acc = topk_accuracy(torch.cat(scores), torch.cat(labels), (1, 5))
    return {"top1": acc[1], "top5": acc[5]}


def train(model: nn.Module, loader, epochs: int, args: argparse.Namespace, val=None) -> list:
    """Cross-entropy with Nesterov SGD and a per-step cosine LR; returns per-epoch records."""
    opt = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
        weight_decay=args.weight_decay,
    )
    total = max(1, epochs * len(loader))
    history, step = [], 0
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=next(model.parameters()).device)  # read once an epoch
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(batch.images), batch.labels)  # [B, C] -> []
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().float()
            step += 1
        rec = {"epoch": epoch, "loss": float(loss_sum) / max(1, len(loader))}
        if not math.isfinite(rec["loss"]):
            raise DivergedError(
                f"fine-tuning diverged in epoch {epoch} (mean loss {rec['loss']}); "
                f"lower --lr (now {args.lr:g})"
            )
        if val is not None and args.eval_every and (epoch + 1) % args.eval_every == 0:
            rec.update({f"val_{k}": v for k, v in accuracy(model, val).items()})
        shown = " ".join(
            f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.2f}"
            for k, v in rec.items()
            if k != "epoch"
        )
        log.info("ep %d | %s", epoch, shown)
        history.append(rec)
    first, last = history[0]["loss"], history[-1]["loss"]
    if len(history) > 1 and last > 10 * first:
        log.warning(
            "the fine-tuning loss grew from %.4g to %.4g: it diverged (the results are not "
            "to be trusted); lower --lr (now %g)", first, last, args.lr,
        )  # fmt: skip
    return history


def finetune(args: argparse.Namespace) -> dict:
    from convert.manifest import load_manifest
    from pipelines.eval_loader import CenterCropLoader, FinetuneLoader

    # 1. The run, its labeled split, and a new classifier on its backbone.
    torch.manual_seed(args.seed)
    cfg, model, state = load_run(args.checkpoint, args.device)
    data_dir = data_folder(args, cfg)
    labeled = labeled_indices(cfg, args.checkpoint, data_dir, args.labels)
    manifest = load_manifest(data_dir)
    num_classes = manifest.num_classes
    train_labels = np.asarray(manifest.splits["train"].labels)
    unseen = "the new head is never trained on them"
    held = count_classes(train_labels[labeled], num_classes, unseen)
    clf = Classifier(model.backbone, model.feature_dim, num_classes).to(args.device)
    if cfg.model.channels_last:
        clf = clf.to(memory_format=torch.channels_last)

    # 2. Loaders: crop + flip of the labeled images; centre crops for the reports.
    kw = dict(device=args.device, num_workers=args.num_workers)
    train_loader = FinetuneLoader(
        data_dir, "train", labeled, cfg.aug, batch_size=args.batch_size, seed=args.seed, **kw
    )
    fit_loader = CenterCropLoader(data_dir, "train", labeled, cfg.aug, batch_size=256, **kw)
    val_loader = CenterCropLoader(data_dir, "val", None, cfg.aug, batch_size=256, **kw)

    # 3. Train, then measure.
    t0 = time.perf_counter()
    history = train(clf, train_loader, args.epochs, args, val_loader)
    return {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "pretrain_epoch": state.get("epoch"),
        "data": str(data_dir),
        "labels": args.labels or "labels.txt",
        "n_labeled": len(labeled),
        "labeled_classes": held,
        "n_val": val_loader.num_samples,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "seconds": time.perf_counter() - t0,
        "history": history,
        "labeled": accuracy(clf, fit_loader),
        "val": accuracy(clf, val_loader),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the fine-tuning; returns the exit status (0 done, 1 diverged, 2 bad settings or
    input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    out = out_path(args, "finetune")
    problem = check_args(args, out)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    record = run_work(lambda: finetune(args), failures=(DivergedError,))
    if isinstance(record, int):
        return record

    fit, val = record["labeled"], record["val"]
    epochs = count(args.epochs, "epoch")
    print(f"fine-tuned {epochs} on {record['n_labeled']} labeled images")
    print(f"labeled (fit) | top1 {fit['top1']:.2f}  top5 {fit['top5']:.2f}")
    print(f"val           | top1 {val['top1']:.2f}  top5 {val['top5']:.2f}")
    return save_results(record, out)


if __name__ == "__main__":
    sys.exit(main())
