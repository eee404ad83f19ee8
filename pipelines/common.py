"""What the FFCV and DALI training pipelines share, written once.

`TrainingPipeline` reads the manifest, counts the steps of an epoch, checks the labeled split,
builds the `StratifiedSampler` and the view groups; each backend adds only how it checks and
reads its files (`_open`) and how it builds its loaders (`_build`). The unlabeled order of an
epoch (`epoch_order`) and the stream tags live here too, so the two backends visit the same
images on every rank and step by construction, not by two copies kept in step.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from convert.manifest import Manifest, ManifestError, check_files, load_manifest
from pipelines.augment import ViewAug
from pipelines.config import AugConfig, DataConfig
from pipelines.errors import PipelineError
from pipelines.sampler import StratifiedSampler

log = logging.getLogger(__name__)

# Stream tags mixed into the seeds, so that orders and augmentations never share randomness.
UNLABELED, LABELED, FINETUNE = 1, 2, 3


class HostToDevice:
    """Copies a loader's host buffer to the device, done before the loader may refill it.

    FFCV's output buffers (pinned on a CUDA machine) and the labeled stream's ring are reused:
    a slot is refilled on the CPU as soon as a later batch is taken. A non-blocking copy queued
    on the compute stream runs only after the steps queued before it (the host runs ahead of
    the GPU), by when the slot may hold another batch. Here the copy runs at once on a stream
    of its own and the host waits for that copy alone, not for the compute; the result's
    memory is then handed to the compute stream (``record_stream``). Elsewhere a plain copy.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return host.to(self.device)
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
        self.stream.synchronize()  # the copy is done: the buffer may be refilled
        out.record_stream(torch.cuda.current_stream(self.device))
        return out


def epoch_order(
    num_samples: int, seed: int, epoch: int, rank: int, world_size: int, stream: int = UNLABELED
) -> np.ndarray:
    """One rank's images of an epoch, ``[ceil(N / world_size)]`` int64.

    A permutation seeded by (seed, epoch, stream), padded by wrapping to a multiple of the
    world size (as torch's DistributedSampler), then every world_size-th entry from `rank`:
    ranks are disjoint apart from the padding and all get the same number of images.
    """
    rng = np.random.default_rng([seed, epoch, stream])
    order = rng.permutation(num_samples)  # [N]
    per_rank = math.ceil(num_samples / world_size)
    order = np.resize(order, per_rank * world_size)  # [per_rank * world], wraps
    return order[rank::world_size]  # [per_rank]


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches of one rank's share of the unlabeled images (a partial last one unless
    `drop_last`); raises `PipelineError` when that is none."""
    per_rank = math.ceil(num_samples / world_size)
    steps = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    if steps == 0:
        raise PipelineError(
            f"batch_size={batch_size} exceeds the {per_rank} images of each rank; "
            "lower --batch-size"
        )
    tail = per_rank % batch_size
    if not drop_last and tail and tail * world_size < 2:
        raise PipelineError(
            f"--no-drop-last with --batch-size {batch_size}: the last step of each epoch would "
            f"hold 1 image ({per_rank} = {per_rank // batch_size} x {batch_size} + 1), and "
            "NT-Xent needs negatives; use --drop-last (the default) or another --batch-size"
        )
    return steps


class ViewGroup(NamedTuple):
    """Consecutive views cut alike: how many, their side, crop scale and augmentation."""

    n: int
    size: int
    scale: tuple[float, float]
    aug: ViewAug


def view_groups(aug: AugConfig, n_supervised_views: int) -> tuple[list[ViewGroup], list[ViewGroup]]:
    """The unlabeled groups (large crops, then small) and the labeled group (large crops)."""
    common = dict(
        color_strength=aug.color_strength,
        color_p=aug.color_p,
        gray_p=aug.gray_p,
        blur_sigma=aug.blur_sigma,
    )
    large = ViewAug(**common, blur_p=aug.blur_p_large)
    small = ViewAug(**common, blur_p=aug.blur_p_small)
    unlabeled = [
        ViewGroup(aug.n_large, aug.large_size, aug.large_scale, large),
        ViewGroup(aug.n_small, aug.small_size, aug.small_scale, small),
    ]
    labeled = [ViewGroup(n_supervised_views, aug.large_size, aug.large_scale, large)]
    return unlabeled, labeled


def load_train_split(data_dir: str | Path) -> Manifest:
    """The dataset's manifest; `PipelineError` if it is unusable or has no train split."""
    try:
        manifest = load_manifest(data_dir)
    except ManifestError as e:
        raise PipelineError(str(e)) from None
    if "train" not in manifest.splits:
        raise PipelineError(f"{Path(data_dir) / 'manifest.json'}: no 'train' split")
    return manifest


