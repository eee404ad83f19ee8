"""FFCV and DALI side by side on the same files (the `cifar_dataset` fixture holds both),
what both must do alike (a one-image class), and the room's import contract.

Both backends get the same config and seed and run two epochs; the module keeps, per backend
and augmentation, the first batch, the sample indices of every step and the per-channel mean
and std of the normalised views (large crops, small crops, labeled views). Their random draws
differ (FFCV: counter-based crops and torch augmentation; DALI: its own operators), so the
comparison is of statistics, not pixels.

Tolerances, from measuring this configuration over seeds 0-5 (two epochs each; FFCV minus
DALI, per channel; the test runs seed 0):
- crops and flips only: |mean gap| at most 0.046 (small crops; 0.037 large, 0.029 labeled),
  |std gap| at most 0.024. About 0.02 of it is systematic (the two JPEG decoders and
  resizers: DALI is brighter in red and blue, FFCV spreads a little wider), the rest is the
  crops drawn (seed-to-seed sd about 0.01). Tolerances 0.08 and 0.05 (systematic + 3 sd).
- full augmentation (colour jitter, grayscale, blur on): |mean gap| at most 0.081, |std gap|
  at most 0.042 (DALI's jitter lands about 0.03 brighter and 0.02 wider; sd about 0.025).
  Tolerances 0.12 and 0.06.
- against the dataset's own normalised pixel statistics (full images, read with PIL), the
  crops-only views lie 0.01-0.08 lower in mean and 0.05-0.08 lower in std (crops favour the
  image centre): tolerance 0.12 for both. Unnormalised or 0..255 views miss by far more, and
  a red/blue swap in one backend opens a crops-only gap of 0.23 (tried).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
pytest.importorskip("ffcv")

from convert.manifest import load_manifest  # noqa: E402
from pipelines.batch import Batch  # noqa: E402
from pipelines.config import AugConfig, DataConfig  # noqa: E402
from pipelines.dali_pipeline import DALIPipeline  # noqa: E402
from pipelines.ffcv_pipeline import FFCVPipeline  # noqa: E402

BACKENDS = {"ffcv": FFCVPipeline, "dali": DALIPipeline}
DATA = DataConfig(
    batch_size=64, classes_per_batch=10, images_per_class=4, n_supervised_views=2, num_workers=2
)
FULL = AugConfig(n_large=2, large_size=32, n_small=2, small_size=16)
PLAIN = replace(FULL, color_p=0.0, gray_p=0.0, blur_p_large=0.0)  # crops and flips only
AUGS = {"plain": PLAIN, "full": FULL}
EPOCHS, SEED = (0, 1), 0
GROUPS = ("large", "small", "labeled")


@dataclass
class Run:
    """What the tests need of two epochs of one pipeline."""

    first: Batch
    indices: list[np.ndarray]  # per step, [B]
    labeled_indices: list[np.ndarray]  # per step, [C*K]
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # group -> per-channel (mean, std), [3]
    without_labeled: list[Batch]  # epoch 1 again, with `set_epoch(1, labeled=False)`


class ChannelStats:
    """Running per-channel mean and std over batches of ``[N, 3, H, W]`` views."""

    def __init__(self) -> None:
        self.n = 0
        self.s1 = torch.zeros(3, dtype=torch.float64)  # [3], sum of values
        self.s2 = torch.zeros(3, dtype=torch.float64)  # [3], sum of squares

    def add(self, views: list[torch.Tensor]) -> None:
        x = torch.cat(views).transpose(0, 1).reshape(3, -1).double()  # [3, N*H*W]
        self.n += x.shape[1]
        self.s1 += x.sum(1)
        self.s2 += (x * x).sum(1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s1 / self.n  # [3]
        return mean.numpy(), (self.s2 / self.n - mean**2).sqrt().numpy()


def run(backend: str, data_dir, aug: AugConfig) -> Run:
    n = load_manifest(data_dir).splits["train"].num_samples
    p = BACKENDS[backend](str(data_dir), DATA, aug, np.arange(n), device="cpu", seed=SEED)
    stats = {g: ChannelStats() for g in GROUPS}
    first, indices, labeled_indices = None, [], []
    try:
        for epoch in EPOCHS:
            p.set_epoch(epoch)
            for b in p:
                first = b if first is None else first
                indices.append(b.indices.numpy())
                labeled_indices.append(b.labeled_indices.numpy())
                stats["large"].add(b.unlabeled_views[: aug.n_large])
                stats["small"].add(b.unlabeled_views[aug.n_large :])
                stats["labeled"].add(b.labeled_views)
        p.set_epoch(EPOCHS[-1], labeled=False)
        without_labeled = list(p)
    finally:
        p.close()
    stats = {g: s.result() for g, s in stats.items()}
    return Run(first, indices, labeled_indices, stats, without_labeled)


@pytest.fixture(scope="module")
def runs(cifar_dataset) -> dict[tuple[str, str], Run]:
    return {(b, a): run(b, cifar_dataset, aug) for b in BACKENDS for a, aug in AUGS.items()}


def test_backends_yield_the_same_views_shapes_dtype_layout_and_device(runs):
    a, b = runs["ffcv", "full"].first, runs["dali", "full"].first
    assert len(a.unlabeled_views) == len(b.unlabeled_views) == FULL.n_large + FULL.n_small
    assert len(a.labeled_views) == len(b.labeled_views) == DATA.n_supervised_views
    views_a, views_b = a.unlabeled_views + a.labeled_views, b.unlabeled_views + b.labeled_views
    for x, y in zip(views_a, views_b, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
        assert x.device == y.device == torch.device("cpu")
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last)
    for name in ("labels", "indices", "labeled_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype == torch.int64 and x.device == y.device


def test_backends_read_the_same_images_on_every_step(runs):
    ffcv, dali = runs["ffcv", "full"], runs["dali", "full"]
    assert len(ffcv.indices) == len(dali.indices) > 0
    for x, y in zip(ffcv.indices, dali.indices, strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(ffcv.labeled_indices, dali.labeled_indices, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("aug", "mean_tol", "std_tol"), [("plain", 0.08, 0.05), ("full", 0.12, 0.06)]
)
def test_backends_agree_on_per_channel_mean_and_std(runs, aug, mean_tol, std_tol):
    for group in GROUPS:
        (mean_f, std_f), (mean_d, std_d) = (
            runs["ffcv", aug].stats[group],
            runs["dali", aug].stats[group],
        )
        assert np.abs(mean_f - mean_d).max() <= mean_tol, (group, mean_f, mean_d)
        assert np.abs(std_f - std_d).max() <= std_tol, (group, std_f, std_d)


def test_views_are_normalised_by_the_configured_mean_and_std(runs, cifar_dataset, cifar_tree):
    files = load_manifest(cifar_dataset).splits["train"].files
    pixels = np.stack(
        [np.asarray(Image.open(cifar_tree / "train" / f).convert("RGB")) for f in files]
    )  # [N, 32, 32, 3]
    x = (pixels.reshape(-1, 3) / 255 - np.array(PLAIN.mean)) / np.array(PLAIN.std)  # [N*H*W, 3]
    mean, std = x.mean(0), x.std(0)  # [3]
    for backend in BACKENDS:
        for group in GROUPS:
            got_mean, got_std = runs[backend, "plain"].stats[group]
            assert np.abs(got_mean - mean).max() <= 0.12, (backend, group, got_mean, mean)
            assert np.abs(got_std - std).max() <= 0.12, (backend, group, got_std, std)
            jittered_std = runs[backend, "full"].stats[group][1]
            assert (jittered_std - got_std > 0.1).all(), (backend, group)  # jitter is on


def lone_class_split(data_dir, lone_class: int = 3, per_class: int = 6) -> np.ndarray:
    """The first `per_class` images of each class, but only one of `lone_class`."""
    labels = np.asarray(load_manifest(data_dir).splits["train"].labels)
    picks = [np.flatnonzero(labels == c)[: 1 if c == lone_class else per_class] for c in range(10)]
    return np.sort(np.concatenate(picks))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_one_image_class_is_drawn_k_times_in_distinct_views(cifar_dataset, backend):
    data = replace(DATA, classes_per_batch=5, images_per_class=3)
    aug = replace(PLAIN, n_large=1, n_small=0)  # crops and flips only: no colour to differ by
    split = lone_class_split(cifar_dataset)
    labels = np.asarray(load_manifest(cifar_dataset).splits["train"].labels)
    lone = int(split[labels[split] == 3][0])
    p = BACKENDS[backend](str(cifar_dataset), data, aug, split, device="cpu", seed=5)
    try:
        batches = list(p)
    finally:
        p.close()

    crops = []  # the lone image's views, all batches: each [3, S, S]
    for b in batches:
        classes, counts = np.unique(b.labels.numpy(), return_counts=True)
        assert len(classes) == 5 and (counts == 3).all()
        mine = b.labels == 3  # [C*K]
        if mine.any():
            assert (b.labeled_indices[mine] == lone).all()
            crops += [v[i] for v in b.labeled_views for i in mine.nonzero().flatten().tolist()]
    assert len(crops) >= 2 * 3 * data.n_supervised_views  # the class came up at least twice
    flat = torch.stack(crops).flatten(1)  # [n, 3*S*S]
    mirrored = torch.stack(crops).flip(-1).flatten(1)  # [n, 3*S*S]
    off = ~torch.eye(len(crops), dtype=torch.bool)
    assert (torch.cdist(flat, flat)[off] > 1e-3).all()  # no two views alike
    assert (torch.cdist(flat, mirrored)[off] > 1e-3).all()  # nor mirror images


def test_pipelines_import_nothing_of_the_other_rooms_but_the_manifest():
    """DESIGN.md: pipelines/ never imports model/ (nor the trainer); of convert/ only its
    manifest, the one contract between the two."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rooms = {"model", "runner", "train", "evaluate", "finetune", "bench", "convert"}
    for path in sorted((root / "pipelines").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] in rooms:
                    assert name == "convert.manifest", f"{path.name}:{node.lineno} imports {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_without_the_labeled_stream_keeps_its_unlabeled_images(runs, backend):
    run = runs[backend, "full"]
    last = run.indices[-len(run.without_labeled) :]  # epoch 1 with the labeled stream
    for b, indices in zip(run.without_labeled, last, strict=True):
        assert b.labeled_views == [] and b.labels.numel() == b.labeled_indices.numel() == 0
        assert len(b.unlabeled_views) == FULL.n_large + FULL.n_small
        assert np.array_equal(b.indices.numpy(), indices)
