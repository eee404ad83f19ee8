"""FFCV backend: train.beton -> multi-crop `Batch`es on the device.

Two FFCV loaders read the same ``train.beton``:

- unlabeled: every training image once per epoch in a fresh order (each rank a disjoint
  part), ``n_large`` large and ``n_small`` small crops per image;
- labeled: the `StratifiedSampler`'s batches (C classes x K images, in the sampler's order)
  through a fixed traversal order, ``n_supervised_views`` large crops per image, as many
  batches as unlabeled steps.

CPU worker threads decode each image once and cut all its crops (`MultiCropDecoder`); the
uint8 crops travel to the device in one copy per batch, where flips, colour jitter,
grayscale, blur and normalization run batched (`pipelines.augment`). Crop boxes and device
augmentation are pure functions of (seed, epoch, rank): `set_epoch` picks the epoch, and
iterating again without it repeats the same epoch, as with torch's DistributedSampler.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from convert.manifest import SplitInfo, load_manifest
from pipelines.augment import ViewAug, augment_views, seed_generator
from pipelines.batch import Batch
from pipelines.config import AugConfig, DataConfig
from pipelines.errors import PipelineError
from pipelines.ffcv_ops import (
    FixedOrder,
    MultiCropDecoder,
    cached_os_reader,
    leave_torch_threads_alone,
)
from pipelines.sampler import StratifiedSampler

log = logging.getLogger(__name__)

FIELDS = ("image", "label", "index")
# Stream tags mixed into the seeds, so that orders and augmentations never share randomness.
UNLABELED, LABELED = 1, 2


def _key(*parts: int) -> int:
    """A 64-bit key from ints (FNV-1a), stable across processes."""
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def check_beton(path: Path, split: SplitInfo) -> None:
    """Raises `PipelineError` unless `path` is an FFCV file holding exactly `split`.

    Checks the fields, the sample count, that field ``index`` is 0..N-1 and that field
    ``label`` equals the manifest's labels (a content fingerprint of the labels).
    """
    from ffcv.reader import Reader

    if not path.is_file():
        raise PipelineError(
            f"{path}: no such file; convert the dataset with "
            f"`python convert/imagenet_to_ffcv.py --src TREE --out {path.parent}`"
        )
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV raises assorted errors on a bad header
        raise PipelineError(f"{path}: not a readable FFCV file ({type(e).__name__}: {e})") from e

    names = list(reader.handlers)
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise PipelineError(f"{path}: fields {names}, missing {missing}; reconvert the dataset")
    if reader.num_samples != split.num_samples:
        raise PipelineError(
            f"{path}: {reader.num_samples} samples but manifest.json lists "
            f"{split.num_samples}; the file and manifest are from different conversions"
        )
    labels = reader.metadata[f"f{names.index('label')}"]  # [N]
    index = reader.metadata[f"f{names.index('index')}"]  # [N]
    if not np.array_equal(index, np.arange(split.num_samples)):
        raise PipelineError(f"{path}: field 'index' is not 0..{split.num_samples - 1}")
    if not np.array_equal(labels, np.asarray(split.labels)):
        bad = int(np.flatnonzero(labels != np.asarray(split.labels))[0])
        raise PipelineError(
            f"{path}: labels differ from manifest.json (first at sample {bad}); "
            "the file and manifest are from different conversions"
        )


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """One rank's images of an epoch, ``[ceil(N / world_size)]`` int64.

    A permutation seeded by (seed, epoch), padded by wrapping to a multiple of the world size
    (as torch's DistributedSampler), then every world_size-th entry from `rank`: ranks are
    disjoint apart from the padding and all get the same number of images.
    """
    rng = np.random.default_rng([seed, epoch, UNLABELED])
    order = rng.permutation(num_samples)  # [N]
    per_rank = math.ceil(num_samples / world_size)
    order = np.resize(order, per_rank * world_size)  # [per_rank * world], wraps
    return order[rank::world_size]  # [per_rank]


class FFCVPipeline:
    """Unlabeled multi-crop batches and stratified labeled batches from ``DATA/train.beton``.

    Args:
        data_dir: dataset folder written by convert/ (manifest.json, train.beton).
        data: batch sizes, C, K, supervised views, workers.
        aug: crops and augmentation.
        labeled: sorted labeled sample indices of the train split; empty: no labeled stream
            (``labeled_views == []`` and empty labels).
        device: where batches arrive.
        dtype: floating type of the views.
        rank: global rank of this process.
        world_size: number of ranks.
        seed: base seed of the run.
    """

    def __init__(
        self,
        data_dir: str,
        data: DataConfig,
        aug: AugConfig,
        labeled: np.ndarray,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        t0 = time.perf_counter()
        self.data, self.aug = data, aug
        self.device, self.dtype = torch.device(device), dtype
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

        # 1. The manifest and the file must describe the same samples.
        manifest = load_manifest(data_dir)
        split = manifest.splits["train"]
        beton = Path(data_dir) / "train.beton"
        check_beton(beton, split)
        self.num_samples = split.num_samples
        self.labels_of = np.asarray(split.labels, dtype=np.int64)  # [N]
        self.labels_on_device = torch.from_numpy(self.labels_of).to(self.device)  # [N]

        # 2. Steps per epoch: this rank's share of the unlabeled images, in whole batches.
        self.per_rank = math.ceil(self.num_samples / world_size)
        whole = self.per_rank // data.batch_size
        self.steps = whole if data.drop_last else math.ceil(self.per_rank / data.batch_size)
        if self.steps == 0:
            raise PipelineError(
                f"batch_size={data.batch_size} exceeds the {self.per_rank} images of rank "
                f"{rank}; lower --batch-size"
            )

        # 3. The view groups: (views, side, augmentation) in output order.
        large = ViewAug(
            color_strength=aug.color_strength,
            color_p=aug.color_p,
            gray_p=aug.gray_p,
            blur_p=aug.blur_p_large,
            blur_sigma=aug.blur_sigma,
        )
        small = ViewAug(
            color_strength=aug.color_strength,
            color_p=aug.color_p,
            gray_p=aug.gray_p,
            blur_p=aug.blur_p_small,
            blur_sigma=aug.blur_sigma,
        )
        self.unlabeled_groups = [(aug.n_large, aug.large_size, large)]
        self.unlabeled_groups.append((aug.n_small, aug.small_size, small))
        self.labeled_groups = [(data.n_supervised_views, aug.large_size, large)]

        # 4. The loaders. FFCV would set torch's thread count to num_workers: stop that.
        leave_torch_threads_alone()
        crops = [(aug.large_size, aug.large_scale)] * aug.n_large
        crops += [(aug.small_size, aug.small_scale)] * aug.n_small
        self.unlabeled_decoder = MultiCropDecoder(crops)
        self.unlabeled_loader = self._loader(
            beton, self.unlabeled_decoder, data.batch_size, self._unlabeled_order, data.drop_last
        )

        self.labeled = np.asarray(labeled, dtype=np.int64)  # [L]
        self.sampler = self.labeled_loader = self.labeled_decoder = None
        if len(self.labeled):
            if self.labeled.min() < 0 or self.labeled.max() >= self.num_samples:
                raise PipelineError(
                    f"labeled indices must lie in 0..{self.num_samples - 1} (the train split)"
                )
            self.sampler = StratifiedSampler(
                self.labeled,
                self.labels_of[self.labeled],
                data.classes_per_batch,
                data.images_per_class,
                rank=rank,
                world_size=world_size,
                per_rank_classes=data.per_rank_classes,
                seed=seed,
            )
            self._labeled_cache: dict[int, np.ndarray] = {}
            n_sup = max(1, data.n_supervised_views)
            self.labeled_decoder = MultiCropDecoder([(aug.large_size, aug.large_scale)] * n_sup)
            self.labeled_loader = self._loader(
                beton, self.labeled_decoder, self.sampler.batch_size, self._labeled_order, True
            )
        log.info(
            "ffcv pipeline ready in %.1f s: %d steps/epoch", time.perf_counter() - t0, len(self)
        )

    # ---- orders: pure functions of (seed, epoch, rank) ----

    def _unlabeled_order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.num_samples, self.seed, epoch, self.rank, self.world_size)

    def labeled_batches(self, epoch: int) -> np.ndarray:
        """The labeled sample indices of an epoch for this rank, ``[steps, C*K]``."""
        if epoch not in self._labeled_cache:
            self._labeled_cache = {epoch: self.sampler.epoch_batches(epoch, self.steps)[0]}
        return self._labeled_cache[epoch]

    def _labeled_order(self, epoch: int) -> np.ndarray:
        return self.labeled_batches(epoch).reshape(-1)  # [steps * C * K]

    def _loader(
        self,
        beton: Path,
        decoder: MultiCropDecoder,
        batch_size: int,
        order: Callable[[int], np.ndarray],
        drop_last: bool,
    ):
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        # The decoder's rows carry each sample's index; check_beton has verified that fields
        # index and label equal 0..N-1 and the manifest's labels, so they need no decoders.
        with cached_os_reader():
            return Loader(
                str(beton),
                batch_size=batch_size,
                num_workers=self.data.num_workers,
                os_cache=True,  # MultiCropDecoder reads the OS-cache storage state
                order=FixedOrder(order),
                pipelines={"image": [decoder, ToTensor()], "label": None, "index": None},
                drop_last=drop_last,
            )

    # ---- public interface ----

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        unlabeled = self._start(self.unlabeled_loader, self.unlabeled_decoder, UNLABELED)
        labeled = None
        if self.labeled_loader is not None:
            labeled = self._start(self.labeled_loader, self.labeled_decoder, LABELED)
        g = seed_generator(self.device, self.seed, epoch, self.rank)
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        try:
            for _ in range(self.steps):
                (rows,) = next(unlabeled)
                views, indices = self._views(rows, self.unlabeled_decoder, self.unlabeled_groups, g)
                labeled_views, labels, labeled_indices = [], empty, empty
                if labeled is not None:
                    (rows,) = next(labeled)
                    groups = self.labeled_groups
                    labeled_views, labeled_indices = self._views(
                        rows, self.labeled_decoder, groups, g
                    )
                    labels = self.labels_on_device[labeled_indices]  # [C*K]
                yield Batch(views, labeled_views, labels, indices, labeled_indices)
        finally:
            unlabeled.close()
            if labeled is not None:
                labeled.close()

    def close(self) -> None:
        self.unlabeled_loader = self.labeled_loader = None

    # ---- helpers ----

    def _start(self, loader, decoder: MultiCropDecoder, stream: int):
        """Starts one epoch of `loader` at self.epoch (FFCV counts epochs itself)."""
        decoder.set_key(_key(self.seed, self.epoch, self.rank, stream))
        loader.next_epoch = self.epoch
        return iter(loader)

    def _views(
        self, rows: torch.Tensor, decoder: MultiCropDecoder, groups, g: torch.Generator
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Splits decoder rows ``[B, T]`` into views, augments each group on the device.

        Returns:
            (views, sample indices ``[B]`` int64), on the device.
        """
        b = rows.shape[0]
        flat = rows.to(self.device, non_blocking=True)  # [B, T] uint8, one copy
        at = decoder.index_offset
        indices = flat[:, at : at + 8].contiguous().view(torch.int64).view(b)  # [B]
        views, start = [], 0
        for n, side, view_aug in groups:
            if n == 0:
                continue
            stop = start + n * side * side * 3
            crops = flat[:, start:stop].view(b, n, side, side, 3)  # [B, n, S, S, 3]
            crops = crops.transpose(0, 1).reshape(n * b, side, side, 3)  # [n*B, S, S, 3]
            out = augment_views(crops, view_aug, g, self.aug.mean, self.aug.std, self.dtype)
            views.extend(out.split(b))  # n x [B, 3, S, S], each channels-last
            start = stop
        return views, indices