def check_format_files(data_dir: str | Path, manifest: Manifest, fmt: str, split: str) -> None:
    """`PipelineError` unless format `fmt`'s files of `split` are all there at the sizes the
    converter wrote (a truncated copy or a file from another conversion is caught before any
    read)."""
    try:
        check_files(data_dir, manifest, fmt, split)
    except ManifestError as e:
        raise PipelineError(str(e)) from None


class EpochPipeline:
    """The shape of every training pipeline: ``len`` steps per epoch, `set_epoch`, `close`.

    Iterating yields one epoch of `Batch`es; iterating again without `set_epoch` repeats it,
    as with torch's DistributedSampler. `set_epoch(e, labeled=False)` leaves the labeled
    stream out of that epoch (empty `labeled_views` and labels): the trainer asks for it
    once SuNCEt is off, so no labeled image is decoded, augmented or uploaded in vain. The
    epoch's unlabeled images and their order, and every other epoch's labeled ones, stay as
    they were.
    """

    steps: int = 0
    epoch: int = 0
    labeled_on: bool = True

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, labeled: bool = True) -> None:
        self.epoch, self.labeled_on = epoch, labeled

    def close(self) -> None:
        """Releases loaders and files (nothing here)."""


class TrainingPipeline(EpochPipeline):
    """Unlabeled multi-crop batches and stratified labeled batches from a converted dataset.

    Subclasses implement `_open` (check and open the backend's files) and `_build` (make
    its loaders), and `__iter__`.

    Args:
        data_dir: dataset folder written by convert/ (manifest.json and the backend's files).
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

    backend = ""

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
        self.upload = HostToDevice(self.device)  # host tensors of a batch -> device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self._labeled_cache: dict[int, np.ndarray] = {}

        # 1. The manifest and the backend's files must describe the same samples.
        manifest = load_train_split(data_dir)
        split = manifest.splits["train"]
        self.data_dir, self._split = Path(data_dir), split
        self.num_samples = split.num_samples
        self.labels_of = np.asarray(split.labels, dtype=np.int64)  # [N]
        check_format_files(data_dir, manifest, self.backend, "train")
        self._open(Path(data_dir), manifest)

        try:
            # 2. Steps per epoch: this rank's share of the unlabeled images, in whole batches.
            self.steps = steps_per_epoch(
                self.num_samples, data.batch_size, world_size, data.drop_last
            )

            # 3. The view groups, in output order.
            if aug.n_large + aug.n_small == 0:
                raise PipelineError("n_large + n_small is 0: the unlabeled stream needs a view")
            self.unlabeled_groups, self.labeled_groups = view_groups(aug, data.n_supervised_views)

            # 4. The labeled stream follows the sampler.
            self.labeled = np.asarray(labeled, dtype=np.int64)  # [L]
            self.sampler = self._sampler() if len(self.labeled) else None

            # 5. The backend's loaders.
            self._build()
        except BaseException:
            self.close()
            raise
        log.info(
            "%s pipeline ready in %.1f s: %d steps/epoch%s",
            self.backend,
            time.perf_counter() - t0,
            len(self),
            self._ready_note(),
        )

    def _sampler(self) -> StratifiedSampler:
        d = self.data
        if self.labeled.min() < 0 or self.labeled.max() >= self.num_samples:
            raise PipelineError(
                f"labeled indices must lie in 0..{self.num_samples - 1} (the train split)"
            )
        if d.n_supervised_views < 1:
            raise PipelineError("n_supervised_views must be at least 1 with a labeled split")
        return StratifiedSampler(
            self.labeled,
            self.labels_of[self.labeled],
            d.classes_per_batch,
            d.images_per_class,
            rank=self.rank,
            world_size=self.world_size,
            per_rank_classes=d.per_rank_classes,
            seed=self.seed,
        )

    @property
    def train_fingerprint(self) -> str:
        """The manifest's fingerprint of the train split (its files and labels)."""
        return self._split.fingerprint()

    # ---- orders: pure functions of (seed, epoch, rank) ----

    def unlabeled_order(self, epoch: int) -> np.ndarray:
        """This rank's unlabeled images of an epoch, ``[per_rank]`` (see `epoch_order`)."""
        return epoch_order(self.num_samples, self.seed, epoch, self.rank, self.world_size)

    def labeled_batches(self, epoch: int) -> np.ndarray:
        """The labeled sample indices of an epoch for this rank, ``[steps, C*K]``."""
        if epoch not in self._labeled_cache:
            self._labeled_cache = {epoch: self.sampler.epoch_batches(epoch, self.steps)[0]}
        return self._labeled_cache[epoch]

    # ---- what a backend adds ----

    def _open(self, data_dir: Path, manifest: Manifest) -> None:
        """Checks (and opens) the backend's files; raises `PipelineError` naming the file."""
        raise NotImplementedError

    def _build(self) -> None:
        """Makes the backend's loaders, once the steps, groups and sampler are set."""
        raise NotImplementedError

    def _ready_note(self) -> str:
        """A note for the ready log line, e.g. ``" (cpu-only)"``."""
        return ""
