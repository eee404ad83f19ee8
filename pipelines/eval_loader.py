"""FFCV loaders for evaluation and fine-tuning: given samples of a split, one view each.

- `CenterCropLoader`: the evaluation view. The shorter side is resized to ``eval_resize`` and
  the centre ``eval_size`` square cut, i.e. FFCV's `CenterCropRGBImageDecoder` with ratio
  ``eval_size / eval_resize`` (it crops the centre ``ratio * min(h, w)`` square and resizes it
  to ``eval_size``). Samples come in the order given, every one of them (no dropped tail).
- `FinetuneLoader`: random-resized crop (``aug.large_scale``) + horizontal flip only, the
  SimCLR/SuNCEt fine-tuning augmentation, over a fresh permutation of the samples each epoch.

Both yield `EvalBatch`es: normalized (``aug.mean``/``aug.std``), channels-last images on the
device, the true labels from the manifest, and the sample indices read back from the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from convert.manifest import load_manifest
from pipelines.augment import _const, random_flip, seed_generator
from pipelines.config import AugConfig
from pipelines.errors import PipelineError
from pipelines.ffcv_ops import (
    FixedOrder,
    MultiCropDecoder,
    cached_os_reader,
    leave_torch_threads_alone,
)
from pipelines.ffcv_pipeline import _key, check_beton

SPLITS = ("train", "val")
FINETUNE = 3  # stream tag of the fine-tuning crops (training streams use 1 and 2)


class EvalBatch(NamedTuple):
    """One batch of single-view images with their labels.

    Attributes:
        images: ``[B, 3, S, S]``, normalized, channels-last, on the device.
        labels: ``[B]`` int64 class ids, on the device.
        indices: ``[B]`` int64 sample indices of the split, on the device.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def normalize(x: torch.Tensor, aug: AugConfig, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, S, 3]`` in [0, 1] -> normalized ``[B, 3, S, S]``, channels-last, in `dtype`."""
    scale = _const(tuple(1 / v for v in aug.std), x.device)  # [3]
    shift = _const(tuple(-m / v for m, v in zip(aug.mean, aug.std, strict=True)), x.device)  # [3]
    x = torch.addcmul(shift, x, scale).to(dtype)  # [B, S, S, 3]
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # [B, 3, S, S]


class _SplitLoader:
    """What both loaders share: the split's file and labels, the sample list, the device."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        indices: np.ndarray | None,
        aug: AugConfig,
        device: torch.device | str,
        dtype: torch.dtype,
        batch_size: int,
        num_workers: int,
    ) -> None:
        if split not in SPLITS:
            raise PipelineError(f"split {split!r}: expected one of {SPLITS}")
        manifest = load_manifest(data_dir)
        if split not in manifest.splits:
            raise PipelineError(f"{data_dir}: the dataset has no {split!r} split")
        info = manifest.splits[split]
        self.beton = Path(data_dir) / f"{split}.beton"
        check_beton(self.beton, info)

        self.split, self.aug = split, aug
        self.num_classes = manifest.num_classes
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.labels_of = torch.as_tensor(info.labels, dtype=torch.int64)  # [N]
        n = info.num_samples
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise PipelineError(f"{split}: no samples to load")
        if self.indices.min() < 0 or self.indices.max() >= n:
            raise PipelineError(f"{split}: sample indices must lie in 0..{n - 1}")
        leave_torch_threads_alone()

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        """True labels of the samples, in loader order when the order is fixed, ``[L]``."""
        return self.labels_of[torch.from_numpy(self.indices)]

    def _loader(self, image_pipeline: list, order, index_field: bool):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        index = [IntDecoder(), ToTensor()] if index_field else None
        with cached_os_reader():
            return Loader(
                str(self.beton),
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                os_cache=True,
                order=FixedOrder(order),
                pipelines={"image": image_pipeline, "label": None, "index": index},
                drop_last=False,
            )

    def _batch(self, images: torch.Tensor, indices: torch.Tensor) -> EvalBatch:
        labels = self.labels_of[indices]  # [B]
        dev = self.device
        return EvalBatch(images, labels.to(dev), indices.to(dev))


class CenterCropLoader(_SplitLoader):
    """Centre crops of `indices` of `split` (all its samples when None), in that order.

    Args:
        data_dir: dataset folder written by convert/ (manifest.json, <split>.beton).
        split: ``train`` or ``val``.
        indices: sample indices of the split, in the order wanted; None: all.
        aug: ``eval_size``, ``eval_resize``, ``mean``, ``std``.
        device, dtype: where and in which floating type batches arrive.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        indices: np.ndarray | None,
        aug: AugConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 256,
        num_workers: int = 2,
    ) -> None:
        super().__init__(data_dir, split, indices, aug, device, dtype, batch_size, num_workers)
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.transforms import ToTensor

        if not 0 < aug.eval_size <= aug.eval_resize:
            raise PipelineError(
                f"eval_size {aug.eval_size} must be in 1..eval_resize ({aug.eval_resize})"
            )
        side = aug.eval_size
        decoder = CenterCropRGBImageDecoder((side, side), ratio=side / aug.eval_resize)
        order = self.indices
        self.loader = self._loader([decoder, ToTensor()], lambda epoch: order, True)

    def __iter__(self) -> Iterator[EvalBatch]:
        start = 0
        for images, index in self.loader:
            b = images.shape[0]
            index = index.view(b).long()  # [B]
            expected = self.indices[start : start + b]
            if not np.array_equal(index.numpy(), expected):
                raise PipelineError(f"{self.beton}: samples came out of order at {start}")
            start += b
            x = images.to(self.device, non_blocking=True)  # [B, S, S, 3] uint8
            x = normalize(x.float().mul_(1 / 255), self.aug, self.dtype)  # [B, 3, S, S]
            yield self._batch(x, index)


class FinetuneLoader(_SplitLoader):
    """Random-resized crops (``aug.large_scale``, side ``size``) and flips of `indices`, in a
    fresh order each epoch (call `set_epoch`); a pure function of (seed, epoch).

    Args:
        size: crop side; default ``aug.eval_size``, the side the evaluation sees.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        indices: np.ndarray | None,
        aug: AugConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        num_workers: int = 2,
        size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir, split, indices, aug, device, dtype, batch_size, num_workers)
        from ffcv.transforms import ToTensor

        self.side = size or aug.eval_size
        self.seed, self.epoch = seed, 0
        self.decoder = MultiCropDecoder([(self.side, aug.large_scale)])
        self.loader = self._loader([self.decoder, ToTensor()], self._order, False)

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, FINETUNE])
        return self.indices[rng.permutation(len(self.indices))]  # [L]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[EvalBatch]:
        self.decoder.set_key(_key(self.seed, self.epoch, 0, FINETUNE))
        self.loader.next_epoch = self.epoch
        g = seed_generator(self.device, self.seed, self.epoch, FINETUNE)
        at, s = self.decoder.index_offset, self.side
        for (rows,) in self.loader:
            b = rows.shape[0]
            flat = rows.to(self.device, non_blocking=True)  # [B, T] uint8
            index = flat[:, at : at + 8].contiguous().view(torch.int64).view(b)  # [B]
            crops = flat[:, : s * s * 3].view(b, s, s, 3)  # [B, S, S, 3]
            x = random_flip(crops.float().mul_(1 / 255), 0.5, g)  # [B, S, S, 3]
            x = normalize(x, self.aug, self.dtype)  # [B, 3, S, S]
            yield self._batch(x, index.cpu())
