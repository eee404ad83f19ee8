"""The DALI backend on the real CIFAR-10 subset (CPU-only DALI, 32/16 px crops)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from convert.manifest import load_manifest  # noqa: E402
from pipelines.config import AugConfig, DataConfig  # noqa: E402
from pipelines.dali_pipeline import DALIPipeline  # noqa: E402
from pipelines.errors import PipelineError  # noqa: E402

CPU = torch.device("cpu")
DATA = DataConfig(batch_size=32, classes_per_batch=5, images_per_class=2, n_supervised_views=2)
AUG = AugConfig(large_size=32, small_size=16)


def labeled_split(n: int) -> np.ndarray:
    return np.arange(0, n, 4)  # 15 images of each class (the subset is class-sorted)


@pytest.fixture(scope="module")
def pipe(cifar_dataset):
    n = load_manifest(cifar_dataset).splits["train"].num_samples
    p = DALIPipeline(str(cifar_dataset), DATA, AUG, labeled_split(n), device=CPU, seed=7)
    yield p
    p.close()


@pytest.fixture(scope="module")
def epochs(pipe):
    """Three epochs in a row (0, 1, 2), every batch kept."""
    out = []
    for e in range(3):
        pipe.set_epoch(e)
        out.append(list(pipe))
    return out


def one_batch(data_dir, aug: AugConfig, data: DataConfig = DATA, **kw):
    p = DALIPipeline(str(data_dir), data, aug, np.empty(0, np.int64), device=CPU, **kw)
    try:
        return next(iter(p))
    finally:
        p.close()


@pytest.mark.parametrize("n_large,n_small", [(2, 6), (2, 0), (2, 10)])
def test_views_returned_match_views_configured(cifar_dataset, n_large, n_small):
    b = one_batch(cifar_dataset, replace(AUG, n_large=n_large, n_small=n_small))
    assert len(b.unlabeled_views) == n_large + n_small
    sizes = [v.shape[-1] for v in b.unlabeled_views]
    assert sizes == [AUG.large_size] * n_large + [AUG.small_size] * n_small
    assert b.labeled_views == [] and b.labels.numel() == 0 and b.labeled_indices.numel() == 0


def test_views_of_one_image_all_differ(epochs):
    batch = epochs[0][0]
    for group in (batch.unlabeled_views[:2], batch.unlabeled_views[2:], batch.labeled_views):
        x = torch.stack(group, 1).flatten(2)  # [B, V, 3*H*W]
        for i in range(x.shape[1]):
            for j in range(i + 1, x.shape[1]):
                assert ((x[:, i] - x[:, j]).abs().amax(1) > 1e-3).all()


def test_batches_are_normalized_channels_last_float(epochs):
    b = epochs[0][0]
    for v in b.unlabeled_views + b.labeled_views:
        assert v.dtype == torch.float32 and v.device == CPU
        assert v.shape[:2] in {(32, 3), (10, 3)}
        assert v.is_contiguous(memory_format=torch.channels_last)
    x = torch.cat([v.flatten() for v in b.unlabeled_views])
    assert -1.0 < x.mean().item() < 1.0 and 0.5 < x.std().item() < 2.0
    assert b.indices.dtype == b.labels.dtype == b.labeled_indices.dtype == torch.int64


def test_half_precision_output(cifar_dataset):
    b = one_batch(cifar_dataset, replace(AUG, n_small=1), dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in b.unlabeled_views)
    assert b.unlabeled_views[0].is_contiguous(memory_format=torch.channels_last)


def test_labeled_batches_follow_the_sampler(pipe, epochs):
    for e, batches in enumerate(epochs):
        expect, expect_labels = pipe.sampler.epoch_batches(e, len(pipe))  # [steps, C*K]
        got = np.stack([b.labeled_indices.numpy() for b in batches])
        np.testing.assert_array_equal(got, expect)
        np.testing.assert_array_equal(np.stack([b.labels.numpy() for b in batches]), expect_labels)
        for b in batches:
            classes, counts = np.unique(b.labels.numpy(), return_counts=True)
            assert len(classes) == DATA.classes_per_batch
            assert (counts == DATA.images_per_class).all()


def test_labels_are_the_true_labels_of_the_images(cifar_dataset, epochs):
    truth = np.asarray(load_manifest(cifar_dataset).splits["train"].labels)
    labeled = labeled_split(len(truth))
    for b in epochs[1]:
        np.testing.assert_array_equal(b.labels.numpy(), truth[b.labeled_indices.numpy()])
        assert np.isin(b.labeled_indices.numpy(), labeled).all()


def test_three_epochs_give_the_same_number_of_batches(pipe, epochs):
    n = load_manifest(pipe.shards.data_dir).splits["train"].num_samples
    assert len(pipe) == n // DATA.batch_size
    assert [len(e) for e in epochs] == [len(pipe)] * 3


def test_epoch_reads_each_image_at_most_once_in_a_fresh_order(epochs):
    orders = [torch.cat([b.indices for b in e]).numpy() for e in epochs]
    for o in orders:
        assert len(np.unique(o)) == len(o)
    assert not np.array_equal(orders[0], orders[1])


def test_same_seed_and_epoch_give_identical_batches(pipe, epochs):
    pipe.set_epoch(1)
    again = list(pipe)
    for a, b in zip(epochs[1], again, strict=True):
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.labeled_indices, b.labeled_indices)
        views_a, views_b = a.unlabeled_views + a.labeled_views, b.unlabeled_views + b.labeled_views
        for x, y in zip(views_a, views_b, strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(epochs[0][0].unlabeled_views[0], epochs[1][0].unlabeled_views[0])


def test_two_ranks_read_disjoint_images(cifar_dataset):
    seen = []
    for rank in (0, 1):
        p = DALIPipeline(
            str(cifar_dataset),
            DATA,
            replace(AUG, n_small=0),
            np.empty(0, np.int64),
            device=CPU,
            rank=rank,
            world_size=2,
        )
        seen.append(torch.cat([b.indices for b in p]).numpy())
        p.close()
    assert len(seen[0]) == len(seen[1]) > 0
    assert not set(seen[0]) & set(seen[1])


@pytest.fixture
def broken_copy(cifar_dataset, tmp_path) -> Path:
    """A private copy of the DALI side of the dataset, to damage."""
    dst = tmp_path / "data"
    dst.mkdir()
    shutil.copy(cifar_dataset / "manifest.json", dst)
    shutil.copytree(cifar_dataset / "shards", dst / "shards")
    return dst


def test_truncated_shard_is_a_clear_error(broken_copy):
    tar = sorted((broken_copy / "shards").glob("train-*.tar"))[-1]
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    with pytest.raises(PipelineError, match=r"train-\d+.tar: .*truncated.*imagenet_to_dali"):
        one_batch(broken_copy, AUG)


def test_missing_offsets_file_is_a_clear_error(broken_copy):
    (broken_copy / "shards" / "train-offsets.npy").unlink()
    with pytest.raises(PipelineError, match=r"train-offsets.npy: missing.*imagenet_to_dali"):
        one_batch(broken_copy, AUG)


def test_offsets_of_another_dataset_are_a_clear_error(broken_copy):
    path = broken_copy / "shards" / "train-offsets.npy"
    np.save(path, np.load(path)[:-5])
    with pytest.raises(PipelineError, match=r"train-offsets.npy: .*(shape|another conversion)"):
        one_batch(broken_copy, AUG)
