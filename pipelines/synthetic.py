"""A pipeline of random tensors with the configured shapes: tests and model-alone timing.

Same class shape as the FFCV and DALI pipelines. Every batch is a pure function of
(seed, epoch, rank, step), so resumed runs see the same data as uninterrupted ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipelines.batch import Batch
from pipelines.common import EpochPipeline
from pipelines.config import AugConfig, DataConfig


class SyntheticPipeline(EpochPipeline):
    """Random normalised views on the device, shaped like a real pipeline's batches.

    Args:
        data_dir: unused (kept for the common signature).
        data: batch size, C, K, supervised views.
        aug: number and size of the large and small crops.
        labeled: sorted labeled sample indices; labeled batches draw from them.
        device: where the tensors are made.
        dtype: floating type of the views.
        rank: global rank (changes the data).
        world_size: number of ranks.
        seed: base seed.
        labels_of: class id of every dataset sample (default: index modulo C).
        steps_per_epoch: steps in one epoch.
    """

    def __init__(
        self,
        data_dir: str | None,
        data: DataConfig,
        aug: AugConfig,
        labeled: np.ndarray,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        labels_of: np.ndarray | None = None,
        steps_per_epoch: int = 4,
    ) -> None:
        self.data, self.aug = data, aug
        self.labeled = np.asarray(labeled, dtype=np.int64)
        if labels_of is None:
            labels_of = np.arange(int(self.labeled.max()) + 1) % data.classes_per_batch
        self.labels_of = np.asarray(labels_of, dtype=np.int64)
        self.device, self.dtype = torch.device(device), dtype
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps = steps_per_epoch
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        for step in range(self.steps):
            yield self._batch(step)

    def _batch(self, step: int) -> Batch:
        d, a = self.data, self.aug
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, step)) % 2**62)
        B, N = d.batch_size, d.classes_per_batch * d.images_per_class

        sizes = [a.large_size] * a.n_large + [a.small_size] * a.n_small
        unlabeled = [self._views(g, B, s) for s in sizes]  # V x [B, 3, S, S]
        labeled = [self._views(g, N, a.large_size) for _ in range(d.n_supervised_views)]

        pick = torch.randint(len(self.labeled), (N,), generator=g).numpy()
        labeled_indices = torch.from_numpy(self.labeled[pick])  # [N]
        labels = torch.from_numpy(self.labels_of[labeled_indices.numpy()])  # [N]
        indices = torch.randint(max(len(self.labels_of), B), (B,), generator=g)  # [B]
        if not self.labeled_on:  # drawn all the same: the unlabeled draws stay as they were
            labeled, labels, labeled_indices = [], labels[:0], labeled_indices[:0]
        return Batch(
            unlabeled_views=unlabeled,
            labeled_views=labeled,
            labels=labels.to(self.device),
            indices=indices.to(self.device),
            labeled_indices=labeled_indices.to(self.device),
        )

    def _views(self, g: torch.Generator, n: int, size: int) -> torch.Tensor:
        x = torch.randn(n, 3, size, size, generator=g)  # [n, 3, S, S]
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last)  # [n, 3, S, S]
