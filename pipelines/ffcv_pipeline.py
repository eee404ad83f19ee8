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

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from convert.manifest import Manifest, SplitInfo
from pipelines.augment import augment_views, seed_generator, stable_key
from pipelines.batch import Batch
from pipelines.common import LABELED, UNLABELED, TrainingPipeline, ViewGroup
from pipelines.errors import PipelineError
from pipelines.ffcv_ops import (
    FixedOrder,
    MultiCropDecoder,
    cached_os_reader,
    leave_torch_threads_alone,
    unpack_rows,
)

FIELDS = ("image", "label", "index")
__all__ = ["FFCVPipeline", "check_beton", "LABELED", "UNLABELED"]  # the tags: for bench/loaders.py


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


class FFCVPipeline(TrainingPipeline):
    """Unlabeled multi-crop batches and stratified labeled batches from ``DATA/train.beton``.

    Args: as `pipelines.common.TrainingPipeline`; ``data.num_workers`` is FFCV's thread count.
    """

    backend = "ffcv"

    def _open(self, data_dir: Path, manifest: Manifest) -> None:
        self.beton = data_dir / "train.beton"
        check_beton(self.beton, manifest.splits["train"])

    def _build(self) -> None:
        self.labels_on_device = torch.from_numpy(self.labels_of).to(self.device)  # [N]

        # FFCV would set torch's thread count to num_workers: stop that.
        leave_torch_threads_alone()
        self.unlabeled_decoder = _decoder(self.unlabeled_groups)
        self.unlabeled_loader = self._loader(
            self.unlabeled_decoder, self.data.batch_size, self.unlabeled_order, self.data.drop_last
        )
        self.labeled_loader = self.labeled_decoder = None
        if self.sampler is not None:
            self.labeled_decoder = _decoder(self.labeled_groups)
            self.labeled_loader = self._loader(
                self.labeled_decoder, self.sampler.batch_size, self._labeled_order, True
            )

    def _labeled_order(self, epoch: int) -> np.ndarray:
        return self.labeled_batches(epoch).reshape(-1)  # [steps * C * K]

    def _loader(
        self,
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
                str(self.beton),
                batch_size=batch_size,
                num_workers=self.data.num_workers,
                os_cache=True,  # MultiCropDecoder reads the OS-cache storage state
                order=FixedOrder(order),
                pipelines={"image": [decoder, ToTensor()], "label": None, "index": None},
                drop_last=drop_last,
            )

    # ---- public interface ----

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
        decoder.set_key(stable_key(self.seed, self.epoch, self.rank, stream))
        loader.next_epoch = self.epoch
        return iter(loader)

    def _views(
        self,
        rows: torch.Tensor,
        decoder: MultiCropDecoder,
        groups: list[ViewGroup],
        g: torch.Generator,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Splits decoder rows ``[B, T]`` into views, augments each group on the device.

        Returns:
            (views, sample indices ``[B]`` int64), on the device.
        """
        b = rows.shape[0]
        flat = rows.to(self.device, non_blocking=True)  # [B, T] uint8, one copy
        crops, indices = unpack_rows(flat, decoder, [group.n for group in groups])
        views = []
        for group, x in zip([gr for gr in groups if gr.n], crops, strict=True):
            out = augment_views(x, group.aug, g, self.aug.mean, self.aug.std, self.dtype)
            views.extend(out.split(b))  # n x [B, 3, S, S], each channels-last
        return views, indices


def _decoder(groups: list[ViewGroup]) -> MultiCropDecoder:
    """One decoder cutting every view of `groups`, in order, from one decode."""
    return MultiCropDecoder([(g.size, g.scale) for g in groups for _ in range(g.n)])
