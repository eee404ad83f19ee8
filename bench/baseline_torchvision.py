"""The outside baseline: a torchvision/PIL `DataLoader` with the same multi-crop augmentation.

It reads the very JPEG bytes the DALI shards store (``train-offsets.npy``: shard, offset, size),
so it decodes the same pixels as the FFCV and DALI pipelines, and does everything on the host
as a plain torchvision recipe would: PIL decode once per image, then per view
RandomResizedCrop, flip, ColorJitter (p), grayscale (p), PIL's own ``ImageFilter.GaussianBlur``
(p; torchvision's GaussianBlur on PIL images is 5x slower here), ToTensor and Normalize, in
worker processes. `TorchvisionPipeline` wraps it in the project's pipeline class shape (a
labeled stream from the same `StratifiedSampler`), so ``--benchmark all`` can time it.

Only bench/ and the benchmark (lazily) import this file; the product never does.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from convert.manifest import load_manifest
from pipelines.batch import Batch
from pipelines.config import AugConfig, DataConfig
from pipelines.sampler import StratifiedSampler


class PILGaussianBlur:
    """PIL's own Gaussian blur with sigma drawn uniformly from a range."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def view_transform(aug: AugConfig, size: int, scale: tuple, blur_p: float) -> T.Compose:
    """One SimCLR view on a PIL image -> normalized ``[3, S, S]`` float tensor."""
    s = aug.color_strength
    steps = [
        T.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.color_p),
        T.RandomGrayscale(p=aug.gray_p),
    ]
    if blur_p > 0:
        steps.append(T.RandomApply([PILGaussianBlur(aug.blur_sigma)], p=blur_p))
    steps += [T.ToTensor(), T.Normalize(aug.mean, aug.std)]
    return T.Compose(steps)


class MultiCrop:
    """``n_large`` large then ``n_small`` small views of one decoded image."""

    def __init__(self, aug: AugConfig, n_large: int, n_small: int):
        large = view_transform(aug, aug.large_size, aug.large_scale, aug.blur_p_large)
        small = view_transform(aug, aug.small_size, aug.small_scale, aug.blur_p_small)
        self.views = [large] * n_large + [small] * n_small

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [v(img) for v in self.views]


class ShardJPEGs(Dataset):
    """The train split's stored JPEGs, read by index from the DALI shards.

    Items are ``(views, label, index)``; files open lazily, once per worker process.
    """

    def __init__(self, data_dir: str | os.PathLike, transform: MultiCrop):
        self.data_dir = Path(data_dir)
        manifest = load_manifest(data_dir)
        section = manifest.formats.get("dali")
        if not section:
            raise FileNotFoundError(
                f"{self.data_dir}: no DALI shards (the baseline reads their JPEG bytes); "
                f"run `python convert/imagenet_to_dali.py --src TREE --out {self.data_dir}`"
            )
        self.paths = [str(self.data_dir / s) for s in section["shards"]["train"]]
        self.offsets = np.load(self.data_dir / section["offsets"]["train"])  # [N, 3]
        self.labels = np.asarray(manifest.splits["train"].labels, dtype=np.int64)  # [N]
        self.transform = transform
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def jpeg(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.offsets[i])
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return os.pread(self._fds[shard], size, offset)

    def __getitem__(self, i: int):
        img = Image.open(io.BytesIO(self.jpeg(i))).convert("RGB")  # decoded once
        return self.transform(img), int(self.labels[i]), i

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}  # descriptors do not cross process boundaries
        return state


def make_loader(
    data_dir: str,
    aug: AugConfig,
    batch_size: int,
    num_workers: int,
    *,
    n_large: int | None = None,
    n_small: int | None = None,
    batches: list[np.ndarray] | None = None,
    seed: int = 0,
    persistent: bool = True,
) -> DataLoader:
    """A DataLoader of multi-crop views: shuffled batches, or the given index batches."""
    n_large = aug.n_large if n_large is None else n_large
    n_small = aug.n_small if n_small is None else n_small
    dataset = ShardJPEGs(data_dir, MultiCrop(aug, n_large, n_small))
    common = dict(
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=_worker_init,
    )
    if batches is not None:
        return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], **common)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=g, **common
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # as torch does in workers; explicit for the in-process case
    random.seed(torch.initial_seed() % 2**32)


class TorchvisionPipeline:
    """The baseline in the project's pipeline class shape (same signature and `Batch`).

    Args: as `pipelines.ffcv_pipeline.FFCVPipeline`; ``rank``/``world_size`` are accepted
    but the baseline is single-process (one rank).
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
        self.data_dir, self.data, self.aug = data_dir, data, aug
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.epoch = 0
        self.unlabeled = make_loader(data_dir, aug, data.batch_size, data.num_workers, seed=seed)
        n = len(self.unlabeled.dataset)
        self.steps = n // data.batch_size
        self.labels_of = self.unlabeled.dataset.labels
        self.labeled = np.asarray(labeled, dtype=np.int64)  # [L]
        self.sampler = None
        if len(self.labeled):
            self.sampler = StratifiedSampler(
                self.labeled,
                self.labels_of[self.labeled],
                data.classes_per_batch,
                data.images_per_class,
                seed=seed,
            )
        self._labeled_loader = None
        self._labeled_epoch = -1

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.unlabeled.generator.manual_seed(self.seed + epoch)

    def _labeled_iter(self):
        if self.sampler is None:
            return None
        if self._labeled_epoch != self.epoch:
            rows = self.sampler.epoch_batches(self.epoch, self.steps)[0]  # [steps, C*K]
            n_sup = max(1, self.data.n_supervised_views)
            self._labeled_loader = make_loader(
                self.data_dir, self.aug, 0, self.data.num_workers, n_large=n_sup, n_small=0,
                batches=list(rows),
            )  # fmt: skip
            self._labeled_epoch = self.epoch
        return iter(self._labeled_loader)

    def __iter__(self) -> Iterator[Batch]:
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        labeled = self._labeled_iter()
        for views, _, index in self.unlabeled:
            views = [self._to_device(v) for v in views]  # V x [B, 3, S, S]
            lviews, labels, lindex = [], empty, empty
            if labeled is not None:
                lv, y, li = next(labeled)
                lviews = [self._to_device(v) for v in lv]  # n_sup x [C*K, 3, S, S]
                labels, lindex = y.to(self.device), li.to(self.device)  # [C*K]
            yield Batch(views, lviews, labels, index.to(self.device), lindex)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)  # [B, 3, S, S]
        return x.contiguous(memory_format=torch.channels_last)

    def close(self) -> None:
        self.unlabeled = self._labeled_loader = None
