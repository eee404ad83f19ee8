"""FFCV backend: train.beton -> multi-crop `Batch`es on the device.

Two streams, both cut by the same multi-crop kernel (`pipelines.ffcv_ops`):

- unlabeled: an FFCV loader over ``train.beton``: every training image once per epoch in a
  fresh order (each rank a disjoint part), ``n_large`` large and ``n_small`` small crops per
  image, each image decoded once by CPU worker threads (`MultiCropDecoder`); the views are
  cut by those threads on a CPU-only run, batched on the GPU on a GPU run (``data.crops``);
- labeled: the `StratifiedSampler`'s batches (C classes x K images, in the sampler's order),
  ``n_supervised_views`` large crops per image, as many batches as unlabeled steps, cut from
  the labeled store (`pipelines.labeled_store`: the labeled images decoded once into raw
  pixels, built on first use in ``DATA/cache/``) by `pipelines.ffcv_store.StoreCrops` in a
  background thread, so a labeled image costs crops only, not a JPEG decode per visit (on a
  GPU run, a copy only: its views are cut on the GPU as the unlabeled ones).

The decoders' rows travel to the device in one copy per batch, where flips, colour jitter,
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
from pipelines.config import CROPS
from pipelines.errors import PipelineError
from pipelines.ffcv_ops import (
    FixedOrder,
    MultiCropDecoder,
    cached_os_reader,
    check_rows,
    cut_on_device,
    leave_torch_threads_alone,
    unpack_rows,
)
from pipelines.ffcv_store import StoreCrops, beton_store

FIELDS = ("image", "label", "index")
__all__ = ["FFCVPipeline", "check_beton", "LABELED", "UNLABELED"]  # the tags: for bench/loaders.py


def check_beton(path: Path, split: SplitInfo):
    """Its `ffcv.reader.Reader`; raises `PipelineError` unless `path` is an FFCV file holding
    exactly `split`.

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
    return reader


