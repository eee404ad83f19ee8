"""Evaluation during and after training: embed images, classify them by their neighbours.

`embed` runs the encoder over a `CenterCropLoader` (eval mode, no gradients) and keeps both
the backbone features and the projection-head outputs; `neighbour_accuracy` scores the
queries against a labeled bank with SNN (SuNCEt's/PAWS' soft nearest neighbours, tau 0.1)
and weighted kNN (k 20, tau 0.07). `OnlineMonitor` does both on a fixed labeled set and a
fixed validation subset, with its loaders built once, for a training loop to call every few
epochs on rank 0.

Which embedding: SuNCEt and PAWS evaluate on the representation, the backbone's pooled
features (the projection head is discarded after pre-training), so ``backbone`` is the
default everywhere; the head's output is measured too, at the price of one small MLP pass.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from model.evaluation import knn_predict, snn_predict, topk_accuracy
from pipelines.config import AugConfig
from pipelines.eval_loader import CenterCropLoader

log = logging.getLogger(__name__)

EMBEDDINGS = ("backbone", "head")
METHODS = ("snn", "knn")


@dataclass(frozen=True)
class NeighbourConfig:
    """The two non-parametric classifiers' settings."""

    snn_temperature: float = 0.1
    knn_k: int = 20
    knn_temperature: float = 0.07


@dataclass
class Embeddings:
    """Embeddings of one loader's samples, in its order (on the CPU, float32)."""

    backbone: Tensor  # [N, F]
    head: Tensor  # [N, D]
    labels: Tensor  # [N] int64
    indices: Tensor  # [N] int64

    def get(self, name: str) -> Tensor:
        if name not in EMBEDDINGS:
            raise ValueError(f"embedding {name!r}: choose from {EMBEDDINGS}")
        return getattr(self, name)


def bare_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or compile) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` when it is a low precision, else nothing."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def embed(model: nn.Module, loader: CenterCropLoader, dtype=torch.float32) -> Embeddings:
    """Backbone features and head outputs of every sample of `loader`, in its order.

    The model runs in eval mode (BatchNorm running statistics) and is put back in the mode
    it was in.
    """
    model = bare_model(model)
    was_training = model.training
    model.eval()
    feats, heads, labels, indices = [], [], [], []
    try:
        with autocast_for(loader.device, dtype):
            for batch in loader:
                f = model.features(batch.images)  # [B, F]
                feats.append(f.float().cpu())
                heads.append(model.head(f).float().cpu())  # [B, D]
                labels.append(batch.labels.cpu())
                indices.append(batch.indices.cpu())
    finally:
        model.train(was_training)
    return Embeddings(torch.cat(feats), torch.cat(heads), torch.cat(labels), torch.cat(indices))


def neighbour_accuracy(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    methods: tuple[str, ...] = METHODS,
    cfg: NeighbourConfig = NeighbourConfig(),
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of each method: ``{snn_top1, snn_top5, ...}``."""
    out = {}
    for method in methods:
        if method == "snn":
            scores = snn_predict(query, bank, bank_labels, num_classes, cfg.snn_temperature)
        elif method == "knn":
            scores = knn_predict(
                query, bank, bank_labels, num_classes, cfg.knn_k, cfg.knn_temperature
            )
        else:
            raise ValueError(f"method {method!r}: choose from {METHODS}")
        acc = topk_accuracy(scores, query_labels, (1, 5))  # [Q, C] -> {k: %}
        out[f"{method}_top1"], out[f"{method}_top5"] = acc[1], acc[5]
    return out


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A fixed, seeded, class-balanced subset of ``size`` sample indices, sorted.

    Each class gives ``size // C`` samples (the first ``size % C`` classes one more), or all
    it has.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng([seed, 7])
    chosen = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)  # [n_c]
        k = min(len(members), size // len(classes) + (i < size % len(classes)))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class OnlineMonitor:
    """SNN and kNN accuracy of a model on a fixed validation subset, cheap enough to run
    every few epochs.

    The labeled training images (centre crops) are the bank; the validation subset the
    queries. Both loaders are built once, at construction (FFCV compiles them then).

    Args:
        data_dir: dataset folder (manifest.json, train.beton, val.beton).
        manifest: the dataset's manifest (its val labels choose the subset); None: read it.
        labeled_indices: the run's labeled samples of the train split.
        aug: ``eval_size``, ``eval_resize``, ``mean``, ``std``.
        device: where the model runs.
        dtype: autocast precision of the forward pass (float32: none).
        val_subset: number of validation images (a fixed class-balanced draw), an array of
            val sample indices, or None for the whole val split.
        embedding: ``backbone`` or ``head``: which output the metrics use.
    """

    def __init__(
        self,
        data_dir: str,
        manifest,
        labeled_indices: np.ndarray,
        aug: AugConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        val_subset: int | np.ndarray | None = 1000,
        *,
        embedding: str = "backbone",
        batch_size: int = 256,
        num_workers: int = 2,
        neighbours: NeighbourConfig = NeighbourConfig(),
    ) -> None:
        from convert.manifest import load_manifest

        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding {embedding!r}: choose from {EMBEDDINGS}")
        manifest = manifest if manifest is not None else load_manifest(data_dir)
        val_labels = np.asarray(manifest.splits["val"].labels)
        if val_subset is None:
            val_idx = np.arange(len(val_labels))
        elif np.isscalar(val_subset):
            val_idx = stratified_subset(val_labels, int(val_subset))
        else:
            val_idx = np.asarray(val_subset, dtype=np.int64)

        self.device, self.dtype = torch.device(device), dtype
        self.embedding, self.neighbours = embedding, neighbours
        self.num_classes = manifest.num_classes
        kw = dict(device=self.device, batch_size=batch_size, num_workers=num_workers)
        self.bank_loader = CenterCropLoader(data_dir, "train", labeled_indices, aug, **kw)
        self.val_loader = CenterCropLoader(data_dir, "val", val_idx, aug, **kw)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Embeds the labeled set and the val subset; returns ``snn_top1``, ``snn_top5``,
        ``knn_top1`` (and ``knn_top5``, ``eval_seconds``), in percent."""
        t0 = time.perf_counter()
        bank = embed(model, self.bank_loader, self.dtype)
        val = embed(model, self.val_loader, self.dtype)
        out = neighbour_accuracy(
            val.get(self.embedding),
            val.labels,
            bank.get(self.embedding),
            bank.labels,
            self.num_classes,
            METHODS,
            self.neighbours,
        )
        out["eval_seconds"] = time.perf_counter() - t0
        return out
