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

from pipelines.augment import normalize, random_flip, seed_generator, stable_key
from pipelines.common import (
    FINETUNE,
    HostToDevice,
    check_format_files,
    epoch_order,
    load_train_split,
)
from pipelines.config import AugConfig
from pipelines.errors import PipelineError
from pipelines.ffcv_ops import (
    FixedOrder,
    MultiCropDecoder,
    cached_os_reader,
    check_rows,
    leave_torch_threads_alone,
    unpack_rows,
)
from pipelines.ffcv_pipeline import check_beton
from pipelines.ffcv_store import check_decodes

SPLITS = ("train", "val")


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


class _SplitLoader:
    """What both loaders share: the split's file and labels, the sample list, the device, and
    one FFCV loader (`_image_pipeline` and `_order` say what it decodes and in which order).

    Args:
        data_dir: dataset folder written by convert/ (manifest.json, <split>.beton).
        split: ``train`` or ``val``.
        indices: sample indices of the split; None: all.
        aug: ``eval_size``, ``eval_resize``, ``mean``, ``std`` (and the fine-tuning crops).
        device, dtype: where and in which floating type batches arrive.
        batch_size: images per batch (the last batch may be smaller).
        num_workers: FFCV's decoding threads.
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
        if split not in SPLITS:
            raise PipelineError(f"split {split!r}: expected one of {SPLITS}")
        manifest = load_train_split(data_dir)
        if split not in manifest.splits:
            raise PipelineError(f"{data_dir}: the dataset has no {split!r} split")
        check_format_files(data_dir, manifest, "ffcv", split)
        info = manifest.splits[split]
        self.beton = Path(data_dir) / f"{split}.beton"
        reader = check_beton(self.beton, info)
        self.files = info.files

        self.split, self.aug = split, aug
        self.num_classes = manifest.num_classes
        self.device, self.dtype = torch.device(device), dtype
        self.upload = HostToDevice(self.device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.labels_of = torch.as_tensor(info.labels, dtype=torch.int64)  # [N]
        n = info.num_samples
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise PipelineError(f"{split}: no samples to load")
        if self.indices.min() < 0 or self.indices.max() >= n:
            raise PipelineError(f"{split}: sample indices must lie in 0..{n - 1}")
        if self.checks_decodes:
            check_decodes(self.beton, reader, self.indices, self.files)
        leave_torch_threads_alone()
        self.loader = self._loader()

    # FFCV's stock decoders hand on garbage for a JPEG that does not decode: a loader that
    # uses them decodes its samples once first (`check_decodes`); ours report it per batch.
    checks_decodes = False

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        """True labels of the samples, in loader order when the order is fixed, ``[L]``."""
        return self.labels_of[torch.from_numpy(self.indices)]

    def _image_pipeline(self) -> tuple[list, bool]:
        """The image field's FFCV pipeline, and whether the index field needs decoding."""
        raise NotImplementedError

    def _order(self, epoch: int) -> np.ndarray:
        """The samples of an epoch, in loader order, ``[L]``."""
        return self.indices

    def _loader(self):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        image, index_field = self._image_pipeline()
        index = [IntDecoder(), ToTensor()] if index_field else None
        with cached_os_reader():
            return Loader(
                str(self.beton),
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                os_cache=True,
                order=FixedOrder(self._order),
                pipelines={"image": image, "label": None, "index": index},
                drop_last=False,
            )

    def _batch(self, images: torch.Tensor, indices: torch.Tensor) -> EvalBatch:
        labels = self.labels_of[indices]  # [B]
        dev = self.device
        return EvalBatch(images, labels.to(dev), indices.to(dev))


class CenterCropLoader(_SplitLoader):
    """Centre crops of `indices` of `split` (all its samples when None), in that order.

    Args: as `_SplitLoader` (``batch_size`` default 256); ``indices`` in the order wanted.
    """

    # Limitation: FFCV's CenterCropRGBImageDecoder does not report a JPEG that fails to
    # decode, so each loader decodes its samples once more when built (`check_decodes`;
    # 3,700-5,100 img/s on 2 cores at 256 px: ImageNet's val split ~12 s, a 10% bank ~30 s).
    checks_decodes = True

    def _image_pipeline(self) -> tuple[list, bool]:
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.transforms import ToTensor

        aug = self.aug
        if not 0 < aug.eval_size <= aug.eval_resize:
            raise PipelineError(
                f"eval_size {aug.eval_size} must be in 1..eval_resize ({aug.eval_resize})"
            )
        side = aug.eval_size
        decoder = CenterCropRGBImageDecoder((side, side), ratio=side / aug.eval_resize)
        return [decoder, ToTensor()], True

    def __iter__(self) -> Iterator[EvalBatch]:
        start = 0
        for images, index in self.loader:
            b = images.shape[0]
            index = index.view(b).long()  # [B]
            expected = self.indices[start : start + b]
            if not np.array_equal(index.numpy(), expected):
                raise PipelineError(f"{self.beton}: samples came out of order at {start}")
            start += b
            x = self.upload(images)  # [B, S, S, 3] uint8
            x = normalize(x.float().mul_(1 / 255), self.aug.mean, self.aug.std, self.dtype)
            yield self._batch(x, index)  # x: [B, 3, S, S]


class FinetuneLoader(_SplitLoader):
    """Random-resized crops (``aug.large_scale``, side ``size``) and flips of `indices`, in a
    fresh order each epoch (call `set_epoch`); a pure function of (seed, epoch).

    Args: as `_SplitLoader` (``batch_size`` default 64), and
        size: crop side; default ``aug.eval_size``, the side the evaluation sees.
        seed: base seed of the crops, flips and order.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        indices: np.ndarray | None,
        aug: AugConfig,
        *,
        batch_size: int = 64,
        size: int | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        self.side = size or aug.eval_size
        self.seed, self.epoch = seed, 0
        self.decoder = MultiCropDecoder([(self.side, aug.large_scale)])
        super().__init__(data_dir, split, indices, aug, batch_size=batch_size, **kwargs)

    def _image_pipeline(self) -> tuple[list, bool]:
        from ffcv.transforms import ToTensor

        return [self.decoder, ToTensor()], False

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.indices)
        return self.indices[epoch_order(n, self.seed, epoch, 0, 1, stream=FINETUNE)]  # [L]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[EvalBatch]:
        self.decoder.set_key(stable_key(self.seed, self.epoch, 0, FINETUNE))
        self.loader.next_epoch = self.epoch
        g = seed_generator(self.device, self.seed, self.epoch, FINETUNE)
        for (rows,) in self.loader:
            flat = self.upload(rows)  # [B, T] uint8
            (crops,), _ = unpack_rows(flat, self.decoder, [1])  # [B, S, S, 3]
            index = check_rows(rows, self.decoder, self.beton, self.files)  # [B], on the host
            x = random_flip(crops.float().mul_(1 / 255), 0.5, g)  # [B, S, S, 3]
            x = normalize(x, self.aug.mean, self.aug.std, self.dtype)  # [B, 3, S, S]
            yield self._batch(x, index.clone())  # rows is FFCV's buffer, reused