class FFCVPipeline(TrainingPipeline):
    """Unlabeled multi-crop batches and stratified labeled batches from ``DATA/train.beton``.

    Args: as `pipelines.common.TrainingPipeline`; ``data.num_workers`` is FFCV's thread count.
    """

    backend = "ffcv"

    def _open(self, data_dir: Path, manifest: Manifest) -> None:
        self.beton = data_dir / "train.beton"
        self.reader = check_beton(self.beton, manifest.splits["train"])

    def _build(self) -> None:
        self.labels_on_device = torch.from_numpy(self.labels_of).to(self.device)  # [N]

        # FFCV would set torch's thread count to num_workers: stop that.
        leave_torch_threads_alone()
        crops = self.data.crops
        if crops not in CROPS:
            raise PipelineError(f"crops: unknown {crops!r}; choose from {CROPS}")
        if crops == "auto":
            crops = "device" if self.device.type == "cuda" else "host"
        self.unlabeled_decoder = MultiCropDecoder(_views_of(self.unlabeled_groups), cut=crops)
        self.unlabeled_loader = self._loader(
            self.unlabeled_decoder, self.data.batch_size, self.unlabeled_order, self.data.drop_last
        )
        self.labeled_crops = self.labeled_decoder = None
        if self.sampler is not None:
            store = beton_store(
                self.beton, self.reader, self.data_dir, self.data.cache_dir,
                self.train_fingerprint, self.labeled, self._split.files,
            )  # fmt: skip
            self.labeled_crops = StoreCrops(
                store,
                self.reader.metadata_type,
                list(self.reader.handlers).index("image"),
                self.num_samples,
                _views_of(self.labeled_groups),
                self.data.num_workers,
                cut=crops,
            )
            self.labeled_decoder = self.labeled_crops.decoder

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
        g = seed_generator(self.device, self.seed, self.epoch, self.rank)
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        steps = self.host_batches()
        try:
            for rows, labeled_rows in steps:
                streams = [(rows, self.unlabeled_decoder, self.unlabeled_groups)]
                if labeled_rows is not None:
                    streams.append((labeled_rows, self.labeled_decoder, self.labeled_groups))
                (views, indices), *labeled = self._views(streams, g)
                labeled_views, labels, labeled_indices = [], empty, empty
                if labeled:
                    ((labeled_views, labeled_indices),) = labeled
                    labels = self.labels_on_device[labeled_indices]  # [C*K], by delivered index
                yield Batch(views, labeled_views, labels, indices, labeled_indices)
        finally:
            steps.close()

    def host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One epoch (at self.epoch) of the decoders' uint8 rows before any device work:
        per step (unlabeled ``[B, T]``, labeled ``[C*K, T_l]`` or None); also what
        bench/loaders.py times as host-side work. Each pair is valid until the next."""
        unlabeled = self._start(self.unlabeled_loader, self.unlabeled_decoder, UNLABELED)
        labeled = None
        if self.labeled_crops is not None and self.labeled_on:
            key = stable_key(self.seed, self.epoch, self.rank, LABELED)
            labeled = self.labeled_crops.epoch(self.labeled_batches(self.epoch), key)
        try:
            for _ in range(self.steps):
                (rows,) = next(unlabeled)
                check_rows(rows, self.unlabeled_decoder, self.beton, self._split.files)
                yield rows, None if labeled is None else next(labeled)
        finally:
            unlabeled.close()
            if labeled is not None:
                labeled.close()

    def close(self) -> None:
        self.unlabeled_loader = self.labeled_crops = None

    def _ready_note(self) -> str:
        where = "on the device" if self.unlabeled_decoder.cut == "device" else "by the workers"
        return f" (views cut {where})"

    # ---- helpers ----

    def _start(self, loader, decoder: MultiCropDecoder, stream: int):
        """Starts one epoch of `loader` at self.epoch (FFCV counts epochs itself)."""
        decoder.set_key(stable_key(self.seed, self.epoch, self.rank, stream))
        loader.next_epoch = self.epoch
        return iter(loader)

    def _views(
        self,
        streams: list[tuple[torch.Tensor, MultiCropDecoder, list[ViewGroup]]],
        g: torch.Generator,
    ) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Each stream's decoder rows ``[B, T]`` split into views, augmented on the device.

        Views of one size and augmentation (the large unlabeled crops and the labeled ones)
        go through one `augment_views` call whichever stream they come from: a call's fixed
        cost (a few dozen small tensor ops) is over half of what a 40-image labeled batch
        at 32 px costs on a CPU alone (about 0.9 of 1.5 ms).

        Returns:
            per stream: (views, sample indices ``[B]`` int64), on the device.
        """
        cut_streams, buckets = [], {}
        for s, (rows, decoder, groups) in enumerate(streams):
            flat = self.upload(rows)  # [B, T] uint8, one copy, done before the slot is reused
            cut = cut_on_device if decoder.cut == "device" else unpack_rows
            crops, indices = cut(flat, decoder, [group.n for group in groups])
            groups = [group for group in groups if group.n]
            for k, (group, x) in enumerate(zip(groups, crops, strict=True)):
                buckets.setdefault((group.aug, group.size), []).append((s, k, x))  # x [n*B, ...]
            cut_streams.append((rows.shape[0], len(groups), indices))
        augmented = [[None] * n_groups for _, n_groups, _ in cut_streams]
        for (aug, _), members in buckets.items():
            xs = [x for _, _, x in members]
            out = augment_views(xs, aug, g, self.aug.mean, self.aug.std, self.dtype)
            for (s, k, _), part in zip(members, out.split([len(x) for x in xs]), strict=True):
                augmented[s][k] = part  # [n*B, 3, S, S], channels-last
        return [
            ([view for part in parts for view in part.split(b)], indices)  # n x [B, 3, S, S]
            for (b, _, indices), parts in zip(cut_streams, augmented, strict=True)
        ]


def _views_of(groups: list[ViewGroup]) -> list[tuple[int, tuple[float, float]]]:
    """(size, scale) of every view of `groups`, in order."""
    return [(g.size, g.scale) for g in groups for _ in range(g.n)]
